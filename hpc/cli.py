"""The `hpcft` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.tree import Tree

from hpc import commands, executors
from hpc.recipe import RecipeError, load_recipe
from hpc.registry_cmd import HUMAN_ACTIONS, CommandError, cmd_registry
from training.stages import KINDS as STAGE_KINDS

EXIT_BAD_RECIPE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpcft",
        description="Fine-tune LLMs from one YAML recipe: data -> train -> export -> eval -> gate -> registry.",
    )
    p.add_argument("--version", action="version", version=f"hpcft {commands.version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def recipe_cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("recipe", type=Path)
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe field, e.g. --set stages.0.max_steps=50 (repeatable)",
        )
        return sp

    run = recipe_cmd("run", "run the pipeline (skips stages whose inputs did not change)")
    run.add_argument("--workdir", type=Path, help="run directory (default ./hpcft-runs/<recipe name>)")
    run.add_argument("--executor", choices=list(executors.EXECUTORS), help="override executor.kind")
    run.add_argument("--only", metavar="STAGE", help="rerun one stage on the outputs of the stages before it")
    run.add_argument(
        "--detach",
        action="store_true",
        help=f"{', '.join(executors.submitting())}: submit the whole pipeline and return",
    )
    recipe_cmd("validate", "check a recipe and list every problem")
    for command, cls in executors.script_writers().items():
        sp = recipe_cmd(command, cls.script_help)
        sp.add_argument("--out", type=Path, required=True, help="folder for the scripts")
        sp.add_argument("--workdir", type=Path, help="run directory the jobs will use")
    plan = recipe_cmd("plan", "show the stage graph with resources and per-rank training memory")
    plan.add_argument("--workdir", type=Path)
    plan.add_argument("--gpu-mem-gb", type=float, default=80.0, help="flag layouts that would not fit this")
    plan.add_argument(
        "--dry-run-layout",
        nargs="?",
        const="",
        metavar="MODEL",
        help="lay the model (the recipe's, or a named shape: llama-3-8b, llama-3-70b, qwen2.5-72b, or a model dir) "
        "out on the meta device under a fake process group, per training stage's layout, and compare the "
        "planner's per-rank weight/gradient/optimizer bytes with the real shards",
    )

    for name, help in (
        ("status", "one look at a run: stages, jobs, progress"),
        ("watch", "follow a run until it ends (reattaches to a detached run)"),
        ("cancel", f"cancel a run's submitted jobs ({', '.join(executors.submitting())})"),
    ):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("workdir", type=Path, nargs="?", default=None, help="run directory")
        sp.add_argument("--workdir", dest="workdir_opt", type=Path, help=argparse.SUPPRESS)
    logs = sub.add_parser("logs", help="print a stage job's log")
    logs.add_argument("stage")
    logs.add_argument("--workdir", type=Path, required=True)
    logs.add_argument("--rank", type=int, default=0, help="task rank within the job (multi-node training)")
    logs.add_argument("--element", type=int, default=0, help="array element index")
    logs.add_argument("--stdout", action="store_true", help="stdout instead of stderr")

    commands.add_parsers(sub)
    reg = sub.add_parser("registry", help="review, approve, promote and roll back registered versions")
    reg.add_argument("action", choices=["list", "review", "promote", "rollback", "history", *HUMAN_ACTIONS])
    reg.add_argument("name", help="registered model name (import-verdicts: the verdicts CSV)")
    reg.add_argument("version", nargs="?", help="version to review or promote")
    reg.add_argument("--uri", help="tracking URI (default $MLFLOW_TRACKING_URI or --workdir's sqlite)")
    reg.add_argument("--workdir", type=Path, help="a run directory whose embedded store to use")
    reg.add_argument("--force", action="store_true", help="promote even a version the gate rejected (needs --reason)")
    reg.add_argument("--comment", help="promote: why this version (required, recorded)")
    reg.add_argument("--reason", help="rollback, forced promote: why (required there, recorded)")
    reg.add_argument("--approver", help="who approves (default: $MLFLOW_TRACKING_USERNAME, else the OS user)")
    reg.add_argument(
        "--against", default="champion", help="review, blind-pairs: 'champion' (default), a version, or 'none' (review)"
    )
    reg.add_argument("--samples", type=int, default=5, help="review: held-out examples to show")
    reg.add_argument("--html", type=Path, help="review: also write the HTML report here")
    reg.add_argument("--json", action="store_true", help="history: JSON lines instead of a table")
    _human_arguments(reg)
    return p


def _human_arguments(reg: argparse.ArgumentParser) -> None:
    """Side-by-side review (eval/human.py): blind-pairs NAME VERSION --out DIR; import-verdicts FILE --name
    NAME --version V."""
    reg.add_argument("--out", type=Path, help="blind-pairs: folder for pairs.csv, form.html, key.json")
    reg.add_argument("--n", type=int, default=50, help="blind-pairs: number of pairs")
    reg.add_argument("--seed", type=int, default=0, help="blind-pairs: prompt sample and sides")
    reg.add_argument("--prompts", type=Path, help="blind-pairs: JSONL prompts instead of the held-out split")
    reg.add_argument("--max-new-tokens", type=int, default=64, help="blind-pairs: answer length")
    reg.add_argument("--name", dest="model_name", help="import-verdicts: registered model name")
    reg.add_argument("--version", dest="model_version", help="import-verdicts: the version the pairs blinded")
    reg.add_argument("--rater", help="import-verdicts: who rated (default: the CSV's rater column)")
    reg.add_argument("--key", type=Path, help="import-verdicts: key.json (default: the one blind-pairs wrote)")


def _workdir(args, recipe) -> Path:
    return args.workdir or Path("hpcft-runs") / recipe.name


def cmd_validate(args, console: Console) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    console.print(
        f"[green]ok[/] {args.recipe}: {len(recipe.stages)} training stage(s), "
        f"{len(recipe.eval.tasks)} eval task(s), registered model {recipe.tracking.registered_model!r}"
    )
    return 0


def cmd_plan(args, console: Console) -> int:
    from hpc.plan import build_plan
    from hpc.rundir import RunDir

    recipe = load_recipe(args.recipe, args.overrides)
    dry = args.dry_run_layout
    if dry is not None and recipe.parallel.engine != "native":
        raise CommandError(
            [
                "--dry-run-layout: the dry run lays the model out with the native engine; DeepSpeed partitions "
                "its own flat buffers (the plan's deepspeed lines estimate them); set parallel.engine: native to "
                "check a native layout"
            ]
        )
    dry_config = None if dry is None else _dry_run_config(recipe, args.recipe.resolve().parent, dry)
    rd = RunDir(_workdir(args, recipe))
    tree = Tree(
        f"[bold]{recipe.name}[/]  parallel dp_replicate={recipe.parallel.dp_replicate} "
        f"dp_shard={recipe.parallel.dp_shard} pp={recipe.parallel.pp} tp={recipe.parallel.tp} "
        f"zero={recipe.parallel.zero}  executor={recipe.executor.kind}"
    )
    for s in build_plan(recipe):
        r = s.resources
        state = "[green]up to date" if rd.stage_done(s) else "[yellow]to run"
        node = tree.add(f"[bold]{s.name}[/] ({s.kind})  {state}[/]  after: {', '.join(s.depends_on) or '-'}")
        node.add(
            f"resources: {r.nodes} node(s) x {r.tasks_per_node} task(s), {r.cpus_per_task} cpu/task, "
            f"{r.gpus_per_node} gpu/node, mem {r.mem_gb or 'default'} GB, {r.time_min} min"
        )
        if s.is_array:
            node.add(f"array of {len(s.elements)}: {', '.join(s.elements)}")
        if s.kind == "data" and recipe.data.filters.perplexity:
            node.add(_perplexity_cost(recipe, args.recipe.resolve().parent))
        if s.kind in STAGE_KINDS:
            _memory_lines(node, recipe, s, args.recipe.resolve().parent, args.gpu_mem_gb, _on_gpu(recipe, s))
            _step_lines(node, recipe, s, rd)
        node.add(f"input hash {s.input_hash}")
    console.print(tree)
    if dry_config is not None:
        return _dry_run_layouts(recipe, dry_config, dry, console)
    return 0


def _dry_run_config(recipe, base_dir: Path, model: str) -> dict:
    from parallel.dryrun import load_config

    try:
        return load_config(model) if model else _base_config(recipe, base_dir)
    except ValueError as e:
        raise CommandError([str(e)]) from None


def _dry_run_layouts(recipe, config: dict, model: str, console: Console) -> int:
    """parallel.dryrun for each distinct (layout, mode, LoRA) of the training stages: 0 all equal, 1 a
    mismatch (a planner or engine bug), 2 a layout the engine refuses."""
    from parallel import dryrun
    from training.stages import stage_layout

    seen, code = [], 0  # (a LoRA target list is not hashable)
    for stage in recipe.stages:
        key = (stage_layout(stage, recipe.parallel), stage.mode, stage.lora)
        if key in seen:
            continue
        seen.append(key)
        layout, mode, lora = key
        console.print(f"dry run, stage {stage.name} ({mode}) of {model or 'the base model'}: {dryrun.describe(layout)}")
        try:
            checks = dryrun.dry_run(config, layout, mode=mode, lora=lora)
        except ValueError as e:
            console.print(f"[red]refused[/]: {e}", highlight=False)
            code = 2
            continue
        console.print("per rank, planned/actual\n" + "\n".join(dryrun.table(checks)), highlight=False)
        code = max(code, 0 if all(c.ok for c in checks) else 1)
    return code


def _step_lines(node, recipe, spec, rd) -> None:
    """Steps from num_epochs (with the data stage's train count when it has run) and packing."""
    import json

    from training.stages import plan_lines, split_rows

    stage = next(st for st in recipe.stages if st.name == spec.name)
    manifest_path = rd.stage_dir("data") / "manifest.json"
    rows = None
    if manifest_path.is_file():
        try:
            rows = split_rows(stage, json.loads(manifest_path.read_text()))
        except (OSError, ValueError):
            rows = None
    for line in plan_lines(stage, recipe.parallel, rows):
        node.add(line)


def _perplexity_cost(recipe, base_dir: Path) -> str:
    """The perplexity filter's FLOPs, from the sources' rows and the reference model's size (KenLM: cheap)."""
    import json

    from data_tools.quality import estimate_rows, kenlm_cost, perplexity_cost
    from hpc.recipe import model_config
    from parallel.planner import num_params

    cfg = recipe.data.filters.perplexity
    if cfg.is_kenlm:
        return kenlm_cost(cfg, estimate_rows(recipe.data, base_dir))
    path = Path(cfg.model).expanduser() / "config.json"
    config = model_config(recipe, base_dir) if cfg.model == "base" else json.loads(path.read_text())
    return perplexity_cost(cfg, estimate_rows(recipe.data, base_dir), num_params(config))


def _base_config(recipe, base_dir: Path) -> dict:
    """The base model's config.json as a dict (tiny, GGUF or a model directory)."""
    import json

    if recipe.model.tiny:
        from parallel.tiny import TINY_CONFIGS, build_tokenizer

        return {**TINY_CONFIGS[recipe.model.tiny], "vocab_size": len(build_tokenizer())}
    if recipe.model.gguf:
        from hpc.recipe import model_config

        return model_config(recipe, base_dir)  # from the GGUF file's metadata (validate checked it)
    from hpc.recipe import resolve_path

    return json.loads((resolve_path(recipe.model.path, base_dir) / "config.json").read_text())


def _on_gpu(recipe, spec) -> bool:
    """Whether a stage's job gets a GPU: its Slurm options say so, a local run has one if this machine does."""
    if recipe.executor.kind == "slurm":
        from hpc.slurm import job_options

        return job_options(spec, recipe.executor).gpus_per_node > 0
    import torch

    return torch.cuda.is_available()


def _memory_lines(node, recipe, spec, base_dir: Path, gpu_mem_gb: float, gpu: bool) -> None:
    """The parallel.* defaults the stage resolves on its device (`auto`), and its per-rank memory under the
    layout they give (bf16 compute, fp32 master)."""
    from parallel.planner import GIB, memory_warnings
    from training.stages import plan_memory, stage_defaults

    config = _base_config(recipe, base_dir)
    stage = next(st for st in recipe.stages if st.name == spec.name)
    device = ("cuda", int(gpu_mem_gb * GIB)) if gpu else ("cpu", None)
    defaults = stage_defaults(stage, recipe.parallel, config, *device)
    for line in defaults.lines():
        node.add(line)
    parallel = defaults.config
    if parallel.engine == "deepspeed":
        _deepspeed_memory_lines(node, parallel, stage, config, gpu_mem_gb)
        return
    est = plan_memory(stage, parallel, config)
    parts = ", ".join(
        f"{k} {getattr(est, k) / GIB:.2f}"
        for k in ("params", "gathered", "grads", "optimizer", "activations", "frozen")
    )
    node.add(f"memory per rank (GiB): {parts}; total {est.total / GIB:.2f}")
    if recipe.parallel.tp > 1:
        from parallel.planner import Shape, tp_options
        from training.stages import stage_layout

        layout = stage_layout(stage, recipe.parallel)
        sequence, vocab = tp_options(Shape.from_config(config), layout)
        node.add(
            f"tensor parallel {layout.tp}: sequence parallel {'on' if sequence else 'off'}, "
            f"vocab parallel {'on' if vocab else 'off'}"
        )
    for warning in memory_warnings(est, int(gpu_mem_gb * GIB)):
        node.add(f"[red]{warning}[/] (at {gpu_mem_gb:g} GiB per GPU)")


def _deepspeed_memory_lines(node, parallel, stage, config: dict, gpu_mem_gb: float) -> None:
    """GPU and host memory per rank under DeepSpeed, with the recipe's offload and without any."""
    from parallel.planner import GIB, memory_warnings
    from training.stages import plan_deepspeed_memory

    bf16 = parallel.mixed_precision != "fp32"
    chosen, plain = plan_deepspeed_memory(stage, parallel, config, bf16=bf16)
    off = parallel.offload
    label = f"offload optimizer {off.optimizer}, params {off.params}" if off else "no offload"
    for name, est in ((label, chosen), ("without offload", plain)):
        parts = ", ".join(
            f"{k} {getattr(est.gpu, k) / GIB:.2f}"
            for k in ("params", "gathered", "grads", "optimizer", "activations", "frozen")
        )
        node.add(
            f"deepspeed ZeRO-{parallel.zero}, {name}: GPU per rank (GiB): {parts}; total "
            f"{est.gpu.total / GIB:.2f}; host per rank {est.host / GIB:.2f} GiB"
        )
        if est is plain and off is None:
            break
    for warning in memory_warnings(chosen.gpu, int(gpu_mem_gb * GIB)):
        node.add(f"[red]{warning}[/] (at {gpu_mem_gb:g} GiB per GPU; offload: parallel.offload)")


def cmd_run(args, console: Console) -> int:
    from hpc.pipeline import run_pipeline

    overrides = args.overrides + ([f"executor.kind={args.executor}"] if args.executor else [])
    recipe = load_recipe(args.recipe, overrides)
    return run_pipeline(
        recipe, args.recipe, _workdir(args, recipe), only=args.only, console=console, detach=args.detach
    )


def cmd_scripts(args, console: Console) -> int:
    """Standalone job scripts of the executor whose script command this is (`hpcft sbatch`). Only --out is
    written; the run directory and MLflow are untouched until the scripts' submit step runs."""
    from hpc.plan import build_plan
    from hpc.rundir import RunDir, private_umask

    cls = executors.script_writers()[args.cmd]
    recipe = load_recipe(args.recipe, args.overrides + [f"executor.kind={cls.name}"])
    plan = build_plan(recipe)
    ex = executors.get(recipe.executor)
    problems = ex.check(recipe, plan)
    if problems:
        raise RecipeError(problems)
    private_umask()
    rd = RunDir(_workdir(args, recipe))
    paths = ex.write_scripts(recipe, args.recipe, plan, rd, args.out)
    console.print(
        f"wrote {len(paths)} files to {args.out} (run directory {rd.root}, untouched until submitted); "
        f"review them, then run {paths[-1]}"
    )
    return 0


def _run_dir(args):
    from hpc.rundir import RunDir

    wd = args.workdir or getattr(args, "workdir_opt", None)
    if wd is None or not (Path(wd) / "run.json").is_file():
        raise RecipeError([f"workdir: {wd} is not an hpcft run directory (no run.json)"])
    return RunDir(wd)


def cmd_status(args, console: Console, once: bool = True) -> int:
    from hpc.pipeline import watch

    rd = _run_dir(args)
    if executors.submitted_by(rd.read_meta()):
        from hpc.tracking import Tracker

        return watch(rd, console, None if once else Tracker(rd.read_meta()["tracking_uri"]), once=once)
    if once:
        commands.show_status(rd, console)
        return 0
    return commands.watch_local(rd, console)


def cmd_cancel(args, console: Console) -> int:
    rd = _run_dir(args)
    submitted = executors.submitted_by(rd.read_meta())
    ids = submitted[0].cancel(submitted[1]) if submitted else []
    console.print(f"cancelled jobs: {', '.join(ids) or 'none'}")
    return 0


def cmd_logs(args, console: Console) -> int:
    from hpc.plan import build_plan

    rd = _run_dir(args)
    for flag, value in (("--element", args.element), ("--rank", args.rank)):
        if value < 0:
            raise RecipeError([f"{flag}: {value} is negative; the first is 0"])
    recipe = rd.load_recipe()
    names = [spec.name for spec in build_plan(recipe)]
    if args.stage not in names:
        raise RecipeError([f"stage: {args.stage!r} is not a stage of the run in {rd.root} ({', '.join(names)})"])
    submitted = executors.submitted_by(rd.read_meta())
    ex = submitted[0] if submitted else executors.get(recipe.executor)
    path = ex.find_log(rd, args.stage, args.element, args.rank, args.stdout)
    if path is None:
        raise RecipeError([f"logs: no logs for stage {args.stage!r} in {rd.root}"])
    path = rd.inside(path, "logs")  # printed only when it is the run's own file
    if not path.is_file():
        raise RecipeError([f"logs: {path} does not exist (yet)"])
    print(f"==> {path}")
    print(path.read_text(errors="replace"), end="")
    return 0


def _interrupt_on_signals() -> None:
    """SIGTERM (`kill <pid>`), SIGHUP (the terminal or SSH session closed) and SIGINT (Ctrl-C) stop a run the
    same way: KeyboardInterrupt, on which the local executor kills its jobs' process trees, the running
    stage's MLflow run is marked KILLED and the run lock is released. Only the first signal interrupts; later
    ones are ignored so that this cleanup is not cut short. (`kill -9` cannot be handled: the jobs then stop
    themselves, see hpc/lifeline.py, and a stale run lock is taken over by the next run.)"""
    import signal

    def handler(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # A Slurm .out, CI, a pipe: long lines stay whole, not wrapped at 80 columns. A wide console rather
        # than soft_wrap, which crops a tree's long lines (hpcft plan) at the console's width.
        console = Console(width=4000)
    _interrupt_on_signals()
    handler = {
        "run": cmd_run,
        "validate": cmd_validate,
        "plan": cmd_plan,
        "registry": cmd_registry,
        "status": cmd_status,
        "watch": lambda a, c: cmd_status(a, c, once=False),
        "cancel": cmd_cancel,
        "logs": cmd_logs,
        **{command: cmd_scripts for command in executors.script_writers()},
        **commands.HANDLERS,
    }[args.cmd]
    try:
        return handler(args, console)
    except CommandError as err:
        print(f"hpcft: error: {err.problems[0]}", file=sys.stderr)
        return EXIT_BAD_RECIPE
    except RecipeError as err:
        where = getattr(args, "recipe", None)
        print(f"error: {'recipe ' + str(where) if where else 'bad arguments'}:", file=sys.stderr)
        for line in err.problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_BAD_RECIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # The operating system refused (a full disk, a quota, permissions) or MLflow's sqlite store is full:
        # one line naming the path and errno, not pages of tracebacks.
        from hpc.errors import describe_os_error

        line = describe_os_error(err, _where(args))
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1


def _where(args) -> Path | None:
    """The run directory a command works on, to name in an OS error without its own path."""
    for name in ("workdir", "workdir_opt", "out"):
        value = getattr(args, name, None)
        if value is not None:
            return Path(value).resolve()
    return None


if __name__ == "__main__":
    sys.exit(main())
