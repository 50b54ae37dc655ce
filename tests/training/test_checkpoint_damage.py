"""Damaged, missing and unwritable resume checkpoints (issue 19): a stage resumes from the newest complete
step, telling in one line which newer step it skipped and why, and then continues exactly as an
uninterrupted run; with none left, or a save failing (a full disk), it stops with a one-line error naming
the directory. The SFT micro stage of test_resume saves steps 2 and 4 before it stops at step 5."""

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from pydantic import ValidationError

import parallel.distributed.checkpoint as dist_checkpoint
import training.resume as resume
from parallel import engine
from parallel.dims import ParallelConfig
from parallel.distributed.launch import launch
from parallel.tiny import build_tokenizer
from tests.training.sft_helpers import write_task_data
from tests.training.test_resume import STOP_AT, _run
from training.config import SFTStage
from training.resume import CheckpointSaveError, NoCompleteCheckpoint

SHARD = "model/__0_0.distcp"
METADATA = "model/.metadata"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), build_tokenizer(), num_train=48, num_val=8)


@pytest.fixture(scope="module")
def reference(model_dir, data_dir, tmp_path_factory):
    """The uninterrupted run: its result and the loss of every step."""
    result, losses, _ = _run(model_dir, data_dir, tmp_path_factory.mktemp("whole"))
    return result, losses


@pytest.fixture(scope="module")
def stopped(model_dir, data_dir, tmp_path_factory):
    """A run stopped at step 5 with its checkpoints of steps 2 and 4 (each test damages its own copy)."""
    out_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert _run(model_dir, data_dir, out_dir, stop_at=STOP_AT)[0] is None
    return out_dir


def _copy(stopped: Path, tmp_path: Path) -> tuple[Path, Path]:
    out_dir = tmp_path / "run"
    shutil.copytree(stopped, out_dir)
    return out_dir, out_dir / "resume"


def _steps(resume_dir: Path) -> list[str]:
    return sorted(p.name for p in resume_dir.glob("step-*"))


def _truncate(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return size


def _garble(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)  # the same size: only loading it can tell


def _size(step_dir: Path) -> str:
    """A step's size as the save error words it (from its completion record)."""
    return resume._human(sum(json.loads((step_dir / "COMPLETE.json").read_text())["files"].values()))


def _same_losses(losses: dict, reference: dict, steps, atol=1e-6) -> None:
    assert sorted(losses) == list(steps)
    for step in steps:
        assert losses[step] == pytest.approx(reference[step], abs=atol), step


@pytest.mark.parametrize("damage", ["truncated shard", "no .metadata", "garbled .metadata"])
def test_a_damaged_newest_step_resumes_from_the_older_one(
    model_dir, data_dir, stopped, reference, tmp_path, capfd, damage
):
    ref_result, ref_losses = reference
    out_dir, root = _copy(stopped, tmp_path)
    step4 = root / "step-00000004"
    if damage == "truncated shard":
        size = _truncate(step4 / SHARD)
        why = f"{SHARD}: {size // 2} bytes, expected {size}"
    elif damage == "no .metadata":
        (step4 / METADATA).unlink()
        why = f"{METADATA} is missing"
    else:
        _garble(step4 / METADATA)
        why = "loading it failed: "  # DCP's own error, past a record that is right about the sizes
    capfd.readouterr()
    result, losses, events = _run(model_dir, data_dir, out_dir)
    lines = [text for text in capfd.readouterr().err.splitlines() if text.startswith("hpcft: checkpoint")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"hpcft: checkpoint {step4} is damaged ({why}")
    assert lines[0].endswith("); resuming from step-00000002")
    skipped = [e for e in events if e.get("resume") == "skipped"]
    assert len(skipped) == 1 and skipped[0]["skipped_step"] == 4 and skipped[0]["reason"].startswith(why)
    assert skipped[0]["resumed_from"] == "step-00000002"
    assert [e["resumed_from_step"] for e in events if "resumed_from_step" in e] == [2]
    _same_losses(losses, ref_losses, [3, 4, 5, 6])
    assert result["resumed_from_step"] == 2
    assert result["val_loss"] == pytest.approx(ref_result["val_loss"], abs=1e-6)


def test_a_dangling_latest_resumes_from_the_newest_complete_step(model_dir, data_dir, stopped, reference, tmp_path):
    """`latest` names step 4, which is gone: resume from step 2 (not step 0), and keep it until a newer step
    is complete."""
    out_dir, root = _copy(stopped, tmp_path)
    shutil.rmtree(root / "step-00000004")
    assert (root / "latest").read_text().strip() == "step-00000004"
    _, losses, events = _run(model_dir, data_dir, out_dir, stop_at=STOP_AT)
    assert [e["resumed_from_step"] for e in events if "resumed_from_step" in e] == [2]
    _same_losses(losses, reference[1], [3, 4, 5])
    assert _steps(root) == ["step-00000002", "step-00000004"]
    assert (root / "latest").read_text().strip() == "step-00000004"


def test_no_complete_step_left_is_a_one_line_error(model_dir, data_dir, stopped, tmp_path):
    out_dir, root = _copy(stopped, tmp_path)
    _truncate(root / "step-00000004" / SHARD)
    (root / "step-00000002" / "COMPLETE.json").unlink()  # a record lost is as bad as a file lost
    with pytest.raises(NoCompleteCheckpoint) as caught:
        _run(model_dir, data_dir, out_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"hpcft: no complete checkpoint is left in {root} (step-00000004: {SHARD}: ")
    assert "step-00000002: no COMPLETE.json" in message
    assert message.endswith(f"delete {root} to start the stage over, or restore it from a backup")
    assert _steps(root) == ["step-00000002", "step-00000004"], "damaged checkpoints are left for the user"


def test_only_unfinished_saves_start_the_stage_over(model_dir, data_dir, stopped, reference, tmp_path, capfd):
    """Steps without a record and no `latest`: the first save never finished, nothing was lost. The stage
    starts at step 0, says so, and its first save clears them."""
    out_dir, root = _copy(stopped, tmp_path)
    for step in ("step-00000002", "step-00000004"):
        (root / step / "COMPLETE.json").unlink()
    (root / "latest").unlink()
    capfd.readouterr()
    _, losses, events = _run(model_dir, data_dir, out_dir, stop_at=3)
    err = capfd.readouterr().err
    assert (
        f"hpcft: checkpoint {root / 'step-00000004'} is incomplete (no COMPLETE.json: its save did not finish); "
        "no complete checkpoint, starting the stage from step 0"
    ) in err.splitlines()
    assert [e["skipped_step"] for e in events if e.get("resume") == "skipped"] == [4, 2]
    assert not [e for e in events if "resumed_from_step" in e]
    _same_losses(losses, reference[1], [1, 2, 3])
    assert _steps(root) == ["step-00000002"]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_checkpoints_keeps_the_newest_complete_steps(model_dir, data_dir, tmp_path, keep):
    out_dir = tmp_path / "run"
    _run(model_dir, data_dir, out_dir, stop_at=STOP_AT, checkpoint_every=1, keep_checkpoints=keep)
    root = out_dir / "resume"
    assert _steps(root) == [f"step-{s:08d}" for s in range(5 - keep, 5)]
    for step in _steps(root):
        assert resume._problem(root / step) is None
    assert (root / "latest").read_text().strip() == "step-00000004"


def test_keep_checkpoints_is_at_least_one():
    assert SFTStage(name="sft").keep_checkpoints == 2
    with pytest.raises(ValidationError, match="keep_checkpoints"):
        SFTStage(name="sft", keep_checkpoints=0)


def _full_disk(monkeypatch, where: str, step: str) -> None:
    """Make the save of `step` fail with ENOSPC: writing a DCP shard (after some bytes), a rank's RNG file,
    or the completion record."""
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "shard":
        write_item = dcp_filesystem._write_item

        def failing(transforms, stream, data, *args, **kwargs):
            if step in str(getattr(stream, "name", "")):
                stream.write(b"x" * 1000)
                raise enospc
            return write_item(transforms, stream, data, *args, **kwargs)

        monkeypatch.setattr(dcp_filesystem, "_write_item", failing)
    else:
        module, name, target = {
            "rng": (dist_checkpoint, "write_synced", "rank-0-of-1.pt"),
            "record": (resume, "write_atomic", "COMPLETE.json"),
        }[where]
        original = getattr(module, name)

        def failing(path, data):
            if step in str(path) and str(path).endswith(target):
                raise enospc
            return original(path, data)

        monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("where, step", [("shard", 4), ("rng", 4), ("record", 4), ("shard", 2)])
def test_a_full_disk_during_a_save_is_a_one_line_error(
    model_dir, data_dir, reference, tmp_path, monkeypatch, where, step
):
    out_dir, name = tmp_path / "run", f"step-{step:08d}"
    root = out_dir / "resume"
    _full_disk(monkeypatch, where, name)
    with pytest.raises(CheckpointSaveError) as caught:
        _run(model_dir, data_dir, out_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"hpcft: saving checkpoint {root / name} failed: ENOSPC No space left on device; ")
    if step == 4:
        assert f"a checkpoint needs {_size(root / 'step-00000002')} (as step-00000002 did) and " in message
    else:
        assert re.search(r"a checkpoint needs at least [0-9.]+ MiB \(the state's tensors\) and ", message)
    assert re.search(r" and [0-9.]+ [KMGT]?i?B is free there", message)
    assert ("the run can resume from step-00000002" in message) == (step == 4)
    assert _steps(root) == ([] if step == 2 else ["step-00000002"]), "the partial step is removed"
    monkeypatch.undo()  # space again: the rerun resumes from the last complete step
    result, losses, events = _run(model_dir, data_dir, out_dir)
    assert not [e for e in events if e.get("resume") == "skipped"]
    first = 3 if step == 4 else 1
    assert result["resumed_from_step"] == (2 if step == 4 else None)
    _same_losses(losses, reference[1], range(first, 7))


def _small_tmpfs(mount: Path) -> None:
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {err}")


@pytest.mark.parametrize("said", ["as torch.save says it", "cause lost"])
def test_a_really_full_filesystem(model_dir, data_dir, reference, tmp_path, monkeypatch, said):
    """A 5 MiB tmpfs holds one 3 MiB checkpoint, not two: the save of step 4 fails with ENOSPC; once the
    filesystem grows the run resumes from step 2. torch.save says "RuntimeError: ... unexpected pos" with
    the OSError as its context; a peer rank's failure reaches rank 0 without that context ("cause lost",
    made here by dropping it), and then rank 0 finds ENOSPC by writing to the filesystem."""
    _small_tmpfs(tmp_path / "small")
    mount = tmp_path / "small"
    if said == "cause lost":
        write_item = dcp_filesystem._write_item

        def contextless(*args, **kwargs):
            try:
                return write_item(*args, **kwargs)
            except Exception as exc:
                bare = RuntimeError(f"as a peer's reaches rank 0: {exc}")
                bare.__context__ = None
                raise bare from None

        monkeypatch.setattr(dcp_filesystem, "_write_item", contextless)
    try:
        out_dir = mount / "run"
        root = out_dir / "resume"
        with pytest.raises(CheckpointSaveError) as caught:
            _run(model_dir, data_dir, out_dir)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"hpcft: saving checkpoint {root / 'step-00000004'} failed: ENOSPC ")
        step2 = root / "step-00000002"
        assert f"needs {_size(step2)} (as step-00000002 did) and " in message
        assert re.search(r" and (1\.9|2\.0|2\.1) MiB is free there", message), message  # 5 MiB less step 2
        assert _steps(root) == ["step-00000002"]
        notes = caught.value.__cause__.__notes__
        said_so = "RuntimeError: as a peer's reaches rank 0" if said == "cause lost" else ""
        assert len(notes) == 1 and notes[0].startswith(f"DCP save failed on rank 0: {said_so}"), notes
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        result, losses, _ = _run(model_dir, data_dir, out_dir)
        assert result["resumed_from_step"] == 2
        _same_losses(losses, reference[1], [3, 4, 5, 6])
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _two_ranks(rank, world_size, model_dir, data_dir, root):
    """dp2: a step 4 whose rank-1 RNG file is garbled (only rank 1's load fails, after DCP's collective
    load succeeded on both) is skipped by both ranks; a full disk on rank 1 alone fails the save on both."""
    dp2 = ParallelConfig(dp_shard=2, zero=1)
    _run(model_dir, data_dir, root / "dp2", dp2, stop_at=STOP_AT)
    if rank == 0:
        _garble(root / "dp2" / "resume" / "step-00000004" / "model" / "rng" / "rank-1-of-2.pt")
    engine.barrier()
    result, losses, events = _run(model_dir, data_dir, root / "dp2", dp2)
    skipped = [(e["skipped_step"], e["reason"].split(":")[0]) for e in events if e.get("resume") == "skipped"]
    if rank == 1:  # a forked rank: the patch goes with it
        _full_disk(pytest.MonkeyPatch(), "shard", "step-00000004")
    try:
        _run(model_dir, data_dir, root / "full", dp2)
        full = None
    except CheckpointSaveError as err:
        full = str(err)
    return result["resumed_from_step"], losses, skipped, full, sorted(p.name for p in (root / "full/resume").iterdir())


@pytest.mark.slow
def test_two_ranks_agree_on_the_step_they_resume_from(model_dir, data_dir, reference, tmp_path):
    per_rank = launch(_two_ranks, 2, model_dir, data_dir, tmp_path, timeout=600)
    for resumed, losses, skipped, full, left in per_rank:
        assert resumed == 2
        assert skipped == [(4, "loading it failed on rank 1")]
        _same_losses(losses, reference[1], [3, 4, 5, 6], atol=1e-5)
        assert full is not None and "step-00000004 failed: ENOSPC No space left on device" in full
        assert full == per_rank[0][3], "every rank raises rank 0's words"
        assert left == ["latest", "step-00000002"]


def _two_ranks_fill(rank, world_size, model_dir, data_dir, out_dir):
    try:
        _run(model_dir, data_dir, out_dir, ParallelConfig(dp_shard=2, zero=1))
    except CheckpointSaveError as err:
        return str(err), getattr(err.__cause__, "__notes__", [])
    return None, []


@pytest.mark.slow
def test_a_really_full_filesystem_under_two_ranks(model_dir, data_dir, tmp_path):
    """Two ranks' DCP writes into a full filesystem: both ranks stop with the same ENOSPC line, whichever rank
    failed and however torch.save put it."""
    mount = tmp_path / "small"
    _small_tmpfs(mount)
    try:
        per_rank = launch(_two_ranks_fill, 2, model_dir, data_dir, mount / "run", timeout=600)
        messages = [message for message, _ in per_rank]
        for _, notes in per_rank:  # what DCP said (which rank's write fails first, and how, varies)
            assert len(notes) == 1 and notes[0].startswith("DCP save failed on rank "), notes
        root = mount / "run" / "resume"
        assert messages[0] == messages[1] and messages[0] is not None
        assert messages[0].startswith(f"hpcft: saving checkpoint {root / 'step-00000004'} failed: ENOSPC ")
        assert _steps(root) == ["step-00000002"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_checkpoints_from_before_completion_records_still_resume(model_dir, data_dir, stopped, reference, tmp_path):
    """A run started under an hpcft without completion records: the step `latest` names (set only after a
    full save) is loaded, and checked by loading it."""
    out_dir, root = _copy(stopped, tmp_path)
    for step in ("step-00000002", "step-00000004"):
        (root / step / "COMPLETE.json").unlink()
    _, losses, events = _run(model_dir, data_dir, out_dir)
    assert [e["resumed_from_step"] for e in events if "resumed_from_step" in e] == [4]
    _same_losses(losses, reference[1], [5, 6])
