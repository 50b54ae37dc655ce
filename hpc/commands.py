"""The model and data commands of `hpcft`: generate, chat, export, data; and the local run's status and watch."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from hpc.recipe import RecipeError

CHECKPOINT_MANIFEST = "hpcft_checkpoint.json"  # parallel.checkpoint.MANIFEST, without importing torch


def add_parsers(sub) -> None:
    """The subcommands of this module on the CLI's subparsers."""

    def model_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="a Hugging Face model dir, a run dir (its exported model) or models:/NAME@alias")
        sp.add_argument("--uri", help="tracking URI for models:/ (default $MLFLOW_TRACKING_URI or --workdir's)")
        sp.add_argument("--workdir", type=Path, help="a run directory whose embedded MLflow store holds models:/")
        sp.add_argument("--max-new-tokens", type=int, default=128)
        sp.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic)")

    gen = sub.add_parser("generate", help="answer every prompt of a jsonl file with a model (batch inference)")
    model_arg(gen)
    gen.add_argument("--prompts", type=Path, required=True, help="jsonl rows with `prompt` or `messages`")
    gen.add_argument("--out", type=Path, required=True, help="jsonl: each input row plus its `answer`")
    gen.add_argument("--batch-size", type=int, default=8)
    chat = sub.add_parser("chat", help="talk to a model in the terminal (streaming; /reset, /exit)")
    model_arg(chat)
    export = sub.add_parser("export", help="copy a run's exported model (merged), or its LoRA adapter")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--adapter-only", action="store_true", help="the LoRA adapter of the last policy stage")
    data = sub.add_parser("data", help="run the model and data stages only; print the data funnel and splits")
    data.add_argument("recipe", type=Path)
    data.add_argument("--workdir", type=Path, help="run directory (default ./hpcft-runs/<recipe name>)")
    data.add_argument("--executor", choices=["local", "inline"], default="local")
    data.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


# ---- which model


def resolve_model(spec: str, uri: str | None = None, workdir: Path | None = None) -> tuple[Path, Path | None]:
    """(HF model dir, run dir it came from or None) for a model dir, a run dir or models:/NAME@alias|/VERSION."""
    if spec.startswith("models:/"):
        return _registered(spec, uri, workdir)
    path = Path(spec)
    if (path / "run.json").is_file():
        model = path / "stages" / "export" / "model"
        if not (model / "config.json").is_file():
            raise RecipeError([f"model: the run in {path} has no exported model yet (stages/export/model)"])
        return model, path
    if not (path / "config.json").is_file():
        raise RecipeError([f"model: {spec} is not a model directory (no config.json), a run directory or models:/"])
    return path, None


def _registered(spec: str, uri: str | None, workdir: Path | None) -> tuple[Path, Path | None]:
    """A registry version: its run directory's export when that is still there, else its `model` artifact."""
    import os

    from eval import lineage
    from eval.registry import ARTIFACT_PATH
    from hpc.tracking import Tracker, resolve_uri

    ref = spec.removeprefix("models:/")
    name, _, alias = ref.partition("@")
    if not alias:
        name, _, version = ref.partition("/")
    if not name or not (alias or version):
        raise RecipeError([f"model: {spec} is not models:/NAME@alias or models:/NAME/VERSION"])
    if uri is None and workdir is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise RecipeError(["model: models:/ needs --uri, --workdir or MLFLOW_TRACKING_URI"])
    resolved = resolve_uri(uri, (workdir or Path(".")).resolve())
    if resolved.startswith("sqlite:///") and not Path(resolved.removeprefix("sqlite:///")).is_file():
        raise RecipeError([f"model: no MLflow store at {resolved.removeprefix('sqlite:///')}"])
    client = Tracker(resolved).client
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as err:  # noqa: BLE001 - MLflow's RESOURCE_DOES_NOT_EXIST and kin: one line
        raise RecipeError([f"model: {spec}: {str(err).splitlines()[0]}"]) from None
    run_dir = mv.tags.get(lineage.RUN_DIR)
    if run_dir and (Path(run_dir) / "stages" / "export" / "model" / "config.json").is_file():
        return Path(run_dir) / "stages" / "export" / "model", Path(run_dir)
    cache = Path(workdir or ".").resolve() / ".hpcft-models" / f"{name}-v{mv.version}"
    if not (cache / ARTIFACT_PATH / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(mv.run_id, ARTIFACT_PATH, str(cache))
    return cache / ARTIFACT_PATH, None


def chat_template(model_dir: Path, run_dir: Path | None) -> str:
    """The template the model was trained with: the run's data stage's (token store meta), else the
    tokenizer's own (the one training saved with it), else the project's ChatML."""
    from data_tools.templates import data_template
    from parallel.tiny import CHATML_TEMPLATE

    trained = data_template(run_dir / "stages" / "data") if run_dir is not None else None
    if trained:
        return trained
    config, own_file = model_dir / "tokenizer_config.json", model_dir / "chat_template.jinja"
    own = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    own = own_file.read_text() if own_file.is_file() else own  # where transformers 5 saves it
    if isinstance(own, dict):
        own = own.get("default")
    return own or CHATML_TEMPLATE


class Model:
    """A causal LM and its tokenizer, ready to answer chats in the training template."""

    def __init__(self, model_dir: Path, run_dir: Path | None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from eval.offline import offline_and_quiet

        with offline_and_quiet():
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()
        self.template = chat_template(model_dir, run_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        """eos and the token that ends an assistant turn in this template (e.g. <|im_end|>, <|eot_id|>)."""
        user = [{"role": "user", "content": "q"}]
        prompt, full = self.render(user), self.render(user + [{"role": "assistant", "content": "ANSWER"}], open=False)
        ids = {self.tokenizer.eos_token_id}
        if full.startswith(prompt + "ANSWER"):
            end = full[len(prompt) + len("ANSWER") :].strip()
            end_ids = self.tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
            if end_ids:
                ids.add(end_ids[0])
        return sorted(i for i in ids if i is not None)

    def render(self, messages: list[dict], open: bool = True) -> str:
        from data_tools.tokens import render

        return render(self.tokenizer, messages, self.template, generation_prompt=open)

    def generate_kwargs(self, max_new_tokens: int, temperature: float) -> dict:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        return {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            **sampling,
        }

    def answer(self, chats: list[list[dict]], max_new_tokens: int, temperature: float) -> list[str]:
        import torch

        texts = [self.render(messages) for messages in chats]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**batch, **self.generate_kwargs(max_new_tokens, temperature))
        new = out[:, batch["input_ids"].shape[1] :]
        return [
            self.tokenizer.decode(until_stop(row.tolist(), self.stop_ids), skip_special_tokens=True).strip()
            for row in new
        ]


def until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The generated ids before the first stop id: the token that ended the turn (a plain-text marker's first
    token where the tokenizer has no special token for it, e.g. a named template on a base model) and the
    padding after it are not part of the answer."""
    stops = set(stop_ids)
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def _load(args) -> Model:
    model_dir, run_dir = resolve_model(args.model, args.uri, args.workdir)
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", getattr(args, "batch_size", 1))):
        if value < 1:
            raise RecipeError([f"{flag}: {value} must be at least 1"])
    if args.temperature < 0:
        raise RecipeError([f"--temperature: {args.temperature} must be 0 (greedy) or more"])
    return Model(model_dir, run_dir)


# ---- generate, chat


def read_prompts(path: Path) -> list[dict]:
    """jsonl rows, each with `prompt` (a user turn) or `messages` (a chat ending before the answer)."""
    if not path.is_file():
        raise RecipeError([f"--prompts: {path} does not exist"])
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecipeError([f"--prompts: {path} line {n}: not JSON ({err.msg})"]) from None
        if not isinstance(row, dict) or not (
            isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)
        ):
            raise RecipeError([f"--prompts: {path} line {n}: needs a `prompt` string or a `messages` list"])
        rows.append(row)
    return rows


def cmd_generate(args, console: Console) -> int:
    rows = read_prompts(args.prompts)
    model = _load(args)
    chats = [row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}] for row in rows]
    started = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for i in range(0, len(rows), args.batch_size):
            answers = model.answer(chats[i : i + args.batch_size], args.max_new_tokens, args.temperature)
            for row, answer in zip(rows[i : i + args.batch_size], answers):
                f.write(json.dumps(row | {"answer": answer}) + "\n")
    console.print(f"wrote {len(rows)} answers to {args.out} in {time.time() - started:.1f}s", highlight=False)
    return 0


def cmd_chat(args, console: Console) -> int:
    from threading import Thread

    import torch
    from transformers import TextIteratorStreamer

    class _ReplyStreamer(TextIteratorStreamer):
        def put(self, value):  # the stop token (see until_stop) is not shown as part of the reply
            super().put(value if self.next_tokens_are_prompt else value[~torch.isin(value, self.stop_ids)])

    model = _load(args)
    console.print(f"[bold]hpcft chat[/] {args.model}  (/reset clears the history, /exit or Ctrl-D ends)")
    history: list[dict] = []
    while True:
        try:
            line = console.input("[bold green]you>[/] ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history = []
            console.print("[dim](history cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = model.tokenizer(model.render(history), return_tensors="pt", add_special_tokens=False).to(model.device)
        streamer = _ReplyStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.stop_ids = torch.tensor(model.stop_ids)
        kwargs = dict(ids, streamer=streamer, **model.generate_kwargs(args.max_new_tokens, args.temperature))
        worker = Thread(target=lambda: torch.no_grad()(model.model.generate)(**kwargs), daemon=True)
        worker.start()
        console.print("[bold blue]model>[/] ", end="")
        reply = []
        for piece in streamer:
            reply.append(piece)
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
            console.file.flush()
        worker.join()
        console.print()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
    console.print("bye")
    return 0


# ---- export, data


def cmd_export(args, console: Console) -> int:
    from hpc.rundir import RunDir

    if not (args.run_dir / "run.json").is_file():
        raise RecipeError([f"run_dir: {args.run_dir} is not an hpcft run directory (no run.json)"])
    if args.out.exists() and any(args.out.iterdir()):
        raise RecipeError([f"--out: {args.out} exists and is not empty"])
    rd = RunDir(args.run_dir)
    if args.adapter_only:
        source = _adapter_dir(rd)
    else:
        source = rd.stage_dir("export") / "model"
        if not (source / "config.json").is_file():
            raise RecipeError([f"export: the run in {rd.root} has no exported model yet (stages/export/model)"])
    shutil.copytree(source, args.out, dirs_exist_ok=True)
    what = "LoRA adapter" if args.adapter_only else "merged model"
    console.print(f"copied the {what} from {source} to {args.out}", highlight=False)
    return 0


def _adapter_dir(rd) -> Path:
    """The last policy stage's checkpoint when it holds a peft adapter (mode lora or qlora)."""
    from training.stages import last_policy

    stage = last_policy(rd.load_recipe().stages)
    checkpoint = rd.stage_dir(stage.name) / "checkpoint"
    manifest = checkpoint / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        raise RecipeError([f"--adapter-only: stage {stage.name!r} of {rd.root} has no checkpoint yet"])
    mode = json.loads(manifest.read_text())["mode"]
    if mode == "full" or not (checkpoint / "adapter_config.json").is_file():
        raise RecipeError(
            [
                f"--adapter-only: stage {stage.name!r} trained mode {mode!r}: it keeps no LoRA adapter;"
                " export the merged model (without --adapter-only)"
            ]
        )
    return checkpoint


def cmd_data(args, console: Console) -> int:
    from hpc.pipeline import run_pipeline
    from hpc.progress import funnel_lines
    from hpc.recipe import load_recipe
    from hpc.rundir import read_json

    recipe = load_recipe(args.recipe, args.overrides + [f"executor.kind={args.executor}"])
    workdir = args.workdir or Path("hpcft-runs") / recipe.name
    started = time.time()
    code = run_pipeline(recipe, args.recipe, workdir, console=console, through="data")
    path = Path(workdir) / "stages" / "data" / "manifest.json"
    if code == 0:
        if path.stat().st_mtime < started:  # up to date: the run did not show its funnel
            for line in funnel_lines(read_json(path)):
                console.print(f"  {line}", markup=False, highlight=False)
        console.print(f"manifest: {path}", highlight=False)
    return code


# ---- a local run: status and watch


def show_status(rd, console: Console) -> None:
    """Each stage (done or not, seconds, latest progress), then the gate's verdict, scores and version."""
    from rich.table import Table

    from hpc.pipeline import print_summary
    from hpc.plan import build_plan
    from hpc.progress import describe, read_last_event
    from hpc.rundir import read_json

    table = Table(title=f"run {rd.root}")
    for col in ("stage", "state", "seconds", "latest"):
        table.add_column(col)
    total = 0.0
    for spec in build_plan(rd.load_recipe()):
        done = rd.stage_done(spec)
        seconds = [
            read_json(p).get("seconds", 0.0)
            for p in (rd.element_dir(spec, i) / "result.json" for i in range(len(spec.elements)))
            if p.is_file()
        ]
        total += sum(seconds)
        shown = f"{sum(seconds):.1f}" if seconds else ""
        latest = describe(read_last_event(rd.progress_path(spec.name), need="t"))  # eval elements have no step
        table.add_row(spec.name, "done" if done else "not done", shown, "" if latest == "started" else latest)
    console.print(table)
    console.print(f"stage time in all: {total:.1f}s", highlight=False)
    gate = rd.stage_dir("gate") / "result.json"
    if gate.is_file():
        print_summary(console, read_json(gate))


def running(rd) -> dict | None:
    """The `hpcft run` holding the run directory's lock ({host, pid, ...}), None when none does."""
    from hpc.rundir import RunLock

    lock = RunLock(rd.root)
    holder = lock.holder()
    return holder if holder is not None and lock.stale(holder) is None else None


def watch_local(rd, console: Console, poll_s: float = 1.0) -> int:
    """Follow a run that an `hpcft run` on this machine is running until it releases the run's lock."""
    from hpc.pipeline import data_funnel, stage_note
    from hpc.plan import build_plan
    from hpc.progress import PipelineView

    holder = running(rd)
    if holder is None:
        console.print(f"nothing is running in {rd.root} (no `hpcft run` holds it); its state:", highlight=False)
        show_status(rd, console)
        return 0
    console.print(f"following the run of pid {holder.get('pid')} on {holder.get('host')}", highlight=False)
    plan = build_plan(rd.load_recipe())
    finished: set[str] = set()
    with PipelineView(plan, rd.progress_path, console) as view:
        for spec in plan:
            if rd.stage_done(spec):
                view.skip(spec)
                finished.add(spec.name)
        while True:
            alive = running(rd) is not None
            for spec in plan:
                if spec.name in finished:
                    continue
                if rd.stage_done(spec):
                    if view.state[spec.name] != "running":
                        view.start(spec, "local")
                    view.finish(spec, ok=True, note=stage_note(rd, spec), lines=data_funnel(rd, spec))
                    finished.add(spec.name)
                    continue
                if view.state[spec.name] == "pending":  # the stages run in plan order: this one is next
                    view.start(spec, "local")
                    view.started[spec.name] = view.events[spec.name].started or view.started[spec.name]
                break
            view.refresh()
            if not alive:
                break
            time.sleep(poll_s)
    left = [spec.name for spec in plan if spec.name not in finished]
    if left:
        console.print(f"the run ended with stages not done: {', '.join(left)}", highlight=False)
        return 1
    show_status(rd, console)
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("hpcft")
    except PackageNotFoundError:  # a source tree on PYTHONPATH: the version pyproject.toml declares
        import tomllib

        return tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]


HANDLERS = {"generate": cmd_generate, "chat": cmd_chat, "export": cmd_export, "data": cmd_data}
