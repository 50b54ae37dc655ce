"""Named chat templates (data.format.chat_template): jinja templates written for this project after each
family's documented prompt format, so a base model (a tokenizer without a template) can be trained in
the format chosen. Every template renders a conversation's prefixes as text prefixes (no text after the
last turn), which the assistant-only label masks rely on (data_tools.tokens.assistant_spans).

bos_token / eos_token come from the tokenizer (nothing when it has none): mistral and alpaca end an answer
with the tokenizer's eos, so the trained model stops where generation stops; the others end a turn with
their family's own marker (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>)."""

from __future__ import annotations

from pathlib import Path

from parallel.tiny import CHATML_TEMPLATE

# Families without a system role (mistral, gemma) put the system prompt before the first user message.
_FIRST_USER_WITH_SYSTEM = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% set turns = messages[1:] if system is not none else messages %}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_MISTRAL = (
    _FIRST_USER_WITH_SYSTEM + "{{ bos_token }}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}"
    "{% set text = system + '\n\n' + m['content'] if system is not none and loop.first else m['content'] %}"
    "{{ '[INST] ' + text + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('mistral renders user and assistant turns only') }}"
    "{% endif %}"
    "{% endfor %}"
)

_GEMMA = (
    _FIRST_USER_WITH_SYSTEM + "{{ bos_token }}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}"
    "{% set text = system + '\n\n' + m['content'] if system is not none and loop.first else m['content'] %}"
    "{{ '<start_of_turn>user\n' + text + '<end_of_turn>\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<start_of_turn>model\n' + m['content'] + '<end_of_turn>\n' }}"
    "{% else %}{{ raise_exception('gemma renders user and assistant turns only') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_PHI3 = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
_ALPACA = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{{ (system if system is not none else '" + ALPACA_PREAMBLE + "') + '\n\n' }}"
    "{% for m in (messages[1:] if system is not none else messages) %}"
    "{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] }}{{ eos_token }}{{ '\n\n' }}"
    "{% else %}{{ raise_exception('alpaca renders user and assistant turns only') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

NAMED: dict[str, str] = {
    "chatml": CHATML_TEMPLATE,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
    "phi3": _PHI3,
    "alpaca": _ALPACA,
}
CHOICES = ("auto", *NAMED)


def is_template_file(choice: str) -> bool:
    return choice.endswith(".jinja")


def resolve_path(choice: str, base_dir: Path | None) -> Path:
    """A template file's path: absolute as given, else relative to the recipe's directory."""
    path = Path(choice).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def check_choice(choice: str) -> str:
    """`choice` when it is a named template, auto or a .jinja path; else a ValueError listing them."""
    if choice in CHOICES or is_template_file(choice):
        return choice
    raise ValueError(f"{choice!r} is not one of {', '.join(CHOICES)} or a PATH.jinja file")


# A conversation every template renders: its prefixes must render as prefixes of the whole.
_PROBE = [
    {"role": "user", "content": "Question one?"},
    {"role": "assistant", "content": "Answer one."},
    {"role": "user", "content": "Question two?"},
    {"role": "assistant", "content": "Answer two."},
]


def render(template: str, messages: list[dict], generation_prompt: bool, **special_tokens) -> str:
    """The template applied as transformers applies a tokenizer's (special_tokens: bos_token, eos_token)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=generation_prompt, **special_tokens
    )
    return rendered[0]


def file_problem(choice: str, base_dir: Path) -> str | None:
    """What is wrong with a .jinja choice (missing, not jinja, prefixes not rendered as prefixes), or None."""
    if not is_template_file(choice):
        return None
    path = resolve_path(choice, base_dir)
    if not path.is_file():
        return f"no such template file: {choice} (in {path.parent})"
    try:
        template = path.read_text()
        whole = render(template, _PROBE, False)
        for i in (1, 3):
            before = render(template, _PROBE[:i], True)
            through = render(template, _PROBE[: i + 1], False)
            if not (whole.startswith(before) and whole.startswith(through) and len(before) <= len(through)):
                return (
                    f"{choice} does not render a conversation's prefixes as prefixes of its text (with the "
                    "generation prompt before each answer), so the answers cannot be masked for the loss"
                )
    except Exception as err:  # jinja's syntax and render errors, unreadable files
        return f"{choice} cannot render a conversation: {type(err).__name__}: {err}"
    return None


def template_for(choice: str, tokenizer_chat_template, base_dir: Path | None = None) -> tuple[str, str]:
    """(template text, source) of data.format.chat_template: auto is the tokenizer's own template (source
    "tokenizer"), or chatml when it has none; a name is that template; a .jinja file is its text (source
    "file:<name>")."""
    own = tokenizer_chat_template
    if isinstance(own, dict):  # several named templates: the unnamed one is "default"
        own = own.get("default")
    if choice == "auto":
        return (own, "tokenizer") if own else (CHATML_TEMPLATE, "chatml")
    if is_template_file(choice):
        path = resolve_path(choice, base_dir)
        return path.read_text(), f"file:{path.name}"
    return NAMED[choice], choice


def data_template(data_dir: Path) -> str | None:
    """The chat template the data stage rendered data_dir's rows with (its token store's meta, of chat or of
    preference rows), None for a directory the data stage did not write."""
    from data_tools.tokens import read_meta

    for store in (Path(data_dir) / "tokens", Path(data_dir) / "preference" / "tokens"):
        meta = read_meta(store)
        if meta is not None and meta.get("chat_template"):
            return meta["chat_template"]
    return None
