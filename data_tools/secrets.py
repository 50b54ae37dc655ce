"""Secrets in text and in configuration: the one list of patterns, used by the data stage's PII scrub
(data_tools.pii) and by hpc's tracking/run files (hpc.tracking).

API (everything else here is private):
- `redact_text(text, placeholder="<SECRET>") -> (text, Counter)`: `text` with every secret value
  replaced by `placeholder`, and the number of replacements per pattern name (`PATTERNS`). What is
  kept around a secret: the key name of `key=value`, the scheme, user and host of a URL with a password
  (`https://user:<SECRET>@host`), the scheme word of an `Authorization: Bearer <SECRET>` header.
- `is_secret_key(name) -> bool`: whether a configuration/environment key names a secret (`HF_TOKEN`,
  `WANDB_API_KEY`, `SecretAccessKey`, `db.password`, `Authorization`), not look-alikes (`max_tokens`,
  `tokenizer`, `author`).
- `redact(obj, placeholder="***", key="") -> copy of obj`: dicts/lists/strings walked; a string under a
  secret key is replaced whole, any other string goes through `redact_text`.

Patterns (`PATTERNS`, applied in this order): PEM private key blocks; credentials in URLs; Authorization
header values (Bearer/Basic/Token); vendor tokens (OpenAI sk-, Stripe sk_live_/rk_live_, GitHub
ghp_/gho_/ghu_/ghs_/ghr_/github_pat_, Hugging Face hf_, AWS AKIA/ASIA key ids, Slack xox*, Google AIza,
JWTs); `key=value` / `key: value` / `"key": "value"` / `--key value` where `is_secret_key(key)` (AWS
secret access keys, passwords, tokens under any name such as aws_secret_access_key, SecretAccessKey,
secret=), or followed by a space and a generated-looking value; prose such as
"my AWS secret key is <40 chars>" when the value looks like a generated token.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

PLACEHOLDER = "<SECRET>"

_VALUE = r"[^\s\"'`<>,;(){}\[\]]+"

PEM_RE = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s\\]*)"
)
URL_CREDENTIALS_RE = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@?#]+:)(?P<value>[^\s@/?#]+)(?=@)")
AUTHORIZATION_RE = re.compile(
    r"(?i)(?P<head>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token|digest)\s+)?"
    r"|\b(?:bearer|basic)\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})"
)
# A new prefix here goes into the hints of PATTERNS["token"] too (tests: test_vendor_tokens_alone).
VENDOR_RE = re.compile(
    r"\bsk-(?:proj-|svcacct-|admin-|live-|test-)?[A-Za-z0-9_-]{16,}"  # OpenAI (and old Stripe style)
    r"|\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|\bhf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key id
    r"|\bxox[abposre]-[A-Za-z0-9-]{10,}|\bxapp-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
)
# `key = value`, `key: value`, `"key": "value"`, `key => value`; the key decides (is_secret_key).
KEYED_RE = re.compile(
    rf"(?P<head>(?<![\w.-])(?P<key>[A-Za-z_][\w.-]*)[\"']?\s*(?:=>|:=|[:=])\s*[\"']?)(?=(?P<value>{_VALUE}))"
)
# `--secret-access-key VALUE` on a command line.
FLAG_RE = re.compile(
    rf"(?P<head>(?<![\w-])--(?P<key>[A-Za-z][\w-]*)\s+[\"']?)(?=(?P<value>[^\s\"'`<>,;-]{_VALUE[:-1]}*))"
)
# `aws configure set aws_secret_access_key VALUE`: a secret key name, a space, a generated-looking value.
SPACED_RE = re.compile(
    rf"(?P<head>(?<![\w.-])(?P<key>(?i:[A-Za-z_][\w.-]*(?:secret|token|passw|key|credential|auth)[\w.-]*))\s+[\"']?)"
    rf"(?=(?P<value>{_VALUE}))"
)
# Prose: "the AWS secret access key is wJalr...", "my token: ..."; only values that look generated.
PROSE_RE = re.compile(
    r"(?i)(?P<head>\b(?:(?:aws|api|access|secret|private|auth|bearer)\s+)*"
    rf"(?:secret(?:\s+access)?(?:\s+key)?|api\s+key|access\s+key|private\s+key|password|passphrase|token|key"
    rf"|credentials?)\s+(?:is|was|=|:)\s*[\"']?)(?=(?P<value>{_VALUE}))"
)

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SECRET_NAME = re.compile(
    r"passw|passphrase|secret|api_?key|access_?key|private_?key|credential|authorization"
    r"|(?:^|_)(?:token|auth|pat|sas_token|session_key|signing_key|encryption_key)$"
)
_REFERENCE = re.compile(r"\$\{?\w+\}?|%\(\w+\)s|\{\{.*\}\}|\*+|x+|X+|<\w+>|none|null|true|false|redacted", re.I)


def is_secret_key(name: str) -> bool:
    """Whether a key or variable name names a secret (case and camelCase, `-`, `.` and spaces ignored)."""
    snake = re.sub(r"[^a-z0-9]+", "_", _CAMEL.sub("_", str(name)).lower()).strip("_")
    return bool(_SECRET_NAME.search(snake))


def looks_generated(value: str) -> bool:
    """A value that reads as a generated key: long and mixing digits with letters, or mixed-case base64."""
    if len(value) < 16:
        return False
    letters, digits = any(c.isalpha() for c in value), any(c.isdigit() for c in value)
    if re.fullmatch(r"[0-9a-fA-F]+", value):
        return len(value) >= 20 or letters
    mixed_case = any(c.islower() for c in value) and any(c.isupper() for c in value)
    return letters and (digits or (mixed_case and len(value) >= 24))


def _keyed_value_is_secret(value: str) -> bool:
    """Under a secret key name: anything but a reference, a placeholder or a plain identifier."""
    if len(value) < 6 or _REFERENCE.fullmatch(value):
        return False
    if re.fullmatch(r"[A-Za-z_][A-Za-z_.]*(?:\(\)?)?", value):  # self.token, os.environ, get_password()
        return False
    return True


def _keyed_secret(key: str, value: str) -> bool:
    """`key=value`: a secret key name with a real value, or any `...key` name with a generated-looking one."""
    if is_secret_key(key):
        return _keyed_value_is_secret(value)
    return bool(re.search(r"(?:^|[^a-z])key$", key.lower())) and looks_generated(value)


def _trim(value: str) -> tuple[str, str]:
    """Sentence punctuation after a value stays in the text."""
    core = value.rstrip(".:!?")
    return core, value[len(core) :]


Replacer = Callable[[str, str], tuple[str, int]]


def _whole(pattern: re.Pattern) -> Replacer:
    def replace(text: str, placeholder: str) -> tuple[str, int]:
        return pattern.subn(placeholder, text)

    return replace


def _value(pattern: re.Pattern, accept: Callable[[re.Match, str], bool]) -> Replacer:
    """Replace the `value` group of each accepted match, keeping what surrounds it. Patterns whose value
    sits in a lookahead consume only their key, so a rejected `key: value` does not hide a key in its value."""

    def replace(text: str, placeholder: str) -> tuple[str, int]:
        out, done, count = [], 0, 0
        for m in pattern.finditer(text):
            value, _ = _trim(m["value"])
            start = m.start("value")
            if start < done or placeholder in value or not accept(m, value):
                continue
            out += [text[done:start], placeholder]
            done, count = start + len(value), count + 1
        return "".join(out) + text[done:], count

    return replace


def _hinted(hints: tuple[str, ...], replace: Replacer) -> Replacer:
    """`replace` only on text that holds one of `hints` (lower case): every match of the pattern does."""

    def run(text: str, placeholder: str) -> tuple[str, int]:
        low = text.lower()
        return replace(text, placeholder) if any(h in low for h in hints) else (text, 0)

    return run


# Every key name is_secret_key accepts (and every `...key`) contains one of these.
_NAME_HINTS = ("pass", "secret", "key", "credential", "auth", "token", "pat")

PATTERNS: dict[str, Replacer] = {
    "private_key": _whole(PEM_RE),
    "url_password": _hinted(("://",), _value(URL_CREDENTIALS_RE, lambda m, v: not _REFERENCE.fullmatch(v))),
    "authorization": _hinted(
        ("auth", "bearer", "basic"), _value(AUTHORIZATION_RE, lambda m, v: not _REFERENCE.fullmatch(v))
    ),
    "token": _hinted(
        ("sk", "rk_", "gh", "github_pat", "hf_", "akia", "asia", "xox", "xapp-", "aiza", "eyj"), _whole(VENDOR_RE)
    ),
    "keyed": _hinted(_NAME_HINTS, _value(KEYED_RE, lambda m, v: _keyed_secret(m["key"], v))),
    "flag": _hinted(_NAME_HINTS, _value(FLAG_RE, lambda m, v: _keyed_secret(m["key"], v))),
    "spaced": _hinted(_NAME_HINTS, _value(SPACED_RE, lambda m, v: is_secret_key(m["key"]) and looks_generated(v))),
    "prose": _hinted(_NAME_HINTS, _value(PROSE_RE, lambda m, v: looks_generated(v))),
}


def redact_text(text: str, placeholder: str = PLACEHOLDER) -> tuple[str, Counter]:
    """`text` with every secret replaced by `placeholder`; replacements counted per pattern name."""
    counts: Counter = Counter()
    for name, replace in PATTERNS.items():
        text, n = replace(text, placeholder)
        if n:
            counts[name] += n
    return text, counts


def redact(obj, placeholder: str = "***", key: str = ""):
    """A copy of `obj` (dicts, lists, scalars) with strings under secret keys and secrets inside strings
    replaced by `placeholder`."""
    if isinstance(obj, dict):
        return {k: redact(v, placeholder, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, placeholder, key) for v in obj]
    if isinstance(obj, str):
        if key and is_secret_key(key):
            return placeholder
        return redact_text(obj, placeholder)[0]
    return obj
