"""What a reviewer needs before promoting a registered version: its scores against a reference version's
(delta and uncertainty), the gate's checks, lineage side by side (recipe and data-manifest diffs) and
held-out prompts with both models' answers. Pure data gathering plus two renderings (rich, HTML)."""

from __future__ import annotations

import difflib
import html
import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from data_tools import secrets
from eval import lineage, registry

BOOTSTRAP_ITERS = 1000
_NOT_AVAILABLE = "not available"
_PREFERRED_TAGS = (
    lineage.BASE_MODEL,
    lineage.BASE_MODEL_HASH,
    lineage.GIT_COMMIT,
    lineage.GIT_DIRTY,
    lineage.RECIPE_HASH,
    lineage.DATA_MANIFEST_HASH,
    lineage.MODEL_HASH,
    lineage.RUN_DIR,
)


@dataclass
class Side:
    """One version's files and tags, wherever they were found."""

    version: str
    run_id: str | None
    tags: dict[str, str]
    scores: dict[str, float]
    recipe: str | None = None  # the recipe snapshot's text
    manifest: dict | None = None
    results: dict[str, dict] = field(default_factory=dict)  # task label -> lm-eval results.json
    samples: dict[str, list[dict]] = field(default_factory=dict)  # task label -> samples.jsonl rows
    found_in: str = _NOT_AVAILABLE  # "run directory <path>" | "MLflow artifacts of run <id>"

    @property
    def label(self) -> str:
        return f"v{self.version}"


@dataclass
class ScoreRow:
    metric: str
    candidate: float | None
    reference: float | None
    candidate_err: float | None
    reference_err: float | None
    err_source: str  # "lm-eval stderr" | "bootstrap over N examples" | "not available"

    @property
    def delta(self) -> float | None:
        if self.candidate is None or self.reference is None:
            return None
        return self.candidate - self.reference


@dataclass
class Example:
    task: str
    prompt: str
    target: str
    candidate: str
    reference: str | None
    candidate_score: float | None
    reference_score: float | None


@dataclass
class Review:
    name: str
    candidate: Side
    reference: Side | None
    reference_alias: str | None  # "champion" when --against defaulted to it
    gate: str
    gate_reasons: list[str]
    scores: list[ScoreRow]
    lineage: list[tuple[str, str, str]]  # (field, candidate, reference)
    recipe_diff: str | None  # unified diff; "" when identical; None when a snapshot is missing
    manifest: list[tuple[str, str, str]]
    examples: list[Example]
    notes: list[str]

    @property
    def title(self) -> str:
        ref = f" vs {self.reference.label}" if self.reference else ""
        alias = f" ({self.reference_alias})" if self.reference and self.reference_alias else ""
        return f"{self.name} {self.candidate.label}{ref}{alias}"

    @property
    def artifact_name(self) -> str:
        ref = f"-vs-v{self.reference.version}" if self.reference else ""
        return f"review-v{self.candidate.version}{ref}.html"


def review(client, name: str, version: str, against: str | None = registry.CHAMPION, samples: int = 5) -> Review:
    """The review of `version` of `name` against `against` ('champion', a version number, or None for the
    candidate alone). With no champion the candidate is reviewed alone (a note says so)."""
    notes: list[str] = []
    mv = registry.model_version(client, name, str(version))
    candidate = _side(client, mv, notes)
    reference, alias = None, None
    if against in (None, "", "none"):
        pass
    elif against == registry.CHAMPION:
        champ = registry.champion_scores(client, name)
        if champ is None:
            notes.append(f"{name} has no champion: the candidate is reviewed alone")
        elif champ[0] == candidate.version:
            notes.append(f"version {candidate.version} is the champion: reviewed alone")
        else:
            reference, alias = _side(client, registry.model_version(client, name, champ[0]), notes), registry.CHAMPION
    else:
        reference = _side(client, registry.model_version(client, name, str(against)), notes)
    return Review(
        name=name,
        candidate=candidate,
        reference=reference,
        reference_alias=alias,
        gate=mv.tags.get(registry.GATE_TAG, "unset"),
        gate_reasons=[line for line in mv.tags.get(registry.GATE_REASONS_TAG, "").splitlines() if line.strip()],
        scores=score_rows(candidate, reference),
        lineage=lineage_rows(candidate, reference),
        recipe_diff=recipe_diff(candidate, reference),
        manifest=manifest_rows(candidate, reference),
        examples=examples(candidate, reference, samples),
        notes=notes,
    )


# -- gathering ---------------------------------------------------------------------------------------


def _side(client, mv, notes: list[str]) -> Side:
    side = Side(str(mv.version), mv.run_id, dict(mv.tags), registry.scores_of(mv.tags))
    run_dir = Path(mv.tags.get(lineage.RUN_DIR, "")) if mv.tags.get(lineage.RUN_DIR) else None
    if run_dir is not None and (run_dir / "recipe.yaml").is_file() and _same_run(run_dir, mv.tags, side, notes):
        _read_run_dir(side, run_dir)
        side.found_in = f"run directory {run_dir}"
    elif mv.run_id:
        with tempfile.TemporaryDirectory(prefix="hpcft-review-") as tmp:
            got = _download(client, mv.run_id, Path(tmp))
            _read_artifacts(side, Path(tmp))
        side.found_in = f"MLflow artifacts of run {mv.run_id}" if got else _NOT_AVAILABLE
    for what, value in (("recipe snapshot", side.recipe), ("data manifest", side.manifest)):
        if value is None:
            notes.append(f"{side.label}: {what} not available")
    if not side.samples:
        notes.append(f"{side.label}: per-example eval samples not available")
    return side


def _same_run(run_dir: Path, tags: dict[str, str], side: Side, notes: list[str]) -> bool:
    """Whether `run_dir` still holds the run the version came from: a rerun in the same directory with
    another recipe replaces its files (the version's recipe hash then differs from run.json's)."""
    now = (_json_file(run_dir / "run.json") or {}).get("recipe_hash")
    if tags.get(lineage.RECIPE_HASH) and now and now != tags[lineage.RECIPE_HASH]:
        notes.append(f"{side.label}: {run_dir} now holds another run (recipe hash differs); using MLflow artifacts")
        return False
    return True


def _read_run_dir(side: Side, run_dir: Path) -> None:
    redacted = run_dir / "recipe.redacted.yaml"
    side.recipe = _redacted((redacted if redacted.is_file() else run_dir / "recipe.yaml").read_text())
    side.manifest = _json_file(run_dir / "stages" / "data" / "manifest.json")
    for element in sorted((run_dir / "stages" / "eval").glob("*/result.json")):
        result = _json_file(element)
        if result and result.get("model") == "candidate":
            _read_eval_dir(side, element.parent, result["task"])


def _redacted(recipe_text: str) -> str:
    """The recipe snapshot keeps the values jobs need (a tracking URI's password, `setup:` exports); the
    review shows, and logs to MLflow, only what data_tools.secrets leaves."""
    return secrets.redact_text(recipe_text, "***")[0]


def _download(client, run_id: str, dest: Path) -> bool:
    """The run's review inputs ('recipe.yaml', 'data/manifest.json', 'eval/'), each only when logged."""
    from mlflow.exceptions import MlflowException

    got = False
    for path in ("recipe.yaml", "data/manifest.json", "eval"):
        target = (dest / path).parent  # MLflow puts a downloaded file or folder under its base name
        target.mkdir(parents=True, exist_ok=True)
        try:
            client.download_artifacts(run_id, path, str(target))
            got = True
        except (MlflowException, OSError):
            continue
    return got


def _read_artifacts(side: Side, root: Path) -> None:
    if (root / "recipe.yaml").is_file():
        side.recipe = _redacted((root / "recipe.yaml").read_text())
    side.manifest = _json_file(root / "data" / "manifest.json")
    for folder in sorted(p for p in (root / "eval").glob("*") if p.is_dir()):
        result = _json_file(folder / "result.json") or {}
        if result.get("model", "candidate" if "candidate" in folder.name else "base") != "candidate":
            continue
        _read_eval_dir(side, folder, result.get("task") or _task_of(folder))


def _task_of(folder: Path) -> str:
    results = _json_file(folder / "results.json") or {}
    names = list((results.get("groups") or {}) or (results.get("results") or {}))
    return names[0] if names else folder.name


def _read_eval_dir(side: Side, folder: Path, task: str) -> None:
    results = _json_file(folder / "results.json")
    if results is not None:
        side.results[task] = results
    samples = folder / "samples.jsonl"
    if samples.is_file():
        side.samples[task] = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]


def _json_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- scores --------------------------------------------------------------------------------------------


def score_rows(candidate: Side, reference: Side | None) -> list[ScoreRow]:
    metrics = sorted(set(candidate.scores) | set(reference.scores if reference else ()))
    rows = []
    for metric in metrics:
        cand_err, source = stderr(candidate, metric)
        ref_err, ref_source = stderr(reference, metric) if reference else (None, source)
        rows.append(
            ScoreRow(
                metric,
                candidate.scores.get(metric),
                reference.scores.get(metric) if reference else None,
                cand_err,
                ref_err,
                source if cand_err is not None else ref_source,
            )
        )
    return rows


def stderr(side: Side, metric: str) -> tuple[float | None, str]:
    """The standard error of `metric` ('<task>/<metric>'): lm-eval's own when its results.json has a number
    for it, else a bootstrap over the per-example values in samples.jsonl."""
    task, _, name = metric.partition("/")
    for entry in (side.results.get(task) or {}).get("results", {}).values():
        for key, value in entry.items():
            base, _, filter_name = key.partition(",")
            if not base.endswith("_stderr") or not _is_number(value):
                continue
            flat = base.removesuffix("_stderr") + ("" if filter_name in ("", "none") else f"_{filter_name}")
            if flat == name:
                return float(value), "lm-eval stderr"
    values = [float(row[name]) for row in side.samples.get(task, []) if _is_number(row.get(name))]
    if len(values) >= 2:
        return bootstrap_stderr(values), f"bootstrap over {len(values)} examples"
    return None, _NOT_AVAILABLE


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bootstrap_stderr(values: list[float], iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> float:
    """The standard deviation of the mean over `iters` resamples with replacement (fixed seed)."""
    rng = random.Random(seed)
    n = len(values)
    means = [sum(rng.choices(values, k=n)) / n for _ in range(iters)]
    centre = sum(means) / iters
    return (sum((m - centre) ** 2 for m in means) / (iters - 1)) ** 0.5


# -- lineage -------------------------------------------------------------------------------------------


def lineage_rows(candidate: Side, reference: Side | None) -> list[tuple[str, str, str]]:
    """Lineage tags ('hpcft.*': base model, commit, hashes, layout and job ids when tagged) and the
    recipe's parallel layout, side by side."""
    keys = [k for k in _PREFERRED_TAGS if k in candidate.tags or (reference and k in reference.tags)]
    others = {k for side in (candidate, reference) if side for k in side.tags if k.startswith("hpcft.")}
    keys += sorted(others - set(keys))
    rows = [(k, candidate.tags.get(k, "-"), reference.tags.get(k, "-") if reference else "") for k in keys]
    rows.append(("layout (recipe)", _layout(candidate.recipe), _layout(reference.recipe) if reference else ""))
    return rows


def _layout(recipe_text: str | None) -> str:
    if recipe_text is None:
        return _NOT_AVAILABLE
    import yaml

    try:
        parallel = (yaml.safe_load(recipe_text) or {}).get("parallel") or {}
    except yaml.YAMLError:
        return _NOT_AVAILABLE
    return " ".join(f"{k}={v}" for k, v in parallel.items()) or "-"


def recipe_diff(candidate: Side, reference: Side | None) -> str | None:
    """Unified diff from the reference's recipe snapshot to the candidate's; '' when they are the same."""
    if reference is None or candidate.recipe is None or reference.recipe is None:
        return None
    return "".join(
        difflib.unified_diff(
            reference.recipe.splitlines(keepends=True),
            candidate.recipe.splitlines(keepends=True),
            f"{reference.label}/recipe.yaml",
            f"{candidate.label}/recipe.yaml",
        )
    )


def manifest_rows(candidate: Side, reference: Side | None) -> list[tuple[str, str, str]]:
    """Rows per split and rows rejected per step and reason; only the rows that differ when both exist."""
    cand = _manifest_counts(candidate.manifest)
    ref = _manifest_counts(reference.manifest) if reference else {}
    keys = list(cand) + [k for k in ref if k not in cand]
    rows = []
    for key in keys:
        a, b = cand.get(key), ref.get(key)
        rows.append((key, "-" if a is None else str(a), "" if reference is None else "-" if b is None else str(b)))
    return rows


def _manifest_counts(manifest: dict | None) -> dict[str, int]:
    if not manifest:
        return {}
    out = {f"rows {split}": int(n) for split, n in (manifest.get("splits") or {}).items()}
    for step, info in (manifest.get("steps") or {}).items():
        if isinstance(info, dict) and info.get("rejected"):
            out[f"rejected {step}"] = int(info["rejected"])
            for reason, n in (info.get("reasons") or {}).items():
                out[f"rejected {step}/{reason}"] = int(n)
    if manifest.get("manifest_hash"):
        out["manifest hash"] = manifest["manifest_hash"][:12]
    return out


# -- examples ------------------------------------------------------------------------------------------


def examples(candidate: Side, reference: Side | None, n: int) -> list[Example]:
    """Up to `n` held-out prompts (generation tasks first) with both models' answers, matched by document."""
    out: list[Example] = []
    tasks = sorted(candidate.samples, key=lambda t: (not _is_generation(candidate.samples[t]), t))
    for task in tasks:
        ref_rows = {_doc_key(r): r for r in (reference.samples.get(task, []) if reference else [])}
        for row in sorted(candidate.samples[task], key=lambda r: r.get("doc_id", 0)):
            if len(out) >= n:
                return out
            ref = ref_rows.get(_doc_key(row))
            metric = _row_metric(row)
            out.append(
                Example(
                    task=task,
                    prompt=_prompt(row),
                    target=_target(row),
                    candidate=_answer(row),
                    reference=_answer(ref) if ref else None,
                    candidate_score=row.get(metric) if metric else None,
                    reference_score=ref.get(metric) if ref and metric else None,
                )
            )
    return out


def _doc_key(row: dict) -> str:
    return str(row.get("doc_hash") or json.dumps(row.get("doc"), sort_keys=True, default=str))


def _is_generation(rows: list[dict]) -> bool:
    return bool(rows) and all(isinstance(r, str) for r in rows[0].get("filtered_resps") or [None])


def _row_metric(row: dict) -> str | None:
    return next((k for k in ("exact_match", "acc", "acc_norm") if _is_number(row.get(k))), None)


def _prompt(row: dict) -> str:
    args = row.get("arguments") or []
    first = args[0] if args else None
    if isinstance(first, dict):  # lm-eval >= 0.4.5 keys its arguments gen_args_0, ...
        first = next(iter(first.values()), None)
    if isinstance(first, (list, tuple)) and first:
        return str(first[0])
    doc = row.get("doc")
    return str(doc.get("prompt") or doc.get("question") or doc) if isinstance(doc, dict) else str(doc)


def _target(row: dict) -> str:
    """The expected answer; a multiple-choice row's target is the index of the right choice."""
    target, doc = row.get("target", ""), row.get("doc")
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if isinstance(target, int) and isinstance(choices, list) and 0 <= target < len(choices):
        return str(choices[target])
    return str(target)


def _answer(row: dict) -> str:
    resps = row.get("filtered_resps") or []
    if resps and all(isinstance(r, str) for r in resps):
        return resps[0]
    # multiple choice: one (loglikelihood, is_greedy) per choice; the answer is the likeliest choice
    try:
        lls = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in resps]
    except (TypeError, ValueError, IndexError):
        return str(resps)[:200]
    if not lls:
        return ""
    best = max(range(len(lls)), key=lls.__getitem__)
    choices = (row.get("doc") or {}).get("choices") if isinstance(row.get("doc"), dict) else None
    if isinstance(choices, list) and best < len(choices):
        return str(choices[best])
    args = row.get("arguments") or []
    arg = args[best] if best < len(args) else None
    if isinstance(arg, dict):
        arg = next(iter(arg.values()), None)
    return str(arg[1]).strip() if isinstance(arg, (list, tuple)) and len(arg) > 1 else f"choice {best}"


# -- rendering -----------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _pm(value: float | None, err: float | None) -> str:
    return _num(value) + (f" ± {err:.3f}" if err is not None and value is not None else "")


def render_rich(rv: Review, console) -> None:
    """The review as rich tables on `console`."""
    from rich.markup import escape
    from rich.table import Table

    ref = rv.reference
    console.print(f"[bold]{escape(rv.title)}[/]  gate: {escape(rv.gate)}")
    for note in rv.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    scores = Table(title="scores")
    for col in ("metric", rv.candidate.label, *((ref.label, "delta") if ref else ()), "uncertainty"):
        scores.add_column(escape(col))
    for row in rv.scores:
        cells = [row.metric, _pm(row.candidate, row.candidate_err)]
        if ref:
            cells += [_pm(row.reference, row.reference_err), _num(row.delta, sign=True)]
        scores.add_row(*map(escape, cells + [row.err_source]))
    console.print(scores)
    gate = Table(title=f"gate checks of {rv.candidate.label}: {rv.gate}")
    gate.add_column("check")
    for line in rv.gate_reasons or ["(no checks recorded)"]:
        gate.add_row(("[red]" if line.startswith("FAIL") else "") + escape(line))
    console.print(gate)
    for title, rows in (("lineage", rv.lineage), ("data manifest", rv.manifest)):
        table = Table(title=title)
        for col in ("", rv.candidate.label, *((ref.label,) if ref else ())):
            table.add_column(escape(col))
        for key, a, b in rows or [("(not available)", "", "")]:
            mark = "[bold]" if ref and a != b else ""
            table.add_row(*(mark + escape(c) for c in (key, a, *((b,) if ref else ()))))
        console.print(table)
    if ref:
        if rv.recipe_diff is None:
            console.print("recipe diff: not available (a recipe snapshot is missing)")
        elif rv.recipe_diff == "":
            console.print("recipe diff: the recipe snapshots are identical")
        else:
            console.print("[bold]recipe diff[/]")
            console.print(escape(rv.recipe_diff), highlight=False)
    ex = Table(title=f"held-out examples ({len(rv.examples)})")
    for col in ("task", "prompt", "target", rv.candidate.label, *((ref.label,) if ref else ())):
        ex.add_column(escape(col), overflow="fold")
    for e in rv.examples:
        cells = [e.task, _tail(e.prompt), e.target, _answered(e.candidate, e.candidate_score)]
        if ref:
            cells.append(_answered(e.reference, e.reference_score))
        ex.add_row(*map(escape, cells))
    console.print(ex)
    console.print(f"{rv.candidate.label} from {escape(rv.candidate.found_in)}")
    if ref:
        console.print(f"{ref.label} from {escape(ref.found_in)}")


def _tail(prompt: str, limit: int = 160) -> str:
    """The end of a prompt (the question; a chat template's preamble comes first)."""
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= limit else "…" + prompt[-limit:]


def _answered(answer: str | None, score) -> str:
    if answer is None:
        return "not available"
    mark = "" if not _is_number(score) else " ✓" if score >= 1 else " ✗"
    return (answer.strip() or "(empty)") + mark


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d2433;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #d7dbe3}
table{border-collapse:collapse;margin:6px 0;font-size:13px} td,th{border:1px solid #d7dbe3;padding:4px 8px;
text-align:left;vertical-align:top} th{background:#eef1f6} .num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#0a7a2f;font-weight:600} .neg{color:#b3261e;font-weight:600} .fail{background:#fde8e6}
.pass{background:#e7f6ea} .diff{background:#f6f8fa;padding:8px;font-size:12px;overflow:auto;border:1px solid #d7dbe3}
.add{color:#0a7a2f} .del{color:#b3261e} .hunk{color:#6b4fbb} .note{color:#8a5a00} .differs td{font-weight:600}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:12px;color:#fff}
.badge.passed{background:#0a7a2f} .badge.rejected{background:#b3261e} .badge.unset{background:#777}
.prompt{max-width:520px;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
"""


def render_html(rv: Review) -> str:
    """The review as one self-contained HTML page (inline CSS, no scripts, no external URLs)."""
    e = html.escape
    ref = rv.reference
    gate_class = rv.gate if rv.gate in ("passed", "rejected") else "unset"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(rv.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Review: {e(rv.title)}</h1>",
        f"<p>gate: <span class='badge {gate_class}'>{e(rv.gate)}</span></p>",
    ]
    parts += [f"<p class='note'>note: {e(n)}</p>" for n in rv.notes]
    head = ["metric", rv.candidate.label, *((ref.label, "delta") if ref else ()), "uncertainty"]
    parts.append("<h2>Scores</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    for row in rv.scores:
        cells = [f"<td>{e(row.metric)}</td>", f"<td class='num'>{e(_pm(row.candidate, row.candidate_err))}</td>"]
        if ref:
            delta = row.delta
            cls = "pos" if delta and delta > 0 else "neg" if delta and delta < 0 else ""
            cells.append(f"<td class='num'>{e(_pm(row.reference, row.reference_err))}</td>")
            cells.append(f"<td class='num {cls}'>{e(_num(delta, sign=True))}</td>")
        cells.append(f"<td>{e(row.err_source)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    parts.append(f"<h2>Gate checks of {e(rv.candidate.label)}</h2><table><tr><th>check</th></tr>")
    for line in rv.gate_reasons or ["(no checks recorded)"]:
        cls = "fail" if line.startswith("FAIL") else "pass" if line.startswith("PASS") else ""
        parts.append(f"<tr class='{cls}'><td>{e(line)}</td></tr>")
    parts.append("</table>")
    for title, rows in (("Lineage", rv.lineage), ("Data manifest", rv.manifest)):
        cols = ["", rv.candidate.label, *((ref.label,) if ref else ())]
        parts.append(f"<h2>{title}</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        for key, a, b in rows or [("not available", "", "")]:
            cls = " class='differs'" if ref and a != b else ""
            cells = (key, a, *((b,) if ref else ()))
            parts.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    if ref:
        parts.append("<h2>Recipe diff</h2>")
        if rv.recipe_diff is None:
            parts.append("<p class='note'>not available (a recipe snapshot is missing)</p>")
        elif rv.recipe_diff == "":
            parts.append("<p>the recipe snapshots are identical</p>")
        else:
            parts.append("<pre class='diff'>" + "".join(_diff_line(line) for line in rv.recipe_diff.splitlines()))
            parts.append("</pre>")
    cols = ["task", "prompt", "target", rv.candidate.label, *((ref.label,) if ref else ())]
    parts.append(f"<h2>Held-out examples ({len(rv.examples)})</h2><table><tr>")
    parts.append("".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
    for x in rv.examples:
        cells = [e(x.task), f"<div class='prompt'>{e(_tail(x.prompt, 400))}</div>", e(x.target)]
        cells.append(e(_answered(x.candidate, x.candidate_score)))
        if ref:
            cells.append(e(_answered(x.reference, x.reference_score)))
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    sources = [f"{rv.candidate.label} from {rv.candidate.found_in}"] + (
        [f"{ref.label} from {ref.found_in}"] if ref else []
    )
    parts += [f"<p class='note'>{e(s)}</p>" for s in sources]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _diff_line(line: str) -> str:
    cls = "hunk" if line.startswith("@@") else "add" if line.startswith("+") else "del" if line.startswith("-") else ""
    return f"<span class='{cls}'>{html.escape(line)}</span>\n"


def log_html(client, rv: Review, text: str) -> str:
    """Log the HTML as 'review/<artifact_name>' of the candidate's run; returns the artifact path."""
    with tempfile.TemporaryDirectory(prefix="hpcft-review-") as tmp:
        path = Path(tmp) / rv.artifact_name
        path.write_text(text)
        client.log_artifact(rv.candidate.run_id, str(path), "review")
    return f"review/{rv.artifact_name}"
