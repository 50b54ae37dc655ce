"""The perplexity filter with a KenLM model: an ARPA bigram built here from a generated English corpus."""

import json
import random
import sys

import pytest

from data_tools.config import DataConfig, PerplexityConfig
from data_tools.quality import ccnet_normalise, reason_key
from tests.data_tools.ngram import sentence, shuffled_words, write_arpa

kenlm = pytest.importorskip("kenlm")


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    rng = random.Random(0)
    train = [ccnet_normalise(sentence(rng)) for _ in range(600)]
    return write_arpa(train, tmp_path_factory.mktemp("kenlm") / "en.arpa")


def _row(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_the_arpa_model_is_a_proper_distribution(arpa):
    model = kenlm.Model(str(arpa))
    unigrams = arpa.read_text().split("\\1-grams:\n")[1].split("\n\n")[0].splitlines()
    words = [line.split("\t")[1] for line in unigrams]
    assert model.order == 2 and "<unk>" in words
    for context in ("the", "green", "walks"):  # every next word, seen after the context or backed off
        next_words = [w for w in words if w not in ("<s>", "</s>")]
        total = sum(10 ** list(model.full_scores(f"{context} {w}", bos=False, eos=False))[1][0] for w in next_words)
        total += 10 ** list(model.full_scores(context, bos=False, eos=True))[1][0]
        assert total == pytest.approx(1, abs=1e-4)


def test_ccnet_normalisation():
    assert ccnet_normalise("Héllo  “World” — it’s 2024，ok。\u200b\tBye…") == 'héllo "world" - it\'s 0000,ok. bye...'


def test_kenlm_filter_on_the_data_stage_rejects_shuffled_english(tmp_path, arpa):
    from data_tools.stage import run_data
    from parallel.tiny import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "tokenizer")  # the stage tokenizes what it keeps
    rng = random.Random(1)
    good = [_row(sentence(rng), " ".join(sentence(rng) for _ in range(rng.randint(1, 2)))) for _ in range(80)]
    bad = [
        _row(*(shuffled_words(m["content"], rng) for m in r["messages"]))
        for r in (_row(sentence(rng), f"{sentence(rng)} {sentence(rng)}") for _ in range(20))
    ]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    cfg = DataConfig(
        sources=[{"path": str(source)}],
        filters={"perplexity": {"model": str(arpa), "max": 50, "field": "all"}},
        dedup={"minhash": False},
        tasks=2,
    )
    assert cfg.check_paths(tmp_path) == []
    manifest = run_data(cfg, tmp_path / "tokenizer", tmp_path / "out", base_dir=tmp_path)
    step = manifest["steps"]["perplexity"]
    bad_texts = {r["messages"][1]["content"] for r in bad}
    rejected = [
        json.loads(line)
        for p in (tmp_path / "out" / "rejected" / "perplexity").glob("*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert len(rejected) == len(bad) == step["rejected"] and step["reasons"] == {"perplexity_above_max": len(bad)}
    assert all(reason_key(r["reason"]) == "perplexity_above_max" for r in rejected)
    assert all(float(r["reason"].split("score=")[1]) > 50 for r in rejected)
    assert {r["messages"][1]["content"] for r in rejected} <= bad_texts
    # every good row that reaches the step stays (the gopher repetition filter before it takes a few templated ones)
    assert step["in"] == step["kept"] + len(bad) and step["kept"] >= 0.95 * len(good)
    scores = step["scores"]
    assert scores["count"] == step["in"] and scores["p50"] < 50 < scores["p95"]
    assert sum(scores["histogram"]["counts"]) == step["in"]


def test_kenlm_model_errors_name_the_field(tmp_path, arpa):
    def problems(model: str) -> list[str]:
        cfg = DataConfig(sources=[{"generate": "tiny-tasks"}], filters={"perplexity": {"model": model, "max": 9}})
        return cfg.check_paths(tmp_path)

    assert PerplexityConfig(model=str(arpa), max=9).is_kenlm and not PerplexityConfig(max=9).is_kenlm
    assert problems(str(tmp_path / "missing.arpa")) == [
        f"data.filters.perplexity.model: no such KenLM model file: {tmp_path / 'missing.arpa'}"
    ]
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    assert problems(str(tmp_path / "junk.bin"))[0].startswith("data.filters.perplexity.model: ")
    assert "neither an ARPA file" in problems(str(tmp_path / "junk.bin"))[0]
    with pytest.raises(ValueError, match="absolute path"):
        PerplexityConfig(model="en.arpa", max=9)


def test_kenlm_scores_ccnet_perplexity_and_feed_the_percentile_filter(tmp_path, arpa):
    """Two ranks score with no threshold (keep_percentiles), then each keeps the rows between the percentiles
    of both ranks' scores, like the stage's second run."""
    from datatrove.data import Document

    from data_tools.quality import KenLMScorer, PerplexityRangeFilter, read_scores
    from data_tools.steps import RejectWriter

    rng = random.Random(2)
    texts = [f"{sentence(rng)}\n\n{sentence(rng)}" for _ in range(40)]
    cfg = PerplexityConfig(model=str(arpa), keep_percentiles=[10, 90], field="all")
    scores_dir = tmp_path / "scores"
    ranks = []
    for rank in (0, 1):
        docs = [Document(text="", id=f"{rank}-{i}", metadata=_row(*t.split("\n\n"))) for i, t in enumerate(texts)]
        scorer = KenLMScorer(cfg, str(arpa), str(scores_dir))
        ranks.append(list(scorer.run(iter(docs[rank::2]), rank, 2)))
    model = kenlm.Model(str(arpa))
    for doc in ranks[0][:3]:
        lines = [ccnet_normalise(m["content"]) for m in doc.metadata["messages"]]
        words = sum(len(line.split()) + 1 for line in lines)
        expected = 10 ** (-sum(model.score(line, bos=True, eos=True) for line in lines) / words)
        assert doc.metadata["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert len(read_scores(scores_dir)) == len(texts)
    ranged = PerplexityRangeFilter((10, 90), str(scores_dir), RejectWriter(str(tmp_path / "r"), "perplexity", "p"))
    kept = [d for rank, docs in enumerate(ranks) for d in ranged.run(iter(docs), rank, 2)]
    assert len(texts) - len(kept) == 8  # 10% below, 10% above
    reasons = [json.loads(line)["reason"] for p in (tmp_path / "r").glob("*.jsonl") for line in p.open()]
    assert sorted(map(reason_key, reasons)) == ["perplexity_above_percentile"] * 4 + ["perplexity_below_percentile"] * 4


def test_an_uninstalled_kenlm_says_how_to_install_it(tmp_path, arpa, monkeypatch):
    from data_tools.quality import KenLMScorer

    monkeypatch.setitem(sys.modules, "kenlm", None)
    cfg = DataConfig(sources=[{"generate": "tiny-tasks"}], filters={"perplexity": {"model": str(arpa), "max": 9}})
    assert cfg.check_paths(tmp_path) == [
        "data.filters.perplexity.model: a KenLM model needs the kenlm package: pip install kenlm==0.3.0"
    ]
    scorer = KenLMScorer(cfg.filters.perplexity, str(arpa), str(tmp_path / "s"))
    with pytest.raises(RuntimeError, match=r"pip install kenlm==0\.3\.0$"):
        scorer.load()


def test_plan_cost_line_says_kenlm_is_cheap(arpa):
    from data_tools.quality import kenlm_cost

    line = kenlm_cost(PerplexityConfig(model=str(arpa), max=9), 1234)
    assert line.startswith("perplexity filter: KenLM (cheap): <= ~1,234 rows") and "FLOPs" not in line
    assert line.endswith(f"MiB model {arpa.name}")
