"""A generated English corpus and an ARPA bigram model trained on it, for the KenLM perplexity tests."""

import math
import random
from collections import Counter, defaultdict
from pathlib import Path

ADJ = "small old green quiet happy bright cold heavy young busy tall clever".split()
NOUN = "dog cat teacher river car garden child farmer bird doctor baker sailor".split()
VERB = "sees likes follows finds paints visits watches carries helps calls".split()
PLACE = "park school market bridge station library harbour village".split()
PREP = "near behind beside across".split()
TIME = ["every morning", "on sunday", "after lunch", "at night", "in the spring", "before dinner"]


def sentence(rng: random.Random) -> str:
    """One sentence of a small English grammar: enough variety that held-out rows hold unseen sentences."""
    a, n, n2 = rng.choice(ADJ), rng.choice(NOUN), rng.choice(NOUN)
    template = rng.randrange(4)
    if template == 0:
        return f"The {a} {n} {rng.choice(VERB)} the {n2} {rng.choice(PREP)} the {rng.choice(PLACE)}."
    if template == 1:
        return f"A {n} {rng.choice(VERB)} my {a} {n2} {rng.choice(TIME)}."
    if template == 2:
        return f"Our {n} is {a} and {rng.choice(ADJ)}, so it walks to the {rng.choice(PLACE)} {rng.choice(TIME)}."
    return f"Where does the {a} {n} go {rng.choice(TIME)}?"


def shuffled_words(text: str, rng: random.Random) -> str:
    words = text.split()
    while len(words) > 1 and " ".join(words) == text:
        rng.shuffle(words)
    return " ".join(words)


def write_arpa(lines: list[str], path: Path, discount: float = 0.75) -> Path:
    """An interpolated absolute-discounting bigram model in ARPA format. Add-one unigrams (so <unk> has mass);
    a seen bigram's probability is (c(v w) - D) / c(v) + lambda(v) P(w) with lambda(v) = D x types after v /
    c(v), which is also v's backoff weight: an unseen bigram scores lambda(v) P(w)."""
    unigrams, bigrams = Counter(), Counter()
    for line in lines:
        tokens = ["<s>", *line.split(), "</s>"]
        unigrams.update(tokens[1:])
        bigrams.update(zip(tokens, tokens[1:]))
    vocab = sorted(unigrams) + ["<unk>"]
    total = sum(unigrams.values()) + len(vocab)
    p_uni = {w: (unigrams[w] + 1) / total for w in vocab}
    after = defaultdict(Counter)
    for (v, w), c in bigrams.items():
        after[v][w] = c
    backoff = {v: discount * len(ws) / sum(ws.values()) for v, ws in after.items()}
    out = ["\\data\\", f"ngram 1={len(vocab) + 1}", f"ngram 2={len(bigrams)}", "", "\\1-grams:"]
    out.append(f"-99\t<s>\t{math.log10(backoff['<s>']):.6f}")
    for w in vocab:
        weight = f"\t{math.log10(backoff[w]):.6f}" if w in backoff else ""
        out.append(f"{math.log10(p_uni[w]):.6f}\t{w}{weight}")
    out += ["", "\\2-grams:"]
    for (v, w), c in sorted(bigrams.items()):
        p = (c - discount) / sum(after[v].values()) + backoff[v] * p_uni[w]
        out.append(f"{math.log10(p):.6f}\t{v} {w}")
    out += ["", "\\end\\", ""]
    path.write_text("\n".join(out))
    return path
