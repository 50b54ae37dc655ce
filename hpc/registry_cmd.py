"""`hpcft registry list|review|promote|rollback|history`: the CLI side of eval.registry and eval.review.
Every mistake or refusal is one line `hpcft: error: registry <action>: ...` and exit 2 (CommandError)."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from hpc.recipe import RecipeError


class CommandError(RecipeError):
    """A user's mistake in a command other than `run`/`validate`: printed as one line `hpcft: error: ...`."""


def cmd_registry(args, console: Console) -> int:
    from mlflow.exceptions import MlflowException

    from eval import registry
    from hpc.tracking import Tracker, one_line, resolve_uri

    action = f"registry {args.action}"
    if args.uri is None and args.workdir is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise CommandError(["registry: give --uri, --workdir or set MLFLOW_TRACKING_URI"])
    _check_registry_args(args, action)
    uri = resolve_uri(args.uri, (args.workdir or Path(".")).resolve())
    store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if store is not None and not store.is_file():  # MLflow would create an empty store and find nothing
        raise CommandError([f"registry: no MLflow store at {store} (give --uri, or --workdir of a run)"])
    client = Tracker(uri).client
    if args.action in HUMAN_ACTIONS:  # import-verdicts: NAME is the verdicts file
        return _registry_human(args, client, console)
    try:
        registry.require_model(client, args.name)
        return REGISTRY_ACTIONS[args.action](args, client, console)
    except (ValueError, PermissionError) as err:
        raise CommandError([f"{action}: {err}"]) from None
    except MlflowException as err:  # e.g. the server refused a write: one line, credentials redacted
        raise CommandError([f"{action}: {one_line(err)}"]) from None


HUMAN_ACTIONS = ("blind-pairs", "import-verdicts")


def _check_registry_args(args, action: str) -> None:
    """Arguments each action needs, checked before MLflow is asked anything."""
    if args.action in ("review", "promote") and not args.version:
        raise CommandError([f"{action}: give the VERSION to {args.action}"])
    if args.action == "promote" and not (args.comment or "").strip():
        raise CommandError([f"{action}: --comment is required (why this version is promoted)"])
    if args.action == "rollback" and not (args.reason or "").strip():
        raise CommandError([f"{action}: --reason is required (why the champion is rolled back)"])
    if args.force and not (args.reason or "").strip():
        raise CommandError([f"{action}: --force needs --reason (why the gate is overridden)"])
    if args.samples < 0:
        raise CommandError([f"{action}: --samples must be 0 or more"])


def _registry_list(args, client, console: Console) -> int:
    from rich.table import Table

    from eval import registry

    table = Table(title=args.name)
    for col in ("version", "aliases", "gate", "scores", "approved by"):
        table.add_column(col)
    for v in registry.list_versions(client, args.name):
        table.add_row(
            str(v["version"]),
            ", ".join(v["aliases"]),
            v.get("gate", ""),
            "  ".join(f"{k}={x:.3f}" for k, x in sorted(v.get("scores", {}).items())),
            v["tags"].get("approval.approver", ""),
        )
    console.print(table)
    return 0


def _registry_promote(args, client, console: Console) -> int:
    from eval import registry

    current = registry.champion_scores(client, args.name)
    if current and current[0] == args.version:
        registry.require_manage(client, args.name, f"promote {args.name} version {args.version}")
        console.print(f"{args.name} version {args.version} is already 'champion'; nothing changed")
        return 0
    old = registry.promote(
        client,
        args.name,
        args.version,
        force=args.force,
        reason=args.reason or "",
        approver=args.approver,
        comment=args.comment,
    )
    was = f" (previous_champion: version {old})" if old else ""
    console.print(f"{args.name} version {args.version} is now 'champion'{was}")
    return 0


def _registry_rollback(args, client, console: Console) -> int:
    from eval import registry

    old = registry.champion_scores(client, args.name)
    now = registry.rollback(client, args.name, reason=args.reason, approver=args.approver)
    console.print(f"{args.name}: 'champion' rolled back from version {old[0] if old else '-'} to version {now}")
    return 0


def _registry_history(args, client, console: Console) -> int:
    import json

    from rich.markup import escape
    from rich.table import Table

    from eval import registry

    entries = registry.history(client, args.name)
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    table = Table(title=f"{args.name}: history")
    for col in ("#", "event", "version", "from", "approver", "time", "comment / reason"):
        table.add_column(col, overflow="fold")
    for e in entries:
        why = e.get("reason") if e.get("event") == "rollback" else e.get("comment", "")
        if e.get("event") == "force_promote":
            why = f"{e.get('comment', '')} (forced: {e.get('reason', '')})"
        who = e.get("approver", "")
        if e.get("event") == registry.REGISTER_EVENT:
            who, why = "gate", f"gate {e.get('gate')}" + (f": {why}" if why else "")
        cells = (e["index"], e.get("event"), e.get("version"), e.get("from") or "-", who, e.get("time"), why)
        table.add_row(*(escape(str(c or "")) for c in cells))
    console.print(table if entries else f"{args.name}: no history recorded yet")
    return 0


def _registry_review(args, client, console: Console) -> int:
    from mlflow.exceptions import MlflowException

    from eval import review
    from hpc.tracking import one_line

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # artifact downloads: no bars
    rv = review.review(client, args.name, args.version, against=args.against, samples=args.samples)
    review.render_rich(rv, console)
    text = review.render_html(rv)
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(text)
        console.print(f"HTML report: {args.html}")
    try:
        path = review.log_html(client, rv, text)
        console.print(f"logged to run {rv.candidate.run_id} as {path}")
    except (MlflowException, OSError) as err:  # a READ-only reviewer cannot write to the run
        console.print(f"[yellow]the HTML report was not logged to MLflow:[/] {one_line(err)}")
    return 0


REGISTRY_ACTIONS = {
    "list": _registry_list,
    "review": _registry_review,
    "promote": _registry_promote,
    "rollback": _registry_rollback,
    "history": _registry_history,
}


def _registry_human(args, client, console: Console) -> int:
    from eval import human

    try:
        if args.action == "blind-pairs":
            if not args.version or args.out is None:
                raise ValueError("give NAME VERSION and --out DIR")
            key = human.blind_pairs(
                client,
                args.name,
                args.version,
                args.against,
                args.out,
                n=args.n,
                seed=args.seed,
                prompts=args.prompts,
                max_new_tokens=args.max_new_tokens,
            )
            console.print(
                f"{len(key['candidate_side'])} blinded pairs of {args.name} v{args.version} vs "
                f"v{key['reference_version']}: give the rater {args.out / 'form.html'} (or pairs.csv); "
                f"keep {args.out / 'key.json'}"
            )
            return 0
        if not args.model_name or not args.model_version:
            raise ValueError("give the verdicts FILE, --name NAME and --version V")
        if not Path(args.name).is_file():
            raise ValueError(f"no such verdicts file: {args.name}")
        out = human.import_verdicts(client, Path(args.name), args.model_name, args.model_version, args.rater, args.key)
    except ValueError as err:
        raise CommandError([f"registry {args.action}: {err}"]) from None
    console.print(
        f"{args.model_name} v{args.model_version}: human/win_rate {out['human/win_rate']:.3f} "
        f"[{out['human/win_rate_low']:.3f}, {out['human/win_rate_high']:.3f}] over {int(out['human/n'])} verdicts"
    )
    if "status" in out:
        console.print(f"gate: {out['status']}")
        for reason in out["reasons"]:
            console.print(f"  - {reason}", markup=False)
    return 0
