"""PII scrubbing: emails, IP addresses, phone numbers and API-key-like secrets become placeholders.

datatrove's PIIFormatter covers emails and public IPs only, and its "public" test keeps documentation
ranges such as 203.0.113.0/24; this formatter scrubs every address except the ones that identify nobody
(RFC 1918, loopback, link-local) and adds phones and secrets. It scrubs inside each message's content.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from typing import Callable

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.formatters.base import BaseFormatter

from data_tools.config import PIIConfig
from data_tools.normalise import record_text

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "secret": "<SECRET>"}

EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# International numbers (+cc ...) or national ones written in groups with - . or (area) separators;
# plain space-separated digit runs are left alone, they are far more often counts than phones.
PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)\s?\d{3,4}[.-]\d{3,4}"
    r"|\d{2,4}[.-]\d{3,4}[.-]\d{3,4}"
    r"|\d{3} \d{3} \d{4})(?![\w])"
)
VENDOR_SECRET_RE = re.compile(
    r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_-]{16,}"  # OpenAI / Stripe style
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_\w{20,}"  # GitHub
    r"|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key id
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
)
# A long hex/base64 value right after a word like key/token/secret: "api_key=3f9a...", "token: ZXlK...".
KEYED_SECRET_RE = re.compile(
    r"(?i)(?P<head>\b(?:api[_ -]?key|access[_ -]?key|secret(?:[_ -]?key)?|key|token|bearer|password)"
    r"\b[\"']?\s*(?:[:=]|\bis\b|\bwas\b)?\s*[\"']?)(?P<value>[A-Za-z0-9+/_=.-]{16,})"
)
_PRIVATE_NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]


def _is_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or any(address in net for net in _PRIVATE_NETS if net.version == address.version)
    )


def _looks_like_token(value: str) -> bool:
    if re.fullmatch(r"[0-9a-fA-F]{16,}", value):
        return len(value) >= 20 or any(c.isalpha() for c in value)
    return len(value) >= 20 and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


class Scrubber:
    """Replaces PII in plain text; `scrub` returns the new text and the number of replacements per kind."""

    def __init__(self, cfg: PIIConfig):
        self.cfg = cfg
        # Secrets first: a key can contain digit runs that would otherwise read as phone numbers.
        kinds: list[tuple[str, bool, Callable[[str], tuple[str, int]]]] = [
            ("secret", cfg.secrets, self._secrets),
            ("email", cfg.emails, _sub(EMAIL_RE, PLACEHOLDERS["email"])),
            ("ip", cfg.ips, self._ips),
            ("phone", cfg.phones, _sub(PHONE_RE, PLACEHOLDERS["phone"], _phone_digits_ok)),
        ]
        self.replacers = [(kind, fn) for kind, enabled, fn in kinds if enabled]

    def scrub(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        for kind, replace in self.replacers:
            text, n = replace(text)
            if n:
                counts[kind] += n
        return text, counts

    def _ips(self, text: str) -> tuple[str, int]:
        def keep(match: str) -> bool:
            if match.count(":") and match.count(":") < 3:
                return False  # "a::b" in code is not an address worth the risk
            try:
                address = ipaddress.ip_address(match)
            except ValueError:
                return False
            return not (self.cfg.keep_private_ips and _is_private(address))

        text, n4 = _sub(IPV4_RE, PLACEHOLDERS["ip"], keep)(text)
        text, n6 = _sub(IPV6_RE, PLACEHOLDERS["ip"], keep)(text)
        return text, n4 + n6

    @staticmethod
    def _secrets(text: str) -> tuple[str, int]:
        text, n = VENDOR_SECRET_RE.subn(PLACEHOLDERS["secret"], text)
        count = [n]

        def replace(m: re.Match) -> str:
            if not _looks_like_token(m["value"]):
                return m[0]
            count[0] += 1
            return m["head"] + PLACEHOLDERS["secret"]

        return KEYED_SECRET_RE.sub(replace, text), count[0]


def _phone_digits_ok(match: str) -> bool:
    return 9 <= sum(c.isdigit() for c in match) <= 15


def _sub(pattern: re.Pattern, placeholder: str, accept: Callable[[str], bool] | None = None):
    """A replacer that swaps each accepted match for `placeholder` and counts the swaps."""

    def replace_all(text: str) -> tuple[str, int]:
        count = 0

        def one(m: re.Match) -> str:
            nonlocal count
            if accept is not None and not accept(m[0]):
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
