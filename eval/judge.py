"""LLM-as-judge evaluation: the candidate's answers scored on a rubric, or compared pairwise with a reference
model's answers (the champion, else the base model), by an OpenAI-compatible endpoint or a local HF model.

One element writes `judge.jsonl` (every judgement: prompt, answers, order, the judge's raw text, the parsed
verdict) and returns flat metrics: rubric ``<criterion>``, ``<criterion>_stderr``, ``score``, ``score_stderr``;
pairwise ``win_rate``, ``win_rate_stderr``, ``position_consistency``; both ``n`` and ``unparsed`` (counts).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from eval.config import EvalConfig

DEFAULT_CRITERIA = {
    "helpfulness": "Does the answer address what the user asked and actually help them?",
    "accuracy": "Is the answer factually and logically correct?",
    "format": "Does the answer follow the requested format, concise and well structured?",
    "tone": "Is the tone appropriate, clear and respectful?",
}
PAIR_OPTIONS = ("A", "B", "tie")
COUNTS = ("n", "unparsed")  # reported as metrics, never compared by the gate
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class JudgeError(RuntimeError):
    """The judge cannot run (unreachable endpoint, missing key): one line for the element's log."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Strict):
    base_url: str = Field(description="OpenAI-compatible API root, e.g. http://vllm-host:8000/v1")
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(None, description="the environment variable holding the key (never the key)")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(5, ge=0, description="retries of timeouts, 429 and 5xx, with exponential backoff")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        url = urlparse(v)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"{v!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000/v1")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"{v!r} is not an environment variable name (give the variable's name, not the key)")
        return v


class JudgeSpec(_Strict):
    """The `judge:` mapping of an eval task."""

    name: str = Field("judge", description="the task's label: metrics are '<name>/<metric>'")
    mode: Literal["rubric", "pairwise"] = "rubric"
    endpoint: Endpoint | None = None
    local: str | None = Field(None, description="a local HF causal-LM directory used as the judge")
    criteria: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_CRITERIA))
    scale: tuple[int, int] = (1, 5)
    against: Literal["champion", "base"] = Field("champion", description="pairwise reference model")
    prompts: str | None = Field(None, description="a JSONL file with 'prompt' or 'messages'; default: held-out")
    limit: int | None = Field(None, ge=1, description="default: eval.limit")
    max_new_tokens: int | None = Field(None, ge=1, description="default: eval.max_new_tokens")
    parse_retries: int = Field(2, ge=0, description="asks again when the judge's reply does not parse")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(_NAME, v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '.' and '-' (it names a directory of the run)")
        return v

    @field_validator("local", "prompts")
    @classmethod
    def _against_recipe_dir(cls, v: str | None, info: ValidationInfo) -> str | None:
        base_dir = (info.context or {}).get("base_dir")
        if v is None or base_dir is None:
            return v
        path = Path(v).expanduser()
        return os.path.normpath(path if path.is_absolute() else Path(base_dir) / path)

    @model_validator(mode="after")
    def _consistent(self) -> JudgeSpec:
        if (self.endpoint is None) == (self.local is None):
            raise ValueError("give exactly one judge: endpoint {base_url, model, api_key_env} or local: <dir>")
        low, high = self.scale
        if not 0 <= low < high <= 9:
            raise ValueError(f"scale {list(self.scale)}: expected [low, high] with 0 <= low < high <= 9")
        if not self.criteria:
            raise ValueError("criteria: give at least one criterion")
        for criterion in self.criteria:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", criterion) or criterion in ("score", *COUNTS):
                raise ValueError(f"criteria: {criterion!r} cannot name a metric (letters, digits, '_'; not 'score')")
        return self

    @property
    def metrics(self) -> tuple[str, ...]:
        """The scores the gate sees (the COUNTS are logged to MLflow only)."""
        if self.mode == "pairwise":
            return ("win_rate", "win_rate_stderr", "position_consistency")
        per = [m for c in self.criteria for m in (c, f"{c}_stderr")]
        return (*per, "score", "score_stderr")

    def check(self) -> str | None:
        """What can be checked offline: the key's variable is set, the local judge and prompt file exist."""
        if self.endpoint and self.endpoint.api_key_env and not os.environ.get(self.endpoint.api_key_env):
            return (
                f"judge.endpoint.api_key_env: environment variable {self.endpoint.api_key_env!r} is not set "
                "(export it where the eval jobs run)"
            )
        if self.local is not None and not (Path(self.local) / "config.json").is_file():
            return f"judge.local: {self.local!r} is not a Hugging Face model directory (no config.json)"
        if self.prompts is not None and not Path(self.prompts).is_file():
            return f"judge.prompts: no such file {self.prompts!r}"
        return None


# ---- prompts


def load_prompts(spec: JudgeSpec, data_dir: Path, limit: int | None) -> list[dict]:
    """[{'id', 'messages'}] (the conversation up to the answer) from spec.prompts or the held-out split."""
    if spec.prompts is None:
        return heldout_prompts(Path(data_dir), limit)
    return file_prompts(Path(spec.prompts), limit)


def heldout_prompts(data_dir: Path, limit: int | None) -> list[dict]:
    from eval.heldout import _read_rows

    return [{"id": str(r["id"]), "messages": r["messages"][:-1]} for r in _read_rows(Path(data_dir), limit)]


def file_prompts(path: Path, limit: int | None) -> list[dict]:
    """A JSONL file's rows with a 'prompt' string or 'messages' (a last assistant turn is dropped)."""
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            messages = row.get("messages") or (
                [{"role": "user", "content": row["prompt"]}] if "prompt" in row else None
            )
            if not messages:
                raise ValueError(f"{path}:{line_no}: expected a 'prompt' or 'messages' field")
            if messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            out.append({"id": str(row.get("id", line_no)), "messages": messages})
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def generate_answers(model_dir: Path, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers of the HF model in `model_dir`, prompts rendered with its chat template (as in eval)."""
    import torch

    from eval.heldout import _end_of_turn, _renderer

    tokenizer, model = _load(model_dir)
    render = _renderer(tokenizer)
    end = _end_of_turn(render, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    with torch.no_grad():
        for messages in conversations:
            ids = tokenizer(render(messages, True), return_tensors="pt", add_special_tokens=False).to(model.device)
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=False)
            answers.append(text.split(end)[0].replace(tokenizer.eos_token or "\0", "").strip())
    return answers


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return tokenizer, model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


# ---- judges


class EndpointJudge:
    """An OpenAI-compatible chat endpoint through the `openai` client (its retries back off exponentially)."""

    def __init__(self, endpoint: Endpoint):
        import openai

        key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
        if endpoint.api_key_env and not key:
            raise JudgeError(f"judge: environment variable {endpoint.api_key_env!r} (the endpoint's key) is not set")
        self.endpoint = endpoint
        self.client = openai.OpenAI(
            base_url=endpoint.base_url,
            api_key=key or "unused",
            timeout=endpoint.timeout,
            max_retries=endpoint.max_retries,
        )

    def probe(self) -> None:
        """Fail before any answer is generated when nothing listens at base_url (not through a proxy)."""
        if any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
            return
        import socket

        url = urlparse(self.endpoint.base_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=min(10.0, self.endpoint.timeout)).close()
        except OSError as err:
            raise JudgeError(
                f"judge endpoint {self.endpoint.base_url} is unreachable ({err.strerror or err})"
            ) from None

    def ask(self, messages: list[dict], options: tuple[str, ...]) -> str:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.endpoint.model, messages=messages, temperature=0.0, max_tokens=16
            )
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise JudgeError(f"judge endpoint {self.endpoint.base_url} is unreachable ({err})") from None
        except openai.APIStatusError as err:
            raise JudgeError(
                f"judge endpoint {self.endpoint.base_url} answered HTTP {err.status_code} "
                f"after {self.endpoint.max_retries} retries"
            ) from None
        return reply.choices[0].message.content or ""


class LocalJudge:
    """A local HF causal LM: picks the allowed answer with the highest likelihood, so its output always parses."""

    def probe(self) -> None:
        pass

    def __init__(self, model_dir: str):
        from eval.heldout import _renderer

        self.tokenizer, self.model = _load(Path(model_dir))
        self.render = _renderer(self.tokenizer)

    def ask(self, messages: list[dict], options: tuple[str, ...]) -> str:
        import torch

        prompt = self.tokenizer(self.render(messages, True), add_special_tokens=False)["input_ids"]
        logprobs = {}
        with torch.no_grad():
            for option in options:
                tail = self.tokenizer(option, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + tail], device=self.model.device)
                logits = self.model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
                logprobs[option] = float(logits.gather(1, ids[0, len(prompt) :, None]).sum())
        best = max(options, key=lambda o: logprobs[o])
        return json.dumps({"answer": best, "logprobs": logprobs})


def open_judge(spec: JudgeSpec):
    return EndpointJudge(spec.endpoint) if spec.endpoint is not None else LocalJudge(spec.local)


def parse_verdict(text: str, options: tuple[str, ...]) -> str | None:
    """The option the judge's reply names (its first word; a local judge's JSON 'answer'); None if none does."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            stripped = str(json.loads(stripped).get("answer", ""))
        except (json.JSONDecodeError, AttributeError):
            return None
    for match in (re.match(r"[\s\[\(\*\"']*([A-Za-z0-9]+)", stripped), _LABELLED.search(stripped)):
        word = match.group(1).lower() if match else None
        found = next((o for o in options if o.lower() == word), None)
        if found is not None:
            return found
    return None


# 'Rating: 4', 'Verdict: [[B]]', 'The better answer is A': a labelled answer when the reply does not start with one
_LABELLED = re.compile(
    r"\b(?:score|rating|verdict|answer|better answer is)\s*(?:is)?\s*[:=]?\s*[\[\(\*\"']*([A-Za-z0-9]+)", re.I
)


def _ask_parsed(judge, messages: list[dict], options: tuple[str, ...], retries: int) -> tuple[list[str], str | None]:
    raws = []
    for _ in range(retries + 1):
        raws.append(judge.ask(messages, options))
        parsed = parse_verdict(raws[-1], options)
        if parsed is not None:
            return raws, parsed
    return raws, None


# ---- prompts to the judge


def _show(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def rubric_messages(messages: list[dict], answer: str, criterion: str, description: str, scale) -> list[dict]:
    low, high = scale
    return [
        {"role": "system", "content": "You are a strict evaluator of assistant answers."},
        {
            "role": "user",
            "content": f"Conversation:\n{_show(messages)}\n\nAnswer to evaluate:\n{answer}\n\n"
            f"Criterion: {criterion}: {description}\n"
            f"Rate the answer on this criterion from {low} (worst) to {high} (best). Reply with the number only.",
        },
    ]


def pairwise_messages(messages: list[dict], first: str, second: str, criteria: dict[str, str]) -> list[dict]:
    considered = "; ".join(f"{k}: {v}" for k, v in criteria.items())
    return [
        {"role": "system", "content": "You are a strict evaluator comparing two assistant answers."},
        {
            "role": "user",
            "content": f"Conversation:\n{_show(messages)}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
            f"Consider {considered}.\nWhich answer is better? Reply with exactly one of: A, B, tie.",
        },
    ]


# ---- the element


def run_judge(
    spec: JudgeSpec,
    model_dir: Path,
    data_dir: Path,
    work_dir: Path,
    cfg: EvalConfig,
    *,
    reference_dir: Path | None = None,
    reference: str = "",
    progress: Callable[[dict], None] | None = None,
) -> dict[str, float]:
    """Judge the answers of the model in `model_dir` (pairwise: against `reference_dir`'s, named `reference`)."""
    emit = progress or (lambda event: None)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    problem = spec.check()
    if problem:
        raise JudgeError(problem)
    judge = open_judge(spec)
    judge.probe()
    examples = load_prompts(spec, Path(data_dir), spec.limit or cfg.limit)
    max_new = spec.max_new_tokens or cfg.max_new_tokens
    conversations = [e["messages"] for e in examples]
    emit({"event": "judge_generate", "model_dir": str(model_dir), "n": len(examples)})
    answers = generate_answers(Path(model_dir), conversations, max_new)
    if spec.mode == "pairwise":
        if reference_dir is None:
            raise ValueError("pairwise judging needs a reference model")
        emit({"event": "judge_generate", "model_dir": str(reference_dir), "reference": reference})
        ref_answers = generate_answers(Path(reference_dir), conversations, max_new)
        records = judge_pairs(judge, spec, examples, answers, ref_answers, reference)
        metrics = pairwise_metrics(records)
    else:
        records = judge_rubric(judge, spec, examples, answers)
        metrics = rubric_metrics(records, list(spec.criteria))
    with open(work_dir / "judge.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    emit({"event": "judge_done", "metrics": metrics})
    return metrics


def judge_rubric(judge, spec: JudgeSpec, examples: list[dict], answers: list[str]) -> list[dict]:
    options = tuple(str(i) for i in range(spec.scale[0], spec.scale[1] + 1))
    records = []
    for example, answer in zip(examples, answers):
        for criterion, description in spec.criteria.items():
            asked = rubric_messages(example["messages"], answer, criterion, description, spec.scale)
            raws, parsed = _ask_parsed(judge, asked, options, spec.parse_retries)
            records.append(
                {
                    "id": example["id"],
                    "prompt": example["messages"],
                    "answer": answer,
                    "criterion": criterion,
                    "raw": raws,
                    "parsed": parsed,
                    "score": None if parsed is None else float(parsed),
                }
            )
    return records


# The candidate's score for a verdict, by which side it was shown on.
_WIN = {"candidate_first": {"A": 1.0, "B": 0.0, "tie": 0.5}, "reference_first": {"A": 0.0, "B": 1.0, "tie": 0.5}}


def judge_pairs(judge, spec, examples, answers, ref_answers, reference: str) -> list[dict]:
    records = []
    for example, answer, ref in zip(examples, answers, ref_answers):
        for order, (first, second) in (("candidate_first", (answer, ref)), ("reference_first", (ref, answer))):
            asked = pairwise_messages(example["messages"], first, second, spec.criteria)
            raws, parsed = _ask_parsed(judge, asked, PAIR_OPTIONS, spec.parse_retries)
            records.append(
                {
                    "id": example["id"],
                    "prompt": example["messages"],
                    "answers": {"candidate": answer, "reference": ref},
                    "reference": reference,
                    "order": order,
                    "raw": raws,
                    "parsed": parsed,
                    "score": None if parsed is None else _WIN[order][parsed],
                }
            )
    return records


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def per_example(records: list[dict], mode: str) -> dict[str, dict[str, float]]:
    """{metric: {example id: value}} from judge.jsonl records (the gate's paired bootstrap reads these)."""
    by_id: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r["score"] is None:
            continue
        metric = "win_rate" if mode == "pairwise" else r["criterion"]
        by_id.setdefault(r["id"], {}).setdefault(metric, []).append(r["score"])
    out: dict[str, dict[str, float]] = {}
    for example_id, metrics in by_id.items():
        means = {m: sum(v) / len(v) for m, v in metrics.items()}
        if mode == "rubric":
            means["score"] = sum(means.values()) / len(means)
        for metric, value in means.items():
            out.setdefault(metric, {})[example_id] = value
    return out


def rubric_metrics(records: list[dict], criteria: list[str]) -> dict[str, float]:
    values = per_example(records, "rubric")
    out: dict[str, float] = {}
    for metric in [*criteria, "score"]:
        out[metric], out[f"{metric}_stderr"] = _mean_stderr(list(values.get(metric, {}).values()))
    out["n"] = float(len({r["id"] for r in records}))
    out["unparsed"] = float(sum(r["parsed"] is None for r in records))
    return out


def pairwise_metrics(records: list[dict]) -> dict[str, float]:
    values = per_example(records, "pairwise").get("win_rate", {})
    out: dict[str, float] = {}
    out["win_rate"], out["win_rate_stderr"] = _mean_stderr(list(values.values()))
    both: dict[str, list[float]] = {}
    for r in records:
        if r["score"] is not None:
            both.setdefault(r["id"], []).append(r["score"])
    pairs = [v for v in both.values() if len(v) == 2]
    out["position_consistency"] = sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")
    out["n"] = float(len({r["id"] for r in records}))
    out["unparsed"] = float(sum(r["parsed"] is None for r in records))
    return out


def read_records(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
