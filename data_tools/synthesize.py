"""Synthetic rows: a generator (OpenAI-compatible endpoint or local HF model) writes instruction/response
pairs from seeds (topics or example rows), as a datatrove run whose ranks share the seeds.

Resumable: each seed's outcome (its rows, or the malformed reply and why) is one line appended and fsynced
to `<state>/progress/<rank>.jsonl` as soon as the reply is in; a rank that starts again (requeued, killed,
rerun) asks only for seeds no progress file holds. The state folder is keyed by a hash of the generation
settings, so changed settings start afresh; a seed's id is a hash of its text, so added seeds do not
disturb finished ones. Each rank then writes its share of the rows, with provenance (generator, template
hash, seed id), to `<rows>/<rank>.jsonl` for the normalise run, malformed replies to
`<rows>/malformed/<rank>.jsonl` and its counts to `<rows>/counts/<rank>.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_tools.config import PIIConfig, SynthesizeConfig, resolve
from data_tools.normalise import RowError, json_line, read_rows, to_messages


class SynthesisError(RuntimeError):
    """The generator cannot be used (unreachable, HTTP errors after retries, missing key): one line."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def generator_name(cfg: SynthesizeConfig) -> str:
    if cfg.endpoint is not None:
        return f"{cfg.endpoint.model} @ {cfg.endpoint.base_url}"
    return f"local:{cfg.local}"


def state_key(cfg: SynthesizeConfig) -> str:
    """What a generated row depends on besides its seed; a change starts the progress afresh."""
    settings = [generator_name(cfg), cfg.template, cfg.rows_per_seed, cfg.temperature, cfg.max_tokens]
    return sha256_text(json.dumps(settings))[:16]


def load_seeds(cfg: SynthesizeConfig, base_dir: Path) -> list[tuple[str, str]]:
    """(seed id, seed text) in recipe/file order, duplicates once; an example row is shown as its turns."""
    if cfg.topics is not None:
        texts = [topic.strip() for topic in cfg.topics]
    else:
        path = resolve(cfg.seed_rows, base_dir)
        texts = []
        for i, row, _line, unreadable in read_rows(path):
            if unreadable == "blank":
                continue
            try:
                if unreadable is not None:
                    raise RowError(unreadable)
                messages = to_messages(row)
            except RowError as err:
                raise ValueError(f"synthesize.seed_rows: {path} line {i + 1}: {err.reason}") from None
            texts.append("\n".join(f"{m['role']}: {m['content']}" for m in messages))
    if not texts:
        raise ValueError(f"synthesize.seed_rows: {cfg.seed_rows} holds no rows")
    seeds = {}
    for text in texts:
        seeds.setdefault(sha256_text(text)[:16], text)
    return list(seeds.items())


def parse_reply(text: str, limit: int) -> list[dict]:
    """Up to `limit` {instruction, response} pairs from the generator's reply (a JSON array, possibly inside
    a ``` fence); RowError with a short reason when the reply is not that."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    body = (fenced.group(1) if fenced else text).strip()
    try:
        items = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        raise RowError("not_json") from None
    if not isinstance(items, list) or not items:
        raise RowError("not_a_list")
    pairs = []
    for item in items[:limit]:
        if not isinstance(item, dict):
            raise RowError("item_not_an_object")
        instruction, response = item.get("instruction"), item.get("response", item.get("output"))
        if not isinstance(instruction, str) or not isinstance(response, str):
            raise RowError("item_missing_field")
        if not instruction.strip() or not response.strip():
            raise RowError("item_empty_field")
        pairs.append({"instruction": instruction.strip(), "response": response.strip()})
    return pairs


class EndpointGenerator:
    """The judge's client settings (eval.judge.Endpoint) with sampling; the openai client retries timeouts,
    429 and 5xx with exponential backoff (endpoint.max_retries)."""

    def __init__(self, cfg: SynthesizeConfig):
        import openai

        endpoint = cfg.endpoint
        key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
        if endpoint.api_key_env and not key:
            raise SynthesisError(f"synthesize: environment variable {endpoint.api_key_env!r} is not set")
        self.cfg = cfg
        self.client = openai.OpenAI(
            base_url=endpoint.base_url,
            api_key=key or "unused",
            timeout=endpoint.timeout,
            max_retries=endpoint.max_retries,
        )

    def __call__(self, prompt: str) -> str:
        import openai

        endpoint = self.cfg.endpoint
        try:
            reply = self.client.chat.completions.create(
                model=endpoint.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
            )
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise SynthesisError(f"synthesize: endpoint {endpoint.base_url} is unreachable ({err})") from None
        except openai.APIStatusError as err:
            raise SynthesisError(
                f"synthesize: endpoint {endpoint.base_url} answered HTTP {err.status_code} "
                f"after {endpoint.max_retries} retries"
            ) from None
        return reply.choices[0].message.content or ""


class LocalGenerator:
    """A local HF causal LM sampling at the configured temperature (greedy at 0), its own chat template."""

    def __init__(self, cfg: SynthesizeConfig):
        from eval.heldout import _renderer
        from eval.judge import _load

        self.cfg = cfg
        self.tokenizer, self.model = _load(Path(cfg.local))
        self.render = _renderer(self.tokenizer)

    def __call__(self, prompt: str) -> str:
        import torch

        tok = self.tokenizer
        ids = tok(
            self.render([{"role": "user", "content": prompt}], True), return_tensors="pt", add_special_tokens=False
        )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        sample = {"do_sample": True, "temperature": self.cfg.temperature} if self.cfg.temperature > 0 else {}
        with torch.no_grad():
            out = self.model.generate(
                **ids.to(self.model.device), max_new_tokens=self.cfg.max_tokens, pad_token_id=pad, **sample
            )
        return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def read_progress(folder: Path) -> set[str]:
    """The ids of the seeds the progress files hold (a line cut short by a kill does not count)."""
    done = set()
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, "rb") as f:
            for raw in f:
                if raw.endswith(b"\n"):
                    try:
                        done.add(json.loads(raw)["seed_id"])
                    except (json.JSONDecodeError, KeyError):
                        continue
    return done


def _cut_partial_line(path: Path) -> None:
    """A kill during an append leaves a last line without its newline; drop it before appending."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class Synthesizer(PipelineStep):
    """Asks the generator for the rank's share of the seeds it has no answer for yet; yields nothing."""

    type = "🧪 - SYNTH"
    name = "🧪 Synthesize"

    def __init__(
        self, cfg: SynthesizeConfig, seeds: list[tuple[str, str]], state_dir: str, rows_dir: str, pii: PIIConfig
    ):
        super().__init__()
        self.cfg, self.seeds, self.state_dir, self.rows_dir, self.pii = cfg, seeds, state_dir, rows_dir, pii
        self.needs_fresh_process = cfg.local is not None  # torch in a forked rank hangs (data_tools.stage)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        share = self.seeds[rank::world_size]
        progress = Path(self.state_dir) / "progress"
        progress.mkdir(parents=True, exist_ok=True)
        mine = progress / f"{rank:05d}.jsonl"
        _cut_partial_line(mine)
        done = read_progress(progress)
        todo = [(seed_id, text) for seed_id, text in share if seed_id not in done]
        asked = 0
        if todo:
            generate = EndpointGenerator(self.cfg) if self.cfg.endpoint is not None else LocalGenerator(self.cfg)
            with open(mine, "a", encoding="utf-8") as f:
                for seed_id, text in todo:
                    reply = generate(
                        self.cfg.template.replace("{seed}", text).replace("{n}", str(self.cfg.rows_per_seed))
                    )
                    asked += 1
                    self.stat_update("requests")
                    try:
                        outcome = {"rows": parse_reply(reply, self.cfg.rows_per_seed)}
                    except RowError as err:
                        outcome = {"malformed": err.reason, "reply": reply}
                    f.write(json_line({"seed_id": seed_id, **outcome}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        self._write_rows(progress, {seed_id for seed_id, _ in share}, rank, asked)
        return
        yield

    def _write_rows(self, progress: Path, share: set[str], rank: int, asked: int) -> None:
        """The share's rows with provenance, its malformed replies (scrubbed) and counts, from the progress."""
        from data_tools.pii import Scrubber

        scrub = Scrubber(self.pii).scrub
        rows_dir = Path(self.rows_dir)
        for sub in ("", "malformed", "counts"):
            (rows_dir / sub).mkdir(parents=True, exist_ok=True)
        template_hash = sha256_text(self.cfg.template)
        counts = {"seeds": len(share), "requests": asked, "generated": 0, "malformed": Counter()}
        seen = set()
        name = f"{rank:05d}.jsonl"
        with open(rows_dir / name, "w") as rows, open(rows_dir / "malformed" / name, "w") as bad:
            for path in sorted(progress.glob("*.jsonl")):
                with open(path, "rb") as f:
                    for raw in f:
                        if not raw.endswith(b"\n"):
                            continue
                        try:
                            record = json.loads(raw)
                        except json.JSONDecodeError:
                            continue
                        seed_id = record.get("seed_id")
                        if seed_id not in share or seed_id in seen:
                            continue
                        seen.add(seed_id)
                        if "malformed" in record:
                            counts["malformed"][record["malformed"]] += 1
                            reply = scrub(record["reply"])[0]
                            bad.write(
                                json_line({"seed_id": seed_id, "reason": record["malformed"], "reply": reply}) + "\n"
                            )
                            continue
                        for k, pair in enumerate(record["rows"]):
                            provenance = {
                                "generator": generator_name(self.cfg),
                                "template_sha256": template_hash,
                                "seed_id": seed_id,
                                "row": k,
                            }
                            row = {"instruction": pair["instruction"], "output": pair["response"]}
                            rows.write(json_line(row | {"provenance": provenance}) + "\n")
                            counts["generated"] += 1
        (rows_dir / "counts" / f"{rank:05d}.json").write_text(json.dumps(counts))


def read_synth_counts(rows_dir: Path) -> dict:
    """Counts summed over the ranks: seeds, requests (this attempt), generated rows, malformed by reason."""
    totals = {"seeds": 0, "requests": 0, "generated": 0, "malformed": Counter()}
    for path in sorted((Path(rows_dir) / "counts").glob("*.json")):
        counts = json.loads(path.read_text())
        for key in ("seeds", "requests", "generated"):
            totals[key] += counts[key]
        totals["malformed"].update(counts["malformed"])
    totals["malformed"] = dict(sorted(totals["malformed"].items()))
    return totals
