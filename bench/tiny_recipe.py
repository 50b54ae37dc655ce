"""The tiny recipe end to end on two trees in the same run: a baseline revision and the working tree.

    .venv/bin/python -m bench.tiny_recipe --baseline REV [--recipe recipes/tiny-sft.yaml] [--repeat 1]

The baseline is checked out with `git worktree` into a temporary folder and run with this venv's
interpreter (PYTHONPATH pointing at it, so its own packages are imported, not this tree's). Each tree
runs `python -m hpc.cli run RECIPE --workdir <tmp>` from its own root, alternating when --repeat > 1, and
the script prints each run's wall time, its gate verdict and held-out scores, and the ratio
current / baseline. A refactor that should change nothing should show a ratio near 1 and equal scores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpc.progress import current_attempt

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(tree: Path, recipe: str, workdir: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.cli", "run", recipe, "--workdir", str(workdir)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{tree}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"seconds": seconds, "exit": proc.returncode, **scores(workdir), **stage_seconds(workdir)}


def stage_seconds(workdir: Path) -> dict:
    """Seconds between each stage's first and last progress event (its own work, without start-up)."""
    out = {}
    for path in sorted((workdir / "stages").glob("*/progress.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines() if '"t"' in line]
        times = [ev["t"] for ev in current_attempt(events)]  # the latest attempt, without its start record
        if len(times) > 1:
            out[f"seconds:{path.parent.name}"] = round(max(times) - min(times), 1)
    return out


def scores(workdir: Path) -> dict:
    """Held-out scores of the candidate (and base) from the eval elements' results."""
    out = {}
    for path in sorted((workdir / "stages").glob("eval*/**/*.json")):
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if isinstance(data, dict) and isinstance(data.get("scores"), dict):
            label = f"{data.get('model')}/{data.get('task')}"
            out |= {f"{label}:{k}": v for k, v in data["scores"].items() if isinstance(v, (int, float))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against (e.g. HEAD~3)")
    parser.add_argument("--recipe", default="recipes/tiny-sft.yaml")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpcft-bench-") as tmp:
        base_tree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(base_tree), args.baseline], cwd=ROOT, check=True
        )
        try:
            results = {"baseline": [], "current": []}
            for i in range(args.repeat):
                for name, tree in (("baseline", base_tree), ("current", ROOT)):
                    result = run_recipe(tree, args.recipe, Path(tmp) / f"{name}-{i}")
                    results[name].append(result)
                    print(f"{name:9s} run {i}: {result['seconds']:.1f} s, exit {result['exit']}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    base = min(r["seconds"] for r in results["baseline"])
    cur = min(r["seconds"] for r in results["current"])
    print(f"\nwall time (best of {args.repeat}): baseline {base:.1f} s, current {cur:.1f} s, ratio {cur / base:.3f}")
    keys = sorted(set(results["baseline"][0]) - {"seconds", "exit"})
    for key in keys:
        b, c = results["baseline"][0].get(key), results["current"][0].get(key)
        print(f"  {key}: baseline {b} current {c}")
    print(f"  gate exit: baseline {results['baseline'][0]['exit']} current {results['current'][0]['exit']}")


if __name__ == "__main__":
    main()
