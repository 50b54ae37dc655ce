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
