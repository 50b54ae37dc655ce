"""Runs a plan: skip up-to-date stages, run the rest through an executor (stage by stage, or all submitted at
once and then watched), report, return an exit code."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data_tools.secrets import redact_text
from hpc import executors
from hpc.executor import BlockingExecutor, StageFailed, SubmitError, SubmittingExecutor
from hpc.plan import StageSpec, build_plan
from hpc.progress import PipelineView, start_attempt
from hpc.recipe import Recipe, RecipeError
from hpc.rundir import RunDir, RunLock, make_private_dir, private_umask, read_json
from hpc.tracking import Tracker, TrackingError, queue_path, replay_queue, resolve_uri, unreachable, unreachable_message
from training.stages import KINDS as STAGE_KINDS

EXIT_OK, EXIT_FAILED, EXIT_BAD_RECIPE, EXIT_REJECTED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: running local jobs were stopped


def prepare_run(recipe: Recipe, recipe_path: Path, rd: RunDir) -> dict:
    """Snapshot the recipe and create (or reuse) the MLflow parent run; returns run.json. Sets the process
    umask to $HPCFT_UMASK (default 077) first: the run directory, mlflow.db and the jobs' files (submitted
    jobs inherit it) are not readable by other users. First of all an http(s) tracking server must answer
    within seconds (else RecipeError, one line); then the tracking calls queued while it was away are
    replayed."""
    from eval.lineage import git_commit

    uri = resolve_uri(recipe.tracking.uri, rd.root)
    reason = unreachable(uri)
    if reason:
        raise RecipeError([unreachable_message(uri, reason)])
    private_umask()
    rd.write_recipe(recipe)
    meta = rd.read_meta()
    if queue_path(rd.root).is_file():  # the queued calls name runs of the store the run has used so far
        replay(rd, Tracker(meta.get("tracking_uri") or uri))
    fields = {
        "recipe_hash": recipe.hash(),
        "git_commit": git_commit(Path(__file__).parent),
        "base_dir": str(Path(recipe_path).resolve().parent),
        "tracking_uri": uri,
        "recipe_path": str(Path(recipe_path).resolve()),
    }
    if (
        meta.get("tracking_uri") != uri
        or meta.get("recipe_hash") != fields["recipe_hash"]
        or "parent_run_id" not in meta
    ):
        tracker = Tracker(uri)
        run_id = uuid.uuid4().hex[:12]
        parent = tracker.start_parent(
            recipe.tracking.experiment,
            rd.root / "mlartifacts",
            f"{recipe.name}-{run_id}",
            recipe.model_dump(mode="json"),
            {
                "hpcft.recipe_hash": fields["recipe_hash"],
                "hpcft.git_commit": fields["git_commit"],
                "hpcft.run_dir": str(rd.root),
            },
        )
        import yaml

        from hpc.tracking import redact

        redacted = rd.root / "recipe.redacted.yaml"
        redacted.write_text(yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False))
        tracker.log_artifact(parent, redacted)
        fields |= {"run_id": run_id, "parent_run_id": parent, "child_runs": {}}
    return rd.update_meta(**fields)


def replay(rd: RunDir, tracker: Tracker) -> None:
    """Replay the run directory's queued tracking calls (hpc.tracking.replay_queue), saying what it did."""
    replayed, dropped, left = replay_queue(queue_path(rd.root), tracker)
    if replayed or dropped or left:
        print(
            f"tracking: replayed {replayed} queued MLflow call(s)"
            + (f", dropped {dropped} MLflow rejected" if dropped else "")
            + (f", {left} still queued" if left else ""),
            flush=True,
        )


def run_pipeline(
    recipe: Recipe,
    recipe_path: Path,
    workdir: Path,
    only: str | None = None,
    console: Console | None = None,
    detach: bool = False,
    through: str | None = None,
) -> int:
    """`through`: run the plan up to and including that stage (blocking executors; `hpcft data`)."""
    console = console or Console()
    rd = RunDir(workdir)
    plan = build_plan(recipe)
    if through:
        plan = plan[: [s.name for s in plan].index(through) + 1]
    names = [s.name for s in plan]
    if only and only not in names:
        raise RecipeError([f"--only: unknown stage {only!r}; stages: {', '.join(names)}"])
    if only:
        missing = [s.name for s in plan[: names.index(only)] if not rd.stage_done(s)]
        if missing:
            raise RecipeError(
                [
                    f"--only {only}: earlier stages have no current outputs ({', '.join(missing)});"
                    " run the pipeline without --only first"
                ]
            )
    ex = executors.get(recipe.executor)
    problems = ex.check(recipe, plan)
    if problems:
        raise RecipeError(problems)
    if detach and not ex.submits:
        submitting = executors.submitting()
        raise RecipeError(
            [
                f"--detach: only the {' or '.join(submitting)} executor runs without the CLI;"
                f" set executor.kind={submitting[0]}"
            ]
        )
    private_umask()
    make_private_dir(rd.root)
    with RunLock(rd.root).acquire(rd.read_meta().get("run_id")) as lock:  # one writer; RecipeError if held
        if lock.note:
            console.print(lock.note, markup=False, highlight=False)
        moved = rd.follow_move() if resolve_uri(recipe.tracking.uri, rd.root) == rd.embedded_uri() else None
        if moved:
            console.print(f"run directory moved from {moved}: its MLflow store now points here", highlight=False)
        earlier = rd.read_meta()  # before prepare_run, which starts a new parent run for a changed recipe
        meta = prepare_run(recipe, recipe_path, rd)
        lock.update(run_id=meta.get("run_id"))
        tracker = Tracker(meta["tracking_uri"])
        uri = redact_text(meta["tracking_uri"])[0]
        console.print(f"run directory: {rd.root}\ntracking: {uri} (parent run {meta['parent_run_id']})")
        if isinstance(ex, SubmittingExecutor):
            return _submit(ex, recipe, plan, rd, tracker, console, only, detach)
        if not executors.submitted_by(earlier):  # nothing of this run can still be running: it holds the lock
            _end_left_running(tracker, earlier)
        return _run_blocking(ex, plan, rd, tracker, console, only)


def _end_left_running(tracker: Tracker, meta: dict) -> None:
    """Child runs an earlier attempt left RUNNING (its CLI was killed with -9, its jobs stopped themselves):
    marked KILLED. Called with the run lock held, so no job of this run directory is running."""
    for run_id in (meta.get("child_runs") or {}).values():
        try:
            running = tracker.client.get_run(run_id).info.status == "RUNNING"
        except Exception:  # noqa: BLE001 - e.g. a run deleted by hand
            continue
        if running:
            tracker.end_run(run_id, "KILLED")


def _submit(
    ex: SubmittingExecutor,
    recipe: Recipe,
    plan: list[StageSpec],
    rd: RunDir,
    tracker: Tracker,
    console: Console,
    only: str | None,
    detach: bool,
) -> int:
    """Submit every pending stage at once, then watch the run (or return at once with --detach)."""
    try:
        configs = {s.name: s.config for s in plan}
        submitted = ex.submit(recipe, plan, rd, lambda name: _start_child(rd, tracker, name, configs[name]), only)
    except SubmitError as err:
        console.print(f"[red bold]stage {err.stage} could not be submitted[/]: {err.message}\n{err.detail}")
        return EXIT_FAILED
    for name, job in submitted.items():
        console.print(
            f"submitted {name}: job {job['job_id']}"
            + (f" ({len(job['job_ids'])} array elements)" if len(job["job_ids"]) > 1 else "")
        )
    if detach:
        console.print(f"detached; follow with: hpcft watch --workdir {rd.root}")
        return EXIT_OK
    return watch(rd, console, tracker)


def _run_blocking(
    ex: BlockingExecutor, plan: list[StageSpec], rd: RunDir, tracker: Tracker, console: Console, only: str | None
) -> int:
    """Run the stages one after the other in this CLI, skipping up-to-date ones."""
    tracker = tracker.tolerant(queue_path(rd.root))  # ending runs queued when MLflow is away (watch: same)
    with PipelineView(plan, rd.progress_path, console) as view:
        for spec in plan:
            if only and spec.name != only:
                view.skip(spec) if rd.stage_done(spec) else None
                continue
            if rd.stage_done(spec) and not only:
                view.skip(spec)
                continue
            try:
                _run_one(spec, rd, ex, tracker, view, force=bool(only))
            except StageFailed as err:
                view.finish(spec, ok=False)
                _report_failure(console, err, rd)
                _end_parent(rd, tracker, "FAILED")
                return EXIT_FAILED
            except TrackingError as err:  # the stage's MLflow run could not be opened: nothing of it ran
                view.state[spec.name], view.detail[spec.name] = "failed", "not started (MLflow)"
                view.refresh()
                console.print(
                    f"[red bold]stage {spec.name} not started[/]: {err.message}; start it and run the same"
                    " command again (finished stages are kept)",
                    highlight=False,
                )
                _end_parent(rd, tracker, "FAILED")
                return EXIT_FAILED
            except KeyboardInterrupt:
                view.finish(spec, ok=False, note="interrupted")
                console.print(
                    f"[yellow]interrupted during {spec.name}[/]: its running jobs were stopped; "
                    "run the same command again to resume (finished stages are kept)"
                )
                _end_parent(rd, tracker, "KILLED")
                return EXIT_INTERRUPTED
    _end_parent(rd, tracker, "FINISHED")
    if plan[-1].name != "gate":  # a partial plan (`hpcft data`): no verdict to show
        return EXIT_OK
    return _final(rd, console, only)


def _end_parent(rd: RunDir, tracker: Tracker | None, status: str) -> None:
    """End the MLflow parent run. Without a tracker (`hpcft status` of a submitted run that it sees end),
    only a parent still RUNNING is ended, so that looking again does not move its end time."""
    meta = rd.read_meta()
    parent = meta.get("parent_run_id")
    if not parent:
        return
    if tracker is None:
        tracker = Tracker(meta["tracking_uri"], queue=queue_path(rd.root))
        try:
            if tracker.client.get_run(parent).info.status != "RUNNING":
                return
        except Exception:  # noqa: BLE001 - MLflow away: queued like any other call
            pass
    tracker.end_run(parent, status)  # never raises


def _final(rd: RunDir, console: Console, only: str | None = None) -> int:
    if only and only != "gate":
        return EXIT_OK
    gate = read_json(rd.stage_dir("gate") / "result.json")
    print_summary(console, gate)
    return EXIT_OK if gate["passed"] else EXIT_REJECTED


def _start_child(rd: RunDir, tracker: Tracker, name: str, config: dict | None = None) -> str:
    """The stage's MLflow child run, its section of the recipe (StageSpec.config) as params."""
    meta = rd.read_meta()
    child = tracker.start_child(meta["parent_run_id"], name, config)
    rd.update_meta(child_runs=meta.get("child_runs", {}) | {name: child})
    return child


def watch(rd: RunDir, console: Console, tracker: Tracker | None = None, once: bool = False) -> int:
    """Follow a submitted pipeline until the gate finishes or a stage fails."""
    recipe = rd.load_recipe()
    plan = build_plan(recipe)
    meta = rd.read_meta()
    if tracker:  # tracking calls that fail while watching are queued; earlier ones are replayed now
        replay(rd, tracker.tolerant(queue_path(rd.root)))
    ex, jobs = executors.submitted_by(meta, recipe.executor) or (None, {})
    finished: set[str] = set()
    with PipelineView(plan, rd.progress_path, console) as view:
        for spec in plan:
            if spec.name not in jobs and rd.stage_done(spec):
                view.skip(spec)
                finished.add(spec.name)
        while True:
            states = ex.states(jobs) if jobs else {}
            for spec in plan:
                job = jobs.get(spec.name)
                if job is None or spec.name in finished:
                    continue
                st = states[spec.name]
                view.jobs[spec.name] = st.summary
                if rd.stage_done(spec):
                    if view.state[spec.name] != "running":
                        view.start(spec, ex.name)
                    view.finish(spec, ok=True, note=stage_note(rd, spec), lines=data_funnel(rd, spec))
                    finished.add(spec.name)
                    if tracker and spec.name in meta.get("child_runs", {}):
                        tracker.end_run(meta["child_runs"][spec.name], "FINISHED")
                    continue
                if view.state[spec.name] == "pending" and st.running:
                    view.start(spec, ex.name)
                err = ex.failure(spec.name, job, st)
                if err:
                    view.finish(spec, ok=False)
                    _report_failure(console, err, rd)
                    cancelled = [
                        s.name for s in plan if s.name in jobs and s.name not in finished and s.name != spec.name
                    ]
                    if cancelled:
                        console.print(f"dependent stages not run: {', '.join(cancelled)}")
                    if tracker and spec.name in meta.get("child_runs", {}):
                        tracker.end_run(meta["child_runs"][spec.name], "FAILED")  # never raises
                    _end_parent(rd, tracker, "FAILED")
                    return EXIT_FAILED
            view.refresh()
            if set(jobs) <= finished or once:
                break
            time.sleep(2)
    if not set(jobs) <= finished or "gate" not in jobs:  # one look, or a partial (--only) submission
        return EXIT_OK
    _end_parent(rd, tracker, "FINISHED")
    return _final(rd, console)


def _run_one(spec: StageSpec, rd: RunDir, ex, tracker: Tracker, view: PipelineView, force: bool) -> None:
    if force:
        rd.clear_markers(spec)
    pending = [i for i in range(len(spec.elements)) if not rd.element_done(spec, i)]
    start_attempt(
        rd.progress_path(spec.name), spec.name, spec.input_hash
    )  # history kept: readers show the latest attempt
    child = _start_child(rd, tracker, spec.name, spec.config)
    view.start(spec, ex.name)
    try:
        ex.run(spec, rd, pending, poll=view.refresh)
    except StageFailed:
        tracker.end_run(child, "FAILED")  # never raises: the stage report must reach the user
        raise
    except KeyboardInterrupt:
        tracker.end_run(child, "KILLED")
        raise
    tracker.end_run(child, "FINISHED")
    view.finish(spec, ok=True, note=stage_note(rd, spec), lines=data_funnel(rd, spec))


def data_funnel(rd: RunDir, spec: StageSpec) -> list[str]:
    """The data stage's funnel (rows in -> kept per step), shown when it ends."""
    from hpc.progress import funnel_lines

    manifest = rd.stage_dir(spec.name) / "manifest.json"
    return funnel_lines(read_json(manifest)) if spec.kind == "data" and manifest.is_file() else []


def stage_note(rd: RunDir, spec: StageSpec) -> str:
    if spec.is_array:
        return f"{len(spec.elements)} elements"
    res = read_json(rd.stage_dir(spec.name) / "result.json")
    if spec.kind in STAGE_KINDS:
        shown = [
            (label, res[key])
            for label, key in (
                ("loss", "final_loss"),
                ("val", "val_loss"),
                ("val acc", "val_accuracy"),
                ("reward", "val_reward"),
            )
            if isinstance(res.get(key), (int, float))
        ]
        return "  ".join(f"{label} {value:.4f}" for label, value in shown)
    if spec.kind == "data":
        return "  ".join(f"{k} {v}" for k, v in (res.get("splits") or {}).items())
    if spec.kind == "gate":
        return res.get("status") or ("passed" if res["passed"] else "rejected")
    return ""


def _report_failure(console: Console, err: StageFailed, rd: RunDir | None = None) -> None:
    from hpc.errors import ERROR_PREFIX, disk_full

    console.print(f"[red bold]stage {err.stage} failed[/] (element {err.element})")
    if err.log_path:
        console.print(f"log: {err.log_path}")
    full = disk_full(rd.stage_dir(err.stage)) if rd is not None else None
    if full and not err.tail.startswith(ERROR_PREFIX):  # the job could not say so: its log is on that disk
        console.print(ERROR_PREFIX + f"stage {err.stage} failed: {full}", markup=False, highlight=False)
        return
    console.print(err.tail, markup=False, highlight=False)


def print_summary(console: Console, gate: dict) -> None:
    scores = gate["scores"]
    champion = gate.get("champion_scores") or {}
    table = Table(title="evaluation")
    table.add_column("metric")
    for col in ("base", "candidate", f"champion (v{gate['champion_version']})" if champion else "champion"):
        table.add_column(col, justify="right")
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for metric in sorted(scores["candidate"]):
        table.add_row(
            metric, fmt(scores.get("base", {}).get(metric)), fmt(scores["candidate"][metric]), fmt(champion.get(metric))
        )
    console.print(table)
    verdict = "[green bold]PASSED" if gate["passed"] else "[red bold]REJECTED"
    if gate.get("status") == "pending_review":  # gate.require_human: `hpcft registry import-verdicts` decides
        verdict = "[yellow bold]PENDING REVIEW (side-by-side verdicts needed)"
    console.print(f"gate: {verdict}")
    for reason in gate["reasons"]:
        console.print(f"  - {reason}", markup=False)
    alias = f", alias '{gate['alias']}'" if gate.get("alias") else ""
    console.print(f"registered model: {gate['registered_model']} version {gate['version']}{alias}")
