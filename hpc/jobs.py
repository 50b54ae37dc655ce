"""The job entry point: every executor runs `run_stage(run_root, stage, index)` wherever the job lands.

It loads the recipe snapshot from the run directory, calls the stage's library function with typed config
and paths, streams progress to `progress.jsonl` and MLflow, and writes the element's completion marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpc.errors import ERROR_PREFIX, StageError, describe_os_error, disk_full
from hpc.plan import StageSpec, build_plan, eval_elements
from hpc.recipe import Recipe, resolve_path
from hpc.rundir import RunDir, private_umask, read_json, write_json
from hpc.tracking import Tracker, TrackingError, queue_path, quiet_env, shown_uri, system_metrics, unreachable
from training.stages import KINDS as STAGE_KINDS
from training.stages import previous as previous_stage


@dataclass
class StageContext:
    rd: RunDir
    recipe: Recipe
    spec: StageSpec
    index: int
    out_dir: Path
    tracker: Tracker
    run_id: str  # this stage's MLflow child run
    base_dir: Path  # the recipe file's directory: relative paths resolve against it
    leader: bool = True  # rank 0 of a multi-process job (the one that reports and writes shared files)
    datatrove: Callable | None = None  # the executor's datatrove_ranks(recipe, spec, out_dir), see run_stage
    echo: bool = True  # print progress lines to stdout (the job's log); not when the job runs inside the CLI

    def progress(self, event: dict) -> None:
        event = {"t": time.time(), "stage": self.spec.name, "element": self.spec.elements[self.index]} | event
        with open(self.rd.progress_path(self.spec.name), "a") as f:
            f.write(json.dumps(event, default=str) + "\n")
        if self.echo:  # `hpcft logs --stdout`, `tail -f` of a Slurm .out: each event as it is logged
            from hpc.progress import describe

            line = describe(event)
            if line:
                print(f"[{time.strftime('%H:%M:%S')}] {self.spec.name}: {line}", flush=True)
        if "step" in event and isinstance(event["step"], int):
            metrics = {k: v for k, v in event.items() if k not in ("t", "step", "max_steps", "element")}
            self.tracker.log_metrics(self.run_id, metrics, step=event["step"])

    def base_model_dir(self) -> Path:
        return base_model_dir(self.rd)

    def output_of(self, stage: str) -> Path:
        return self.rd.stage_dir(stage)


def _model(ctx: StageContext) -> dict:
    from eval.lineage import hash_dir

    cfg = ctx.recipe.model
    extra = {}
    if cfg.tiny:
        from parallel.tiny import build_tiny_model

        path = build_tiny_model(cfg.tiny, ctx.out_dir / "hf", seed=cfg.seed)
    elif cfg.gguf:
        path, extra = _gguf_model(ctx)
    else:
        path = resolve_path(cfg.path, ctx.base_dir)
    model_hash = hash_dir(path)
    if cfg.gguf:  # the lineage names the GGUF file too, not only what this transformers made of it
        model_hash = hashlib.sha256(f"gguf:{extra['gguf']['sha256']}\0hf:{model_hash}".encode()).hexdigest()
    info = {"path": ctx.rd.relative(path), "hash": model_hash, "tiny": cfg.tiny} | extra
    write_json(ctx.out_dir / "model.json", info)
    return info


def _gguf_model(ctx: StageContext) -> tuple[Path, dict]:
    """model.gguf converted into a plain Hugging Face directory `hf/` in the stage's directory; a file that
    cannot be found or loaded fails the stage with one line (e.g. which package to install)."""
    from data_tools.splits import sha256_file
    from parallel.gguf import GGUFError, convert_gguf, resolve_gguf

    cfg = ctx.recipe.model
    try:
        source = resolve_gguf(cfg.gguf, ctx.base_dir)
        sha = sha256_file(source)
        path = convert_gguf(source, ctx.out_dir / "hf", dtype=cfg.dtype or "float32")
    except GGUFError as err:
        message = f"stage model failed: model.gguf: {err}"
        print(ERROR_PREFIX + message, file=sys.stderr, flush=True)
        raise StageError(message) from None
    return path, {"gguf": {"file": str(source), "sha256": sha, "dtype": cfg.dtype or "float32"}}


def base_model_dir(rd: RunDir) -> Path:
    """The model stage's model: model.json's path, relative to the run directory when the model is inside it
    (a moved or copied run directory finds it in its new place), absolute for a user's model elsewhere."""
    return rd.resolve(read_json(rd.stage_dir("model") / "model.json")["path"], under="stages/model")


def _data(ctx: StageContext) -> dict:
    from data_tools.stage import run_data

    manifest = run_data(
        ctx.recipe.data,
        ctx.base_model_dir(),
        ctx.out_dir,
        base_dir=ctx.base_dir,
        executor_factory=_datatrove_factory(ctx),
        progress=ctx.progress,
    )
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "manifest.json")
    splits = manifest.get("splits", {})
    ctx.tracker.log_metrics(ctx.run_id, {f"rows.{k}": v for k, v in splits.items() if isinstance(v, (int, float))})
    kinds = [("", manifest.get("steps"))] + [
        (f"{k}/", manifest.get(k, {}).get("steps")) for k in ("preference", "unpaired")
    ]
    for kind, steps in kinds:
        for i, (metrics, kept) in enumerate(funnel_metrics(steps or {}, kind)):
            ctx.tracker.log_metrics(ctx.run_id, metrics | {f"{kind}funnel.rows_kept": kept}, step=i)
        if scores := score_metrics(steps or {}, kind):
            ctx.tracker.log_metrics(ctx.run_id, scores)
    ctx.tracker.set_tags(ctx.run_id, {"hpcft.data_manifest_hash": manifest.get("manifest_hash", "")})
    ctx.tracker.log_dataset(ctx.rd.read_meta()["parent_run_id"], data_input(ctx.recipe, ctx.out_dir, manifest))
    return {"manifest_hash": manifest.get("manifest_hash"), "splits": splits}


def funnel_metrics(steps: dict, prefix: str = "") -> list[tuple[dict[str, int], int]]:
    """Per data step in order, its metrics (`<prefix>funnel/<step>/in|kept|rejected|reasons/<reason>`) and
    the rows it kept (the `funnel.rows_kept` series charts the funnel)."""
    from eval.registry import tag_key  # the characters MLflow takes in a key

    out = []
    for name, st in steps.items():
        metrics = {tag_key(f"{prefix}funnel/{name}/{k}"): st[k] for k in ("in", "kept", "rejected") if k in st}
        metrics |= {tag_key(f"{prefix}funnel/{name}/reasons/{r}"): n for r, n in (st.get("reasons") or {}).items()}
        out.append((metrics, st.get("kept", 0)))
    return out


def score_metrics(steps: dict, prefix: str = "") -> dict[str, float]:
    """The model-based filters' score distributions (language, perplexity, classifier: count, mean,
    percentiles, and the percentile bounds a keep_percentiles filter used) as
    `<prefix>scores/<step>/<statistic>`; the histograms stay in the manifest artifact."""
    from eval.registry import tag_key

    metrics = {}
    for name, st in steps.items():
        scores = st.get("scores") or {}
        for key, value in scores.items():
            if key != "histogram":
                metrics[tag_key(f"{prefix}scores/{name}/{key}")] = value
        for bound, value in zip(("lower_bound", "upper_bound"), st.get("bounds") or ()):
            metrics[tag_key(f"{prefix}scores/{name}/{bound}")] = value
    return metrics


def data_input(recipe: Recipe, data_dir: Path, manifest: dict) -> dict:
    """The data stage's output as an MLflow dataset input (Tracker.log_dataset): MLflow keeps digests of at
    most 36 characters, so the digest is the manifest hash's first 36; the profile has all of it."""
    full = manifest.get("manifest_hash", "")
    splits = {k: v for k, v in manifest.get("splits", {}).items() if isinstance(v, int)}
    pairs = {k: v for k, v in manifest.get("preference", {}).get("splits", {}).items() if isinstance(v, int)}
    profile = {"num_rows": sum(splits.values()) + sum(pairs.values()), "splits": splits, "manifest_hash": full}
    if pairs:
        profile["preference_splits"] = pairs
    return {"name": f"{recipe.name}-data", "digest": full[:36], "source": str(data_dir), "profile": profile}


def _datatrove_factory(ctx: StageContext):
    """Where the data stage's datatrove ranks run: what the executor running this job handed run_stage
    (e.g. Slurm job arrays); None: datatrove's local process pool inside this job."""
    return ctx.datatrove(ctx.recipe, ctx.spec, ctx.out_dir) if ctx.datatrove else None


def _train(ctx: StageContext) -> dict:
    """Any training stage: its runner from training.stages, started from the previous policy's output."""
    from training.stages import KINDS

    stages = ctx.recipe.stages
    index = next(i for i, s in enumerate(stages) if s.name == ctx.spec.name)
    stage, kind = stages[index], KINDS[stages[index].kind]
    seed = stage.seed if stage.seed is not None else ctx.recipe.seed
    extra = {"source_weights": source_weights(ctx.recipe)}
    if kind.uses_reward_model:
        reward = previous_stage(stages, index, policy=False)
        extra["reward_model_dir"] = ctx.output_of(reward.name) / "checkpoint" if reward else None
    _keep_resume_state(ctx)
    if ctx.leader:
        manifest = read_json(ctx.output_of("data") / "manifest.json")
        ctx.tracker.log_dataset(ctx.run_id, data_input(ctx.recipe, ctx.output_of("data"), manifest))
    # The leader samples its node's system metrics (GPU utilisation and memory) into the stage's run.
    setting = ctx.recipe.tracking.system_metrics if ctx.leader else "off"
    with system_metrics(ctx.tracker, ctx.run_id, setting):
        result = kind.load_runner()(
            stage,
            model_dir=_start_model(ctx, index),
            data_dir=_data_dir(ctx, kind.data),
            out_dir=ctx.out_dir,
            parallel=_parallel(ctx),
            seed=seed,
            progress=ctx.progress,
            **extra,
        )
    if ctx.leader:
        log_result(ctx.tracker, ctx.run_id, result, "final.")
    return result  # the runner has discarded its resume state


def _parallel(ctx: StageContext):
    """The recipe's parallel section with a ds_config path resolved against the recipe's directory."""
    parallel = ctx.recipe.parallel
    if parallel.deepspeed_config:
        resolved = str(resolve_path(parallel.deepspeed_config, ctx.base_dir))
        parallel = parallel.model_copy(update={"deepspeed_config": resolved})
    return parallel


# Numbers in a stage's result.json that describe the run rather than measure it: params, never metrics.
RESULT_FACTS = frozenset(
    {"seed", "world_size", "total_params", "trainable_params", "params", "resumed_from_step", "steps", "data"}
)


def log_result(tracker: Tracker, run_id: str, result: dict, prefix: str = "") -> None:
    """A stage's result in its run: measurements as metrics `<prefix><key>` (nested ones `<key>/<inner>`),
    RESULT_FACTS and the other non-numbers as params `result.<key>`."""
    facts = {k: v for k, v in result.items() if k in RESULT_FACTS or not _has_number(v)}
    tracker.log_params(run_id, {"result": facts})
    tracker.log_metrics(run_id, {prefix + k: v for k, v in _numbers(result).items() if k.split("/")[0] not in facts})


def _has_number(value) -> bool:
    return bool(_numbers({"v": value}))


def _numbers(obj: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out |= _numbers(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = v
    return out


def source_weights(recipe) -> dict[int, float] | None:
    """data.sources.<i>.weight by source index (None when no source sets one): the training stages mix
    with them, so they are part of the training stages' inputs, not the data stage's."""
    weights = {i: src.weight for i, src in enumerate(recipe.data.sources) if src.weight is not None}
    return weights or None


def _keep_resume_state(ctx: StageContext) -> None:
    """Keep `resume/` (the stage's periodic training-state checkpoints) only if the same stage config and
    inputs wrote it; any rank may resume from it once this returns (collective)."""
    from parallel import engine
    from training.resume import discard, resume_dir

    resume = resume_dir(ctx.out_dir)
    key_file = resume / "key"
    if ctx.leader and (not key_file.is_file() or key_file.read_text().strip() != ctx.spec.resume_key):
        if resume.exists():
            ctx.progress({"resume": "discarded", "reason": "stage config or inputs changed"})
            discard(ctx.out_dir)
        resume.mkdir(parents=True)
        key_file.write_text(ctx.spec.resume_key + "\n")
    engine.barrier()


def _data_dir(ctx: StageContext, rows: str) -> Path:
    """The data stage's splits a stage reads: chat rows at the top, preference pairs under preference/,
    unpaired rows under unpaired/; prompts come from the chat rows when there are any."""
    from data_tools.splits import has_rows

    data = ctx.output_of("data")
    if rows in ("preference", "unpaired"):
        return data / rows
    if rows == "prompts" and not has_rows(data, "train"):
        return data / "preference"
    return data


def start_model_dir(rd: RunDir, stages: list, index: int, base_model_dir: Path) -> Path:
    """Where stages[index] starts: the base model, or (after a policy stage) that stage's merged export."""
    return (
        base_model_dir
        if previous_stage(stages, index, policy=True) is None
        else rd.stage_dir(stages[index].name) / "start_model"
    )


def _start_model(ctx: StageContext, index: int) -> Path:
    """Export the previous policy stage's checkpoint (LoRA merged) as a plain model to start from; under
    several ranks rank 0 writes it and the others wait."""
    from parallel import engine
    from parallel.export import export_hf

    stages = ctx.recipe.stages
    before = previous_stage(stages, index, policy=True)
    target = start_model_dir(ctx.rd, stages, index, ctx.base_model_dir())
    if before is None:
        return target
    if engine.is_leader():
        prev_index = stages.index(before)
        export_hf(
            start_model_dir(ctx.rd, stages, prev_index, ctx.base_model_dir()),
            ctx.output_of(before.name) / "checkpoint",
            target,
        )
    engine.barrier()
    return target


def _export(ctx: StageContext) -> dict:
    from parallel.export import export_hf
    from training.stages import last_policy

    stages = ctx.recipe.stages
    policy = last_policy(stages)
    start = start_model_dir(ctx.rd, stages, stages.index(policy), ctx.base_model_dir())
    result = export_hf(start, ctx.output_of(policy.name) / "checkpoint", ctx.out_dir / "model")
    log_result(ctx.tracker, ctx.run_id, result)
    return result


def _eval(ctx: StageContext) -> dict:
    from eval.runner import run_task

    element = eval_elements(ctx.recipe)[ctx.index]
    task, who = element.task, element.model
    model_dir = ctx.output_of("export") / "model" if who == "candidate" else ctx.base_model_dir()
    if task.kind == "judge":
        return _judge(ctx, task.judge, who, model_dir)
    scores = run_task(task, model_dir, ctx.output_of("data"), ctx.out_dir, ctx.recipe.eval, progress=ctx.progress)
    ctx.tracker.log_metrics(ctx.run_id, {f"{who}/{task.label}/{k}": v for k, v in scores.items()})
    _log_element_files(ctx, ("results.json", "samples.jsonl"))  # lm-eval's results and per-example answers
    return {"task": task.label, "model": who, "scores": scores}


def _log_element_files(ctx: StageContext, names: tuple[str, ...]) -> None:
    """An eval element's files as artifacts `eval/<element>/` of the parent run, for review."""
    parent = ctx.rd.read_meta()["parent_run_id"]
    for name in names:
        if (ctx.out_dir / name).is_file():
            ctx.tracker.log_artifact(parent, ctx.out_dir / name, f"eval/{ctx.out_dir.name}")


def _judge(ctx: StageContext, spec, who: str, model_dir: Path) -> dict:
    """A judge element: counts (n, unparsed) are logged with the scores but kept out of the gate's."""
    from eval.judge import COUNTS, JudgeError, run_judge

    reference, reference_dir, note = "", None, None
    if spec.mode == "pairwise":
        reference, reference_dir, note = _judge_reference(ctx, spec.against)
        if note:
            print(f"{spec.name}: {note}", file=sys.stderr)
    failure = None
    try:
        metrics = run_judge(
            spec,
            model_dir,
            ctx.output_of("data"),
            ctx.out_dir,
            ctx.recipe.eval,
            reference_dir=reference_dir,
            reference=reference,
            progress=ctx.progress,
        )
    except JudgeError as err:
        failure = f"stage eval failed: {spec.name}: {err}"
    if failure:  # raised here, outside the handler: no chained connection error to misread as an OS failure
        print(ERROR_PREFIX + failure, file=sys.stderr, flush=True)
        raise StageError(failure)
    ctx.tracker.log_metrics(ctx.run_id, {f"{who}/{spec.name}/{k}": v for k, v in metrics.items()})
    _log_element_files(ctx, ("judge.jsonl",))  # the judge's verdicts per example, for reviewers
    if metrics["unparsed"]:
        print(f"{spec.name}: {int(metrics['unparsed'])} judgement(s) unparsed (see judge.jsonl)", file=sys.stderr)
    scores = {k: v for k, v in metrics.items() if k not in COUNTS}
    counts = {k: metrics[k] for k in COUNTS}
    return {"task": spec.name, "model": who, "scores": scores, "counts": counts, "reference": reference, "note": note}


def _judge_reference(ctx: StageContext, against: str) -> tuple[str, Path, str | None]:
    """(name, model dir, note) of the pairwise reference: the registry's champion, else the base model."""
    from eval import registry

    if against == "champion":
        with _registry_needs_mlflow(ctx.tracker.uri):
            found = registry.champion_model_dir(
                ctx.tracker.client, ctx.recipe.tracking.registered_model, ctx.out_dir / "champion_model"
            )
        if found:
            return f"champion v{found[0]}", found[1], None
        return "base", ctx.base_model_dir(), "no champion registered yet: judged against the base model"
    return "base", ctx.base_model_dir(), None


def collect_scores(rd: RunDir, spec: StageSpec) -> dict[str, dict[str, float]]:
    """{'candidate': {'task/metric': v}, 'base': {...}} from the eval array's element results."""
    out: dict[str, dict[str, float]] = {}
    for i in range(len(spec.elements)):
        res = read_json(rd.element_dir(spec, i) / "result.json")
        for metric, v in res["scores"].items():
            out.setdefault(res["model"], {})[f"{res['task']}/{metric}"] = v
    return out


def _gate(ctx: StageContext) -> dict:
    from eval import lineage, registry
    from eval.gate import decide_with_human
    from eval.mlflow_model import log_transformers_model

    plan = {s.name: s for s in build_plan(ctx.recipe)}
    scores = collect_scores(ctx.rd, plan["eval"])
    name = ctx.recipe.tracking.registered_model
    client = ctx.tracker.client
    # Unlike every other tracking call of a stage, the gate's registry calls are not queued: the verdict
    # needs the champion's scores and the registered version, so without MLflow there is no verdict to
    # record. An unreachable server fails the element with one line (its marker is not written, so the
    # rerun does the gate again once the server is back); other registry errors are raised as they are.
    with _registry_needs_mlflow(ctx.tracker.uri):
        champ = registry.champion_scores(client, name)
    champion_version, champion = champ if champ else (None, None)
    evidence = _gate_evidence(ctx, champion_version)
    verdict, status = decide_with_human(scores["candidate"], scores.get("base"), champion, ctx.recipe.gate, evidence)
    meta = ctx.rd.read_meta()
    parent, model_dir = meta["parent_run_id"], ctx.output_of("export") / "model"
    tags = _lineage_tags(ctx, meta)
    with _registry_needs_mlflow(ctx.tracker.uri):
        model_id = log_transformers_model(client, model_dir, parent, lineage.hash_dir(model_dir))
        version = registry.register_candidate(
            client, name, model_dir, parent, scores["candidate"], verdict, tags, model_id=model_id
        )
        registry.tag_stderrs(client, name, version, evidence.candidate_stderr)
        if ctx.recipe.gate.require_human:
            registry.await_human_review(client, name, version, ctx.recipe.gate, status)
    ctx.tracker.set_tags(parent, tags | {"hpcft.gate": status})
    _log_verdict(ctx, parent, scores, verdict, f"{name}/{version}", status)
    return {
        "passed": verdict.passed,
        "reasons": verdict.reasons,
        "version": str(version),
        "alias": "staging" if verdict.passed else None,
        "status": status,
        "registered_model": name,
        "champion_version": champion_version,
        "scores": scores,
        "champion_scores": champion,
    }


def _gate_evidence(ctx: StageContext, champion_version: str | None):
    """Per-example values and standard errors of this run's candidate (and the champion's, if any)."""
    from eval import registry
    from eval.evidence import run_values, stderrs
    from eval.gate import Evidence

    values = run_values(ctx.rd.root)
    champion_values, champion_errors = {}, {}
    if champion_version is not None:
        with _registry_needs_mlflow(ctx.tracker.uri):
            champion_values, champion_errors = registry.champion_evidence(
                ctx.tracker.client, ctx.recipe.tracking.registered_model, champion_version
            )
    return Evidence(values, champion_values, stderrs(values), champion_errors)


def _lineage_tags(ctx: StageContext, meta: dict) -> dict[str, str]:
    """The version's lineage (eval.lineage): recipe, code, data, base model by hash and by name/path, the
    parallel layout and, on Slurm, the job ids."""
    from eval import lineage

    model_info = read_json(ctx.rd.stage_dir("model") / "model.json")
    manifest = read_json(ctx.output_of("data") / "manifest.json")
    cfg = ctx.recipe.model
    return {
        lineage.RECIPE_HASH: meta["recipe_hash"],
        lineage.RECIPE_NAME: ctx.recipe.name,
        lineage.GIT_COMMIT: meta["git_commit"],
        lineage.DATA_MANIFEST_HASH: manifest.get("manifest_hash", ""),
        lineage.BASE_MODEL: str(cfg.tiny or cfg.gguf or cfg.path),
        lineage.BASE_MODEL_PATH: str(ctx.base_model_dir()),
        lineage.BASE_MODEL_HASH: model_info["hash"],
        lineage.RUN_DIR: str(ctx.rd.root),
        **lineage.layout_tags(ctx.recipe.parallel.model_dump(mode="json")),
        **lineage.slurm_job_tags(meta.get("slurm_jobs")),
    }


def _log_verdict(ctx: StageContext, parent: str, scores: dict, verdict, version: str, gate: str) -> None:
    """Scores as metrics of the parent and gate runs (they sort and chart); on the gate run the verdict
    (metric gate_passed, tags) and its checks (gate/checks.json, gate/reasons.txt); the redacted recipe and
    the data manifest on the parent (a reviewer reads them when the run directory is gone)."""
    import yaml

    from hpc.tracking import redact

    metrics = {f"{who}/{k}": v for who, by_metric in scores.items() for k, v in by_metric.items()}
    ctx.tracker.log_metrics(parent, metrics)
    ctx.tracker.log_metrics(ctx.run_id, metrics | {"gate_passed": int(verdict.passed)})
    ctx.tracker.set_tags(ctx.run_id, {"hpcft.gate": gate, "hpcft.registered_version": version})
    write_json(ctx.out_dir / "checks.json", {"passed": verdict.passed, "checks": verdict.checks})
    (ctx.out_dir / "reasons.txt").write_text(f"gate {gate}\n" + "".join(f"{r}\n" for r in verdict.reasons))
    for name in ("checks.json", "reasons.txt"):
        ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / name, "gate")
    recipe = ctx.out_dir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(redact(ctx.recipe.model_dump(mode="json")), sort_keys=False))
    ctx.tracker.log_artifact(parent, recipe)
    ctx.tracker.log_artifact(parent, ctx.output_of("data") / "manifest.json", "data")
    # the data stage logged it on the parent it ran under; a later parent (recipe changed, data reused) too
    manifest = read_json(ctx.output_of("data") / "manifest.json")
    ctx.tracker.log_dataset(parent, data_input(ctx.recipe, ctx.output_of("data"), manifest))


@contextmanager
def _registry_needs_mlflow(uri: str):
    """A registry call of the gate: an unreachable server becomes one TrackingError line (no MLflow
    traceback wall in the log tail the CLI shows)."""
    try:
        yield
    except Exception:
        reason = unreachable(uri)
        if not reason:
            raise
        raise TrackingError(
            f"gate: the model registry needs MLflow, and the server at {shown_uri(uri)} is unreachable ({reason});"
            " start it and run the same command again (finished stages are kept)"
        ) from None


STAGE_FUNCS: dict[str, Callable[[StageContext], dict]] = {
    "model": _model,
    "data": _data,
    "export": _export,
    "eval": _eval,
    "gate": _gate,
    **{kind: _train for kind in STAGE_KINDS},
}


def run_stage(run_root: str, stage: str, index: int = 0, datatrove: Callable | None = None, echo: bool = True) -> dict:
    """Run one element of one stage; the executor-agnostic entry point of every job. `datatrove`: the
    running executor's `datatrove_ranks(recipe, spec, out_dir)`, where the data stage's datatrove ranks run
    (default: a process pool in this job). `echo`: rank 0 prints each progress event to stdout."""
    quiet_env()
    private_umask()  # files this job writes: 0600/0700 unless $HPCFT_UMASK says otherwise
    rd = RunDir(Path(run_root))
    recipe = rd.load_recipe()
    meta = rd.read_meta()
    os.environ.update(recipe.executor.env)
    spec = {s.name: s for s in build_plan(recipe)}[stage]
    out_dir = rd.element_dir(spec, index)
    out_dir.mkdir(parents=True, exist_ok=True)
    # tolerant: a tracking call MLflow does not take is queued for the next `hpcft run`/`watch`, and the
    # element's result.json and marker are written all the same (tracking never costs work)
    tracker = Tracker(meta["tracking_uri"], queue=queue_path(rd.root))
    ctx = StageContext(rd, recipe, spec, index, out_dir, tracker, meta["child_runs"][stage], Path(meta["base_dir"]))
    started = time.time()
    leader = _join_world()
    ctx.leader = leader
    ctx.datatrove = datatrove
    ctx.echo = echo and leader
    if not leader:  # other ranks of a multi-process job compute; rank 0 reports and marks
        ctx.progress = lambda event: None
    try:
        result = STAGE_FUNCS[spec.kind](ctx)
    except Exception as err:
        line = describe_os_error(err, out_dir) or disk_full(out_dir)
        if line is None:
            raise
        # One line naming the path and errno instead of pages of datatrove, SQLAlchemy or DCP tracebacks
        # (the job's log may sit on the full disk too: the message travels in the exception as well).
        message = f"stage {stage} failed: {line}"
        try:
            print(ERROR_PREFIX + message, file=sys.stderr, flush=True)
        except OSError:
            pass
        raise StageError(message) from None
    result = result | {"seconds": round(time.time() - started, 2)}
    if leader:
        write_json(out_dir / "result.json", result)
        rd.mark_done(spec, index)
    _leave_world()
    return result


def _join_world() -> bool:
    """In a multi-task job, start torch.distributed from the Slurm/submitit environment; True on rank 0."""
    from hpc.rendezvous import from_env, init_distributed

    world = from_env()
    if world.world_size > 1:
        init_distributed(world)
    return world.rank == 0


def _leave_world() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
