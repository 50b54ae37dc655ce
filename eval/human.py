"""Human side-by-side: blinded answer pairs (candidate vs a reference version) for a rater to judge offline,
and the verdicts recorded as scores on the candidate's registered version.

`write_pairs` writes to a directory: `pairs.csv` (pair_id, prompt, answer_a, answer_b; sides shuffled, no
model ids), `form.html` (self-contained: radio buttons A / B / tie, a button that downloads verdicts.csv) and
`key.json` (which side is the candidate; only `import-verdicts` needs it, the rater does not).
`import_verdicts` unblinds a verdicts CSV (pair_id, verdict[, rater]) and adds it to the version's tally.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import math
import random
import time
from pathlib import Path

VERDICTS = ("A", "B", "tie")
HUMAN = "human"  # the task label of the human scores: 'human/win_rate'
KEY_TAG = "human.key"  # path of the last key.json written for the version
IMPORTS_TAG = "human.imports"  # hashes of the verdict files already counted
COUNT_TAGS = ("human/wins", "human/ties", "human/losses")
GATE_CONFIG_TAG = "gate.config"  # the recipe's gate section, for the decision after the verdicts


def pick_examples(conversations: list[dict], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    chosen = list(conversations)
    rng.shuffle(chosen)
    return chosen[:n]


def write_pairs(
    out_dir: Path, examples: list[dict], candidate: list[str], reference: list[str], about: dict, seed: int
) -> dict:
    """Blinded pairs of `candidate` vs `reference` answers to `examples` ({'id', 'messages'}); returns the key."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:sides")
    set_id = hashlib.sha256(json.dumps([about, seed, [e["id"] for e in examples]]).encode()).hexdigest()[:12]
    pairs, sides = [], {}
    for i, (example, ours, theirs) in enumerate(zip(examples, candidate, reference), 1):
        pair_id = f"{set_id}-{i:03d}"
        flip = rng.random() < 0.5
        sides[pair_id] = "B" if flip else "A"  # the candidate's side
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in example["messages"])
        pairs.append({"pair_id": pair_id, "prompt": prompt, "answer_a": theirs if flip else ours,
                      "answer_b": ours if flip else theirs})  # fmt: skip
    with open(out_dir / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["pair_id", "prompt", "answer_a", "answer_b"])
        writer.writeheader()
        writer.writerows(pairs)
    (out_dir / "form.html").write_text(_form(pairs, set_id))
    key = {"set_id": set_id, **about, "candidate_side": sides}
    (out_dir / "key.json").write_text(json.dumps(key, indent=1))
    return key


def _form(pairs: list[dict], set_id: str) -> str:
    blocks = []
    for p in pairs:
        pid = html.escape(p["pair_id"])
        radios = "".join(f'<label><input type="radio" name="{pid}" value="{v}"> {v}</label> ' for v in VERDICTS)
        blocks.append(
            f'<section><h3>{pid}</h3><pre class="prompt">{html.escape(p["prompt"])}</pre>'
            f'<div class="pair"><div><b>A</b><pre>{html.escape(p["answer_a"])}</pre></div>'
            f"<div><b>B</b><pre>{html.escape(p['answer_b'])}</pre></div></div><p>{radios}</p></section>"
        )
    ids = json.dumps([p["pair_id"] for p in pairs])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Side-by-side {set_id}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:auto}}
pre{{white-space:pre-wrap;background:#f4f4f4;padding:.5em}}
.pair{{display:grid;grid-template-columns:1fr 1fr;gap:1em}} section{{border-bottom:1px solid #ccc}}</style></head>
<body><h1>Which answer is better?</h1><p>For each prompt pick A, B or tie, then download your verdicts.</p>
<p>Rater: <input id="rater" placeholder="your name"></p>
{"".join(blocks)}
<p><button id="download" onclick="download()">Download verdicts.csv</button> <span id="status"></span></p>
<script>
const ids = {ids};
function cell(s) {{ return '"' + String(s).replace(/"/g, '""') + '"'; }}
function download() {{
  const rater = document.getElementById("rater").value;
  const rows = ["pair_id,verdict,rater"];
  let missing = 0;
  for (const id of ids) {{
    const picked = document.querySelector('input[name="' + id + '"]:checked');
    if (!picked) {{ missing++; continue; }}
    rows.push([id, picked.value, rater].map(cell).join(","));
  }}
  const blob = new Blob([rows.join("\\n") + "\\n"], {{type: "text/csv"}});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "verdicts.csv";
  link.click();
  document.getElementById("status").textContent = (rows.length - 1) + " verdicts, " + missing + " unanswered";
}}
</script></body></html>
"""


def read_verdicts(path: Path, key: dict) -> tuple[list[dict], list[str]]:
    """Unblinded verdicts [{'pair_id', 'verdict', 'outcome', 'rater'}] and the problems (one line each)."""
    rows, problems = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"pair_id", "verdict"} <= set(reader.fieldnames):
            return [], [f"{path}: expected a CSV with columns pair_id, verdict[, rater]"]
        for line_no, row in enumerate(reader, 2):
            side = key["candidate_side"].get(row["pair_id"])
            verdict = (row["verdict"] or "").strip()
            verdict = "tie" if verdict.lower() == "tie" else verdict.upper()
            if side is None:
                problems.append(f"{path}:{line_no}: pair {row['pair_id']!r} is not in set {key['set_id']}")
            elif verdict not in VERDICTS:
                problems.append(f"{path}:{line_no}: verdict {row['verdict']!r} is not one of A, B, tie")
            else:
                outcome = "tie" if verdict == "tie" else "win" if verdict == side else "loss"
                rows.append({"pair_id": row["pair_id"], "verdict": verdict, "outcome": outcome,
                             "rater": (row.get("rater") or "").strip()})  # fmt: skip
    return rows, problems


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (ties count half a win)."""
    if n == 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def tally(tags: dict[str, str], verdicts: list[dict]) -> dict[str, float]:
    """The version's human scores after adding `verdicts` to the counts in its tags."""
    wins, ties, losses = (float(tags.get(k, 0)) for k in COUNT_TAGS)
    wins += sum(v["outcome"] == "win" for v in verdicts)
    ties += sum(v["outcome"] == "tie" for v in verdicts)
    losses += sum(v["outcome"] == "loss" for v in verdicts)
    n = int(wins + ties + losses)
    rate = (wins + ties / 2) / n if n else float("nan")
    low, high = wilson(rate, n) if n else (float("nan"), float("nan"))
    return {"human/wins": wins, "human/ties": ties, "human/losses": losses, "human/n": float(n),
            "human/win_rate": rate, "human/win_rate_low": low, "human/win_rate_high": high}  # fmt: skip


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def blind_pairs(
    client,
    name: str,
    version: str,
    against: str,
    out_dir: Path,
    *,
    n: int = 50,
    seed: int = 0,
    prompts: Path | None = None,
    max_new_tokens: int = 64,
) -> dict:
    """Blinded pairs for `version` vs `against` ('champion' or a version): answers generated by both models
    on the version's held-out prompts (its run directory's data stage) or the `prompts` JSONL file."""
    from eval import registry
    from eval.judge import file_prompts, generate_answers, heldout_prompts
    from eval.lineage import RUN_DIR

    mv = registry.model_version(client, name, version)
    reference = registry.champion_version(client, name) if against == "champion" else against
    if reference is None:
        raise ValueError(f"{name} has no champion to compare with; give --against VERSION")
    registry.model_version(client, name, reference)
    if str(reference) == str(version):
        raise ValueError(f"version {version} is the reference itself; give --against another version")
    if prompts is not None:
        examples = file_prompts(Path(prompts), None)
    else:
        run_dir = mv.tags.get(RUN_DIR)
        if not run_dir or not (Path(run_dir) / "stages" / "data").is_dir():
            raise ValueError(f"version {version}'s run directory {run_dir!r} is gone; give --prompts FILE")
        examples = heldout_prompts(Path(run_dir) / "stages" / "data", None)
    examples = pick_examples(examples, n, seed)
    cache = Path(out_dir) / ".models"
    conversations = [e["messages"] for e in examples]
    ours = generate_answers(registry.version_model_dir(client, name, version, cache / version), conversations,
                            max_new_tokens)  # fmt: skip
    theirs = generate_answers(registry.version_model_dir(client, name, reference, cache / str(reference)),
                              conversations, max_new_tokens)  # fmt: skip
    about = {"name": name, "version": str(version), "reference_version": str(reference), "created": now()}
    key = write_pairs(Path(out_dir), examples, ours, theirs, about, seed)
    client.set_model_version_tag(name, str(version), KEY_TAG, str((Path(out_dir) / "key.json").resolve()))
    return key


def import_verdicts(client, path: Path, name: str, version: str, rater: str | None, key_path: Path | None) -> dict:
    """Record a verdicts CSV on `version`: score.human/win_rate, human/n, its Wilson interval, counts (tags),
    the same as metrics on its run, the unblinded verdicts as an artifact; then the gate decides again when
    it waited for them (gate.require_human). Returns the tally plus 'status' and 'reasons' when decided."""
    from eval import registry

    mv = registry.model_version(client, name, version)
    tags = dict(mv.tags)
    key_path = Path(key_path or tags.get(KEY_TAG) or "")
    if not key_path.is_file():
        raise ValueError(f"no key.json for {name} version {version}; give --key (written by blind-pairs)")
    key = json.loads(key_path.read_text())
    if (key.get("name"), key.get("version")) != (name, str(version)):
        raise ValueError(f"{key_path} blinds {key.get('name')} version {key.get('version')}, not {name} {version}")
    digest = file_hash(path)
    done = [d for d in tags.get(IMPORTS_TAG, "").split(",") if d]
    if digest in done:
        raise ValueError(f"{path} was already imported for {name} version {version}")
    verdicts, problems = read_verdicts(Path(path), key)
    if problems:
        raise ValueError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    if not verdicts:
        raise ValueError(f"{path}: no verdicts")
    stamp = now()
    for v in verdicts:
        v.update(rater=rater or v["rater"] or "unknown", time=stamp, set_id=key["set_id"])
    scores = tally(tags, verdicts)
    _record(client, mv, scores, verdicts, done + [digest], stamp)
    return scores | _decide_again(client, name, str(version), tags, scores)


def _record(client, mv, scores: dict, verdicts: list[dict], imports: list[str], stamp: str) -> None:
    import tempfile

    from eval.registry import tag_key

    name, version = mv.name, str(mv.version)
    client.set_model_version_tag(name, version, "score.human/win_rate", repr(scores["human/win_rate"]))
    for key, value in scores.items():
        if key != "human/win_rate":
            client.set_model_version_tag(name, version, key, repr(value))
    client.set_model_version_tag(name, version, IMPORTS_TAG, ",".join(imports))
    before = client.get_model_version(name, version).tags.get("human.raters", "")
    raters = sorted({v["rater"] for v in verdicts} | {r for r in before.split(",") if r})
    client.set_model_version_tag(name, version, "human.raters", ",".join(raters)[:500])
    if mv.run_id:
        step = int(scores["human/n"])
        for key in ("human/win_rate", "human/n", "human/win_rate_low", "human/win_rate_high"):
            client.log_metric(mv.run_id, key, scores[key], step=step)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / tag_key(f"verdicts-{stamp}-{imports[-1]}.jsonl").replace(":", "")
            out.write_text("".join(json.dumps(v) + "\n" for v in verdicts))
            client.log_artifact(mv.run_id, str(out), "human")


def _decide_again(client, name: str, version: str, tags: dict, scores: dict) -> dict:
    """When the version waits for side-by-side verdicts, decide the gate with human/win_rate included."""
    from eval import registry
    from eval.config import GateConfig
    from eval.gate import Evidence, decide_with_human

    if GATE_CONFIG_TAG not in tags:  # registered without gate.require_human: its verdict stands
        return {}
    cfg = GateConfig.model_validate_json(tags[GATE_CONFIG_TAG])
    candidate = registry.scores_of(tags) | {"human/win_rate": scores["human/win_rate"]}
    champ = registry.champion_scores(client, name)
    champion = champ[1] if champ and champ[0] != version else None
    base = _base_scores(tags)
    evidence = None
    if champion is not None:  # what the significance test can still find: run directories, stderr tags
        ours, theirs = (
            registry.champion_evidence(client, name, version),
            registry.champion_evidence(client, name, champ[0]),
        )
        evidence = Evidence(ours[0], theirs[0], ours[1], theirs[1])
    verdict, status = decide_with_human(candidate, base, champion, cfg, evidence, int(scores["human/n"]))
    registry.set_gate(client, name, version, verdict, status)
    return {"status": status, "reasons": verdict.reasons}


def _base_scores(tags: dict) -> dict | None:
    """The base model's scores from the version's run directory (its gate result), when still there."""
    from eval.lineage import RUN_DIR

    result = Path(tags.get(RUN_DIR, "")) / "stages" / "gate" / "result.json"
    if not tags.get(RUN_DIR) or not result.is_file():
        return None
    return json.loads(result.read_text())["scores"].get("base")
