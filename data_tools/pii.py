"""PII scrubbing: secrets, emails, card numbers, US social security numbers, IP addresses and phone numbers
become placeholders.

datatrove's PIIFormatter covers emails and public IPs only, and its "public" test keeps documentation
ranges such as 203.0.113.0/24; this formatter scrubs every address except the ones that identify nobody
(RFC 1918, loopback, link-local) and adds the rest. It scrubs inside each message's content.

Detectors, in the order they run (`detectors(cfg)` names the ones a config enables; the manifest lists
them under `steps.pii.detectors`):
- secret: data_tools.secrets (vendor tokens, PEM private keys, URL passwords, Authorization values, values
  under secret-looking key names such as aws_secret_access_key / SecretAccessKey / secret=).
- email.
- card: 13-19 digits, plain or grouped by one kind of separator (space or dash), issuer prefix 2-6, Luhn
  check; a 16-digit id that fails the Luhn check stays.
- ssn: US social security numbers AAA-GG-SSSS / AAA GG SSSS (or 9 digits right after "SSN"), without the
  ranges never issued (area 000, 666, 900-999; group 00; serial 0000).
- ip: IPv4 and IPv6; a dotted quad written as a version stays (see `_is_version`).
- phone: international numbers (+cc ...), US groups, and national numbers with a trunk 0 (UK/DE style,
  10-12 digits); space-separated digit runs without those shapes are counts, not phones.
- name, address (only with `pii.ner_model`, a local Hugging Face token-classification model directory;
  nothing is downloaded and a missing directory is an error): entity groups PER/PERSON/NAME become
  <NAME>, ADDRESS/STREET/STREET_ADDRESS become <ADDRESS>; runs last, on the text the patterns left.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.formatters.base import BaseFormatter

from data_tools import secrets
from data_tools.config import PIIConfig
from data_tools.normalise import record_text

PLACEHOLDERS = {
    "secret": secrets.PLACEHOLDER,
    "email": "<EMAIL>",
    "card": "<CARD>",
    "ssn": "<SSN>",
    "ip": "<IP>",
    "phone": "<PHONE>",
    "name": "<NAME>",
    "address": "<ADDRESS>",
}
# NER entity groups (B-/I- prefixes stripped) -> kind
NER_KINDS = {"PER": "name", "PERSON": "name", "NAME": "name", "ADDRESS": "address", "STREET": "address"}
NER_KINDS["STREET_ADDRESS"] = "address"

EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# International numbers (+cc ...), national ones written in groups with - . or (area) separators, and
# national numbers with a trunk 0 (UK 020 7946 0958, DE 030 12345678, 089/1234567); plain
# space-separated digit runs are left alone, they are far more often counts than phones.
PHONE_RE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)\s?\d{3,4}[.-]\d{3,4}"
    r"|\d{2,4}[.-]\d{3,4}[.-]\d{3,4}"
    r"|\d{3} \d{3} \d{4}"
    r"|(?<!\d[ /-])0\d{1,4}(?:[ /-]?\d{2,8})(?:[ -]\d{2,4}){0,2})(?!\w|[.-]\d)"
)
CARD_RE = re.compile(r"(?<![\w+.-])(?:\d{13,19}|\d{4}(?P<sep>[ -])\d{4,6}(?:(?P=sep)\d{1,7}){1,3})(?!\w|[.-]\d)")
SSN_RE = re.compile(r"(?<![\w.-])(?!000|666|9\d\d)\d{3}(?P<sep>[- ])(?!00)\d{2}(?P=sep)(?!0000)\d{4}(?![\w-]|\.\d)")
# nine digits in a row count only right after "SSN"
SSN_BARE_RE = re.compile(r"(?i)(?<=ssn)(?P<gap>[#:=]?\s?)(?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4}\b")
# A dotted quad is a version, not an address, right after a version operator or `v` (`pkg==1.2.3.4`,
# `numpy>=1.2.3.4`, `v1.2.3.4`), after a version word on its line (`version 8.3.9.2`, `release`, `build`,
# `firmware`, `upgraded from`), or on a line that pins versions (`pip install pkg==8.13.2 ... 8.3.9.2`)
# unless an address word (ip, host, server, ping, ssh, @, ...) comes closer before it.
_VERSION_OPERATOR = re.compile(r"(?:[=<>~!]=|===|[<>]|\bv|-)\s*$", re.I)
_VERSION_WORD = re.compile(
    r"\b(?:version|ver|release[sd]?|build|firmware|fw|pkg|package|pip|npm|conda|changelog|patch"
    r"|up(?:grade|date)[sd]?|downgrade[sd]?)\b",
    re.I,
)
_ADDRESS_WORD = re.compile(
    r"\b(?:ip|ipv4|address|addr|host(?:name)?|server|ping|ssh|connect(?:ed|ion)?|gateway|dns|proxy|subnet|route"
    r"|client|peer|remote|listen|bind|nameserver)\b|@",
    re.I,
)
_PINNED = re.compile(r"[=<>~!]=\s*\d+(?:\.\d+)+")


def detectors(cfg: PIIConfig) -> list[str]:
    """The kinds a config scrubs, in the order they run."""
    enabled = {
        "secret": cfg.secrets,
        "email": cfg.emails,
        "card": cfg.cards,
        "ssn": cfg.national_ids,
        "ip": cfg.ips,
        "phone": cfg.phones,
    }
    return [kind for kind, on in enabled.items() if on] + (["name", "address"] if cfg.ner_model else [])


_PRIVATE_NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]


def _is_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or any(address in net for net in _PRIVATE_NETS if net.version == address.version)
    )


def _is_version(text: str, start: int) -> bool:
    """Whether the dotted quad at `start` is written as a version (the rule above)."""
    line_start = text.rfind("\n", 0, start) + 1
    before = text[line_start:start]
    if _VERSION_OPERATOR.search(before):
        return True
    window = before[-40:]
    words = [(m.end(), "version") for m in _VERSION_WORD.finditer(window)]
    words += [(m.end(), "address") for m in _ADDRESS_WORD.finditer(window)]
    if words:
        return max(words)[1] == "version"
    line_end = text.find("\n", start)
    return bool(_PINNED.search(text[line_start : None if line_end < 0 else line_end]))


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _is_card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m[0])
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def _ssns(text: str) -> tuple[str, int]:
    text, n = _sub(SSN_RE, PLACEHOLDERS["ssn"])(text)
    if "ssn" in text.lower():
        text, bare = SSN_BARE_RE.subn(lambda m: m["gap"] + PLACEHOLDERS["ssn"], text)
        n += bare
    return text, n


def _phone_digits_ok(m: re.Match) -> bool:
    digits = sum(c.isdigit() for c in m[0])
    if m[0].startswith("0"):
        return 10 <= digits <= 12
    return 9 <= digits <= 15


class Scrubber:
    """Replaces PII in plain text; `scrub` returns the new text and the number of replacements per kind."""

    def __init__(self, cfg: PIIConfig):
        self.cfg = cfg
        # Secrets first: a key can contain digit runs that would otherwise read as phone numbers; cards and
        # SSNs before phones, whose groups they resemble.
        replacers: dict[str, Callable[[str], tuple[str, int]]] = {
            "secret": self._secrets,
            "email": _sub(EMAIL_RE, PLACEHOLDERS["email"]),
            "card": _sub(CARD_RE, PLACEHOLDERS["card"], _is_card),
            "ssn": _ssns,
            "ip": self._ips,
            "phone": _sub(PHONE_RE, PLACEHOLDERS["phone"], _phone_digits_ok),
        }
        self.detectors = detectors(cfg)
        self.replacers = [(kind, replacers[kind]) for kind in self.detectors if kind in replacers]
        self.ner = NerScrubber(cfg.ner_model) if cfg.ner_model else None

    def scrub(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        for kind, replace in self.replacers:
            text, n = replace(text)
            if n:
                counts[kind] += n
        if self.ner is not None:
            text, found = self.ner.scrub(text)
            counts.update(found)
        return text, counts

    def _ips(self, text: str) -> tuple[str, int]:
        def scrub_address(match: str) -> bool:
            try:
                address = ipaddress.ip_address(match)
            except ValueError:
                return False
            return not (self.cfg.keep_private_ips and _is_private(address))

        def v4(m: re.Match) -> bool:
            return scrub_address(m[0]) and not _is_version(m.string, m.start())

        def v6(m: re.Match) -> bool:
            # "a::b" in code is not an address worth the risk
            return not (m[0].count(":") and m[0].count(":") < 3) and scrub_address(m[0])

        text, n4 = _sub(IPV4_RE, PLACEHOLDERS["ip"], v4)(text)
        text, n6 = _sub(IPV6_RE, PLACEHOLDERS["ip"], v6)(text)
        return text, n4 + n6

    @staticmethod
    def _secrets(text: str) -> tuple[str, int]:
        text, counts = secrets.redact_text(text, PLACEHOLDERS["secret"])
        return text, sum(counts.values())


_PLACEHOLDER_RE = re.compile(r"<[A-Z_]+>")


class NerScrubber:
    """Names and street addresses found by a local token-classification model (`pii.ner_model`)."""

    CHUNK = 1000  # characters per model call; lines longer than this are cut at spaces

    def __init__(self, model_dir: str):
        path = Path(model_dir).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"data.pii.ner_model: {model_dir} is not a model directory (no config.json); give a local "
                "Hugging Face token-classification model, nothing is downloaded"
            )
        from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

        model = AutoModelForTokenClassification.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.pipe = pipeline(
            "token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple", device="cpu"
        )

    def scrub(self, text: str) -> tuple[str, Counter]:
        placeholders = [m.span() for m in _PLACEHOLDER_RE.finditer(text)]
        spans = []
        for start, chunk in _chunks(text, self.CHUNK):
            for entity in self.pipe(chunk) if chunk.strip() else []:
                group = str(entity.get("entity_group") or entity.get("entity", "")).split("-")[-1].upper()
                a, b = start + entity["start"], start + entity["end"]
                while a < b and text[a].isspace():
                    a += 1
                if NER_KINDS.get(group) and a < b and not any(a < pb and pa < b for pa, pb in placeholders):
                    spans.append([a, b, NER_KINDS[group]])
        merged: list[list] = []  # pieces of one entity (adjacent or split by spaces) become one placeholder
        for span in sorted(spans):
            last = merged[-1] if merged else None
            if last and last[2] == span[2] and not text[last[1] : span[0]].strip():
                last[1] = max(last[1], span[1])
            elif not last or span[0] >= last[1]:
                merged.append(span)
        out, done, counts = [], 0, Counter()
        for a, b, kind in merged:
            out += [text[done:a], PLACEHOLDERS[kind]]
            done = b
            counts[kind] += 1
        return "".join(out) + text[done:], counts


def _chunks(text: str, size: int):
    """(offset, piece) covering `text`: its lines, long lines cut at a space near `size`."""
    offset = 0
    for line in text.splitlines(keepends=True):
        start = 0
        while len(line) - start > size:
            cut = line.rfind(" ", start, start + size)
            cut = cut if cut > start else start + size
            yield offset + start, line[start:cut]
            start = cut
        yield offset + start, line[start:]
        offset += len(line)


def _sub(pattern: re.Pattern, placeholder: str, accept: Callable[[re.Match], bool] | None = None):
    """A replacer that swaps each accepted match for `placeholder` and counts the swaps."""

    def replace_all(text: str) -> tuple[str, int]:
        count = 0

        def one(m: re.Match) -> str:
            nonlocal count
            if accept is not None and not accept(m):
                return m[0]
            count += 1
            return placeholder

        return pattern.sub(one, text), count

    return replace_all


class ChatPIIFormatter(BaseFormatter):
    """Scrubs every message's content, rebuilds the document text, and saves per-rank counts as JSON."""

    name = "🕵 Chat PII"

    def __init__(self, cfg: PIIConfig, counts_folder: DataFolderLike):
        super().__init__()
        self.cfg = cfg
        self.counts_folder = get_datafolder(counts_folder)

    def format(self, text: str) -> str:
        return Scrubber(self.cfg).scrub(text)[0]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        scrubber, totals = Scrubber(self.cfg), Counter()
        for doc in data:
            with self.track_time():
                changed = Counter()
                for message in doc.metadata["messages"] + doc.metadata.get("rejected", []):
                    message["content"], counts = scrubber.scrub(message["content"])
                    changed.update(counts)
                doc.text = record_text(doc.metadata)
            for kind, n in changed.items():
                self.stat_update(f"replaced_{kind}", value=n)
            totals.update(changed)
            totals["rows_changed"] += bool(changed)
            yield doc
        with self.counts_folder.open(f"{rank:05d}.json", "w") as f:
            json.dump(dict(totals), f)
