"""`hpcft data`, `logs`, `status`, `watch`, `export`, `generate` and `chat` on one real run directory (the model
and data stages of the tiny recipe through the local executor, as `hpcft data` runs them)."""

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from hpc import cli, commands
from hpc.recipe import RecipeError
from hpc.rundir import RunDir, RunLock
from tests.conftest import ROOT, TINY_RECIPE

# One real `hpcft data` run (subprocess, ~15 s idle) is shared by the module: slow as a whole.
pytestmark = pytest.mark.slow


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hpc.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env
    )


def _args(*argv):
    return cli._parser().parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cmds") / "run"
    p = _cli("data", TINY_RECIPE, "--workdir", workdir, "--set", "data.sources.0.num_rows=300")
    assert p.returncode == 0, p.stdout + p.stderr
    # the export stage's output, as a later `hpcft run` would leave it (here: the base model, untrained)
    shutil.copytree(workdir / "stages" / "model" / "hf", workdir / "stages" / "export" / "model")
    return workdir, p.stdout + p.stderr


def _console(tmp_path):
    return Console(file=open(tmp_path / "console.txt", "w"), width=200)


def test_data_shows_the_funnel_and_the_job_log_holds_the_progress_lines(run, capsys):
    workdir, out = run
    assert "chat rows: 300 in -> normalise" in out and "chat splits: train" in out and "manifest:" in out
    assert "Stats" not in out and "datatrove" not in out  # datatrove's dumps went to the stage's own log
    assert "Creating initial MLflow database tables" not in out and "alembic" not in out  # a new store, quietly
    assert (workdir / "stages" / "data" / "work" / "logs" / "datatrove.log").is_file()
    assert not any(p.name == "%j" for p in (workdir / "stages").glob("*/logs/*"))
    assert cli.cmd_logs(_args("logs", "data", "--workdir", workdir, "--stdout"), None) == 0
    log = capsys.readouterr().out
    assert "data: normalise (1/" in log and "data: manifest (" in log
    assert cli.main(["logs", "data", "--workdir", str(workdir), "--element", "1"]) == 2  # no such element


def test_status_and_watch_of_a_run_nobody_is_running(run, tmp_path):
    workdir, _ = run
    rd = RunDir(workdir)
    console = _console(tmp_path)
    assert commands.watch_local(rd, console) == 0
    console.file.close()
    text = (tmp_path / "console.txt").read_text()
    assert "nothing is running" in text and "manifest (" in text
    assert re.search(r"│ data\s+│ done\s+│", text) and re.search(r"│ sft\s+│ not done\s+│", text)


def test_watch_follows_a_run_until_its_lock_is_released(run, tmp_path):
    workdir, _ = run
    rd = RunDir(workdir)
    console = _console(tmp_path)
    result = {}
    with RunLock(rd.root).acquire():
        watcher = threading.Thread(target=lambda: result.update(code=commands.watch_local(rd, console, 0.1)))
        watcher.start()
        time.sleep(1.0)
        assert watcher.is_alive()  # a local run in progress is followed, not left at once
    watcher.join(timeout=20)
    console.file.close()
    assert not watcher.is_alive() and result["code"] == 1  # the run ended before the train stages
    assert "following the run" in (tmp_path / "console.txt").read_text()
    assert "stages not done: sft, export, eval, gate" in (tmp_path / "console.txt").read_text()


def test_export_copies_the_model_or_refuses_an_adapter_a_full_run_does_not_keep(run, tmp_path):
    workdir, _ = run
    assert commands.cmd_export(_args("export", workdir, "--out", tmp_path / "m"), _console(tmp_path)) == 0
    assert (tmp_path / "m" / "config.json").read_bytes() == (
        workdir / "stages" / "export" / "model" / "config.json"
    ).read_bytes()
    with pytest.raises(RecipeError, match="--adapter-only: stage 'sft' of .* has no checkpoint yet"):
        commands.cmd_export(_args("export", workdir, "--out", tmp_path / "a", "--adapter-only"), None)


def test_adapter_only_copies_the_lora_checkpoint(run, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel.checkpoint import save_checkpoint

    workdir, _ = run
    base = workdir / "stages" / "model" / "hf"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    checkpoint = workdir / "stages" / "sft" / "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(base)
    argv = ("export", workdir, "--out", tmp_path / "a", "--adapter-only")
    save_checkpoint(model.get_base_model(), tokenizer, checkpoint, base_model_dir=base, mode="full")
    with pytest.raises(RecipeError, match="trained mode 'full': it keeps no LoRA adapter"):
        commands.cmd_export(_args(*argv), None)
    shutil.rmtree(checkpoint)
    save_checkpoint(model, tokenizer, checkpoint, base_model_dir=base, mode="lora")
    try:
        assert (
            commands.cmd_export(_args("export", workdir, "--out", tmp_path / "a", "--adapter-only"), _console(tmp_path))
            == 0
        )
        assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 2
        assert not (tmp_path / "a" / "config.json").exists()  # the adapter, not a model
    finally:
        shutil.rmtree(checkpoint)


def test_generate_from_the_registry_in_the_training_template(run, tmp_path, capsys):
    from eval import lineage, registry
    from eval.gate import Verdict
    from hpc.tracking import Tracker

    workdir, _ = run
    rd = RunDir(workdir)
    client = Tracker(rd.read_meta()["tracking_uri"]).client
    model_dir = workdir / "stages" / "export" / "model"
    tags = {lineage.RUN_DIR: str(workdir)}
    registry.register_candidate(
        client, "cmds", model_dir, rd.read_meta()["parent_run_id"], {"x/acc": 1.0}, Verdict(True), tags
    )
    test_rows = [json.loads(line) for line in next((workdir / "stages" / "data" / "test").glob("*.jsonl")).open()][:4]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"messages": row["messages"][:1], "id": row["id"]}) + "\n" for row in test_rows[:2])
        + "".join(json.dumps({"prompt": row["messages"][0]["content"]}) + "\n" for row in test_rows[2:])
    )
    answers = {}
    for batch in (1, 3):
        out = tmp_path / f"answers{batch}.jsonl"
        argv = ["generate", "models:/cmds@staging", "--workdir", workdir, "--prompts", prompts, "--out", out]
        assert (
            commands.cmd_generate(_args(*argv, "--max-new-tokens", 6, "--batch-size", batch), _console(tmp_path)) == 0
        )
        answers[batch] = [json.loads(line) for line in out.read_text().splitlines()]
    assert answers[1] == answers[3]  # greedy, and left padding changes nothing
    assert [row.get("id") for row in answers[1]] == [test_rows[0]["id"], test_rows[1]["id"], None, None]
    assert all(isinstance(row["answer"], str) for row in answers[1])
    model = commands.Model(*commands.resolve_model("models:/cmds@staging", None, workdir))
    for row in test_rows:  # the prompt is the training text up to the answer
        assert row["text"].startswith(model.render(row["messages"][:1]))
        assert row["text"][len(model.render(row["messages"][:1])) :].startswith(row["messages"][1]["content"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt"}\n')
    assert cli.main(["generate", str(model_dir), "--prompts", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "line 1: needs a `prompt` string or a `messages` list" in capsys.readouterr().err


def _read_until(fd, needle: bytes, timeout: float = 60.0) -> bytes:
    seen = b""
    deadline = time.time() + timeout
    while needle not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise AssertionError(f"no {needle!r} in {seen[-500:]!r}")
        seen += os.read(fd, 4096)
    return seen


def test_chat_streams_answers_through_a_terminal(run):
    workdir, _ = run
    model_dir = workdir / "stages" / "export" / "model"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the pty as a user's terminal
        os.environ["PYTHONPATH"] = str(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "hpc.cli", "chat", str(model_dir), "--max-new-tokens", "6"])
    try:
        _read_until(fd, b"you>")
        os.write(fd, b"Add 2 and 3.\n")
        reply = _read_until(fd, b"you>")
        assert b"model>" in reply
        answer = reply.split(b"model>", 1)[1].rsplit(b"you>", 1)[0]
        assert answer.strip()  # the streamed tokens
        os.write(fd, b"/reset\n")
        assert b"history cleared" in _read_until(fd, b"you>")
        os.write(fd, b"/exit\n")
        assert b"bye" in _read_until(fd, b"bye")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert Path(model_dir).is_dir()
