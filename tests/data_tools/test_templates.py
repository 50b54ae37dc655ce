"""Named chat templates: each renders a conversation in its family's documented format (expected strings
written by hand), and the assistant-only label mask covers exactly the assistant's text and turn end."""

import numpy as np
import pytest
from pydantic import ValidationError

from data_tools.config import DataConfig
from data_tools.templates import CHOICES, NAMED, file_problem, render, template_for
from data_tools.tokens import encode_chat
from parallel.tiny import CHATML_TEMPLATE, build_tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    ),
    "mistral": "<s>[INST] Be brief.\n\nHi there [/INST] Hello!</s>[INST] 2+2? [/INST] 4</s>",
    "gemma": (
        "<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
    ),
    "phi3": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
    ),
    "alpaca": (
        "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n4</s>\n\n"
    ),
}
GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[INST] 2+2? [/INST]",
    "gemma": "<start_of_turn>model\n",
    "phi3": "<|assistant|>\n",
    "alpaca": "### Response:\n",
}
# what the label mask covers of each answer: its text and its turn's end, as the tiny tokenizer renders
# them (no bos; its eos is <|im_end|>)
ANSWER_SPANS = {
    "chatml": ["Hello!<|im_end|>\n", "4<|im_end|>\n"],
    "llama3": ["Hello!<|eot_id|>", "4<|eot_id|>"],
    "mistral": [" Hello!<|im_end|>", " 4<|im_end|>"],
    "gemma": ["Hello!<end_of_turn>\n", "4<end_of_turn>\n"],
    "phi3": ["Hello!<|end|>\n", "4<|end|>\n"],
    "alpaca": ["Hello!<|im_end|>\n\n", "4<|im_end|>\n\n"],
}


def test_every_named_template_is_tested():
    assert set(EXPECTED) == set(GENERATION_PROMPT) == set(ANSWER_SPANS) == set(NAMED)
    assert CHOICES == ("auto", *NAMED) and NAMED["chatml"] == CHATML_TEMPLATE


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_template_renders_the_documented_format(name):
    assert render(NAMED[name], [SYSTEM, *CHAT], False, **SPECIAL) == EXPECTED[name]
    assert render(NAMED[name], [SYSTEM, *CHAT[:3]], True, **SPECIAL).endswith(GENERATION_PROMPT[name])


def test_alpaca_without_a_system_prompt_opens_with_its_preamble():
    assert render(NAMED["alpaca"], CHAT[:2], False, **SPECIAL) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>\n\n"
    )


@pytest.mark.parametrize("name", sorted(NAMED))
def test_label_mask_covers_exactly_the_assistant_text(name):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None  # a base model's tokenizer: the named template alone renders
    text, arrays = encode_chat(tokenizer, [SYSTEM, *CHAT], NAMED[name])
    ids, mask = arrays["ids"], arrays["labels"].astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    runs = [tokenizer.decode(ids[lo:hi]) for lo, hi in zip(edges[::2], edges[1::2])]
    assert runs == ANSWER_SPANS[name]
    assert tokenizer.decode(ids) == text


def test_template_files_and_unknown_names(tmp_path):
    (tmp_path / "mine.jinja").write_text(NAMED["phi3"])
    assert template_for("mine.jinja", None, tmp_path) == (NAMED["phi3"], "file:mine.jinja")
    assert template_for("auto", None) == (CHATML_TEMPLATE, "chatml")
    assert template_for("auto", {"default": "T", "tool_use": "U"}) == ("T", "tokenizer")
    assert template_for("gemma", "OWN") == (NAMED["gemma"], "gemma")
    assert file_problem("mine.jinja", tmp_path) is None and file_problem("llama3", tmp_path) is None
    assert "no such template file: gone.jinja" in file_problem("gone.jinja", tmp_path)
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    assert "broken.jinja cannot render a conversation: TemplateSyntaxError" in file_problem("broken.jinja", tmp_path)
    # the last turn first: prefixes of the conversation are not prefixes of its text
    (tmp_path / "reversed.jinja").write_text("{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}")
    assert "does not render a conversation's prefixes" in file_problem("reversed.jinja", tmp_path)
    cfg = DataConfig(sources=[{"generate": "tiny-tasks"}], format={"chat_template": "gone.jinja"})
    assert cfg.check_paths(tmp_path) == [
        f"data.format.chat_template: no such template file: gone.jinja (in {tmp_path})"
    ]
    with pytest.raises(ValidationError, match="'llama2' is not one of auto, chatml, llama3, mistral, gemma"):
        DataConfig(format={"chat_template": "llama2"})
