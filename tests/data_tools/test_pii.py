import functools
import ipaddress
import json
import random
import string
from collections import Counter

import pytest
from datatrove.data import Document

from data_tools.config import PIIConfig
from data_tools.pii import ChatPIIFormatter, Scrubber


@pytest.mark.parametrize(
    "text,expected,kind",
    [
        ("Contact me at jane.doe+x@mail.example.co.uk if needed.", "Contact me at <EMAIL> if needed.", "email"),
        ("My server is at 203.0.113.7, thanks.", "My server is at <IP>, thanks.", "ip"),
        ("Public 8.8.8.8:53 resolver.", "Public <IP>:53 resolver.", "ip"),
        ("v6 host 2001:db8:85a3::8a2e:370:7334 here", "v6 host <IP> here", "ip"),
        ("Call me on +1 415-555-0123 after lunch.", "Call me on <PHONE> after lunch.", "phone"),
        ("Ring (415) 555-0123 now", "Ring <PHONE> now", "phone"),
        ("Office +44 20 7946 0958.", "Office <PHONE>.", "phone"),
        ("Dial +14155550123", "Dial <PHONE>", "phone"),
        ("Use the key sk-0123456789abcdef0123456789abcdef for the API.", "Use the key <SECRET> for the API.", "secret"),
        ("Token: ghp_ns804yobalt6qve5qt0yydkipsvdc40j5fjw is mine.", "Token: <SECRET> is mine.", "secret"),
        ("AWS key AKIA753XLNYSAIJRVVXF was rotated.", "AWS key <SECRET> was rotated.", "secret"),
        ("api_key = 3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c", "api_key = <SECRET>", "secret"),
        ("token: ZXlKaGJHY2lPaUpJVXpJMU5pSjk1234", "token: <SECRET>", "secret"),
        ("SSN: 123456789 on file", "SSN: <SSN> on file", "ssn"),
        ("ssn 078-05-1120.", "ssn <SSN>.", "ssn"),
        ("pay with 4111 1111 1111 1111 now", "pay with <CARD> now", "card"),
        ("Amex 3782-822463-10005", "Amex <CARD>", "card"),
    ],
)
def test_each_kind_is_replaced(text, expected, kind):
    scrubbed, counts = Scrubber(PIIConfig()).scrub(text)
    assert scrubbed == expected
    assert counts == {kind: 1}


def test_versions_and_invalid_ids_are_kept():
    text = (
        "pip install pkg==8.13.2 then 8.3.9.2 works; numpy>=1.2.3.4; v10.4.2.1; version 7.1.0.2; "
        "SSN 900123456, 666-12-3456, 123-00-4567; card 4111 1111 1111 1112; 12 + 30 = 42"
    )
    assert Scrubber(PIIConfig()).scrub(text) == (text, {})
    assert (
        Scrubber(PIIConfig()).scrub("host 8.3.9.2 after pip install x==1.2")[0] == "host <IP> after pip install x==1.2"
    )


def test_normal_text_is_untouched():
    text = (
        "Meet at 10:30:15 on 2024-01-15; version 1.2.3 of the tool handled 1500 rows and scores "
        "90 85 77 100. The key to success is patience, the token count is 256. std::vector<int> v; "
        "Reverse the word: abcdef. Price is $12.50, call it 3.14159."
    )
    assert Scrubber(PIIConfig()).scrub(text) == (text, {})


def test_private_ips_are_kept_unless_asked():
    text = "LAN 192.168.1.10, 10.0.0.1, loopback 127.0.0.1"
    assert Scrubber(PIIConfig()).scrub(text)[0] == text
    assert Scrubber(PIIConfig(keep_private_ips=False)).scrub(text)[0] == "LAN <IP>, <IP>, loopback <IP>"


def test_disabled_kinds_are_left_alone():
    text = "mail a@b.org from 8.8.8.8"
    assert Scrubber(PIIConfig(emails=False)).scrub(text)[0] == "mail a@b.org from <IP>"
    assert Scrubber(PIIConfig(ips=False)).scrub(text)[0] == "mail <EMAIL> from 8.8.8.8"


def test_formatter_scrubs_each_message_and_counts(tmp_path):
    messages = [
        {"role": "user", "content": "Write to bob@example.com"},
        {"role": "assistant", "content": "Done, and 8.8.8.8 is Google."},
    ]
    doc = Document(text="stale", id="0", metadata={"messages": messages})
    step = ChatPIIFormatter(PIIConfig(), str(tmp_path))
    [out] = list(step.run(iter([doc]), rank=3))
    assert [m["content"] for m in out.metadata["messages"]] == ["Write to <EMAIL>", "Done, and <IP> is Google."]
    assert out.text == "Write to <EMAIL>\nDone, and <IP> is Google."
    assert json.loads((tmp_path / "00003.json").read_text()) == {"email": 1, "ip": 1, "rows_changed": 1}


# ---------------------------------------------------------------------------------------------------------
# A planted corpus: every kind in several formats and contexts, plus benign look-alikes that must stay.

PLACEHOLDER_OF = {
    "email": "<EMAIL>",
    "phone_us": "<PHONE>",
    "phone_uk": "<PHONE>",
    "phone_de": "<PHONE>",
    "ipv4": "<IP>",
    "ipv6": "<IP>",
    "aws_key_id": "<SECRET>",
    "aws_secret": "<SECRET>",
    "api_token": "<SECRET>",
    "url_password": "<SECRET>",
    "pem_key": "<SECRET>",
    "card": "<CARD>",
    "ssn": "<SSN>",
}
ALNUM = string.ascii_letters + string.digits


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _digits(rng: random.Random, n: int) -> str:
    return _rand(rng, string.digits, n)


def _luhn_digit(body: str) -> str:
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str(-total % 10)


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice(
        [("4", 16), ("4", 13), ("4", 19), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16)]
    )
    body = prefix + _digits(rng, length - len(prefix) - 1)
    number = body + _luhn_digit(body)
    sep = rng.choice(["", " ", "-"])
    if not sep:
        return number
    groups = [4, 6, 5] if length == 15 else [4] * (length // 4) + ([length % 4] if length % 4 else [])
    out, i = [], 0
    for g in groups:
        out.append(number[i : i + g])
        i += g
    return sep.join(out)


def _public_ipv4(rng: random.Random) -> str:
    while True:
        octets = [rng.randint(1, 223), rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)]
        address = ipaddress.ip_address(".".join(map(str, octets)))
        if address.is_global:
            return str(address)


def _ipv6(rng: random.Random) -> str:
    groups = [f"{rng.randint(0x2001, 0x2A0F):x}"] + [f"{rng.randint(0, 0xFFFF):x}" for _ in range(7)]
    if rng.random() < 0.4:
        return str(ipaddress.ip_address(":".join(groups[:3] + ["0"] * 3 + groups[6:])))  # compressed "::"
    return ":".join(groups)


def _ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    group, serial = rng.randint(1, 99), rng.randint(1, 9999)
    sep = rng.choice(["-", "-", " "])
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


def _phone(rng: random.Random, country: str) -> str:
    d = functools.partial(_digits, rng)
    if country == "us":
        area, ex, line = f"{rng.randint(2, 9)}{d(2)}", f"{rng.randint(2, 9)}{d(2)}", d(4)
        return rng.choice(
            [
                f"({area}) {ex}-{line}",
                f"{area}-{ex}-{line}",
                f"{area}.{ex}.{line}",
                f"+1 {area} {ex} {line}",
                f"+1-{area}-{ex}-{line}",
                f"+1 ({area}) {ex}-{line}",
                f"{area} {ex} {line}",
                f"+1{area}{ex}{line}",
            ]
        )
    if country == "uk":
        return rng.choice(
            [
                f"+44 20 {d(4)} {d(4)}",
                f"020 {d(4)} {d(4)}",
                f"+44 7{d(3)} {d(6)}",
                f"07{d(3)} {d(6)}",
                f"+44 (0)20 {d(4)} {d(4)}",
                f"0161 {d(3)} {d(4)}",
                f"+44 161 {d(3)} {d(4)}",
                f"+447{d(9)}",
            ]
        )
    return rng.choice(
        [
            f"+49 30 {d(8)}",
            f"030 {d(8)}",
            f"+49 (0)30 {d(7)}",
            f"0151 {d(8)}",
            f"+49 151 {d(8)}",
            f"089/{d(7)}",
            f"+49-89-{d(7)}",
            f"+49 89 {d(3)} {d(4)}",
            f"0170 {d(3)} {d(4)}",
        ]
    )


def _pem(rng: random.Random) -> str:
    label = rng.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED "])
    body = "\n".join(_rand(rng, ALNUM + "+/", 64) for _ in range(rng.randint(2, 5)))
    return f"-----BEGIN {label}PRIVATE KEY-----\n{body}\n-----END {label}PRIVATE KEY-----"


def _api_token(rng: random.Random) -> str:
    return rng.choice(
        [
            lambda: "sk-" + rng.choice(["", "proj-"]) + _rand(rng, ALNUM, 40),
            lambda: "ghp_" + _rand(rng, ALNUM, 36),
            lambda: "gho_" + _rand(rng, ALNUM, 36),
            lambda: "github_pat_" + _rand(rng, ALNUM, 22) + "_" + _rand(rng, ALNUM, 59),
            lambda: "hf_" + _rand(rng, string.ascii_letters, 34),
            lambda: "xoxb-" + _digits(rng, 12) + "-" + _digits(rng, 13) + "-" + _rand(rng, ALNUM, 24),
            lambda: "AIza" + _rand(rng, ALNUM + "_-", 35),
            lambda: "sk_live_" + _rand(rng, ALNUM, 24),
            lambda: "eyJ" + _rand(rng, ALNUM, 30) + "." + "eyJ" + _rand(rng, ALNUM, 40) + "." + _rand(rng, ALNUM, 43),
        ]
    )()


def _value_of(kind: str, rng: random.Random) -> str:
    return {
        "email": lambda: (
            f"{_rand(rng, string.ascii_lowercase, rng.randint(3, 8))}.{_rand(rng, string.ascii_lowercase, 5)}"
            f"{rng.randint(1, 99)}@{rng.choice(['example.com', 'mail.co.uk', 'uni-bonn.de', 'corp.io'])}"
        ),
        "phone_us": lambda: _phone(rng, "us"),
        "phone_uk": lambda: _phone(rng, "uk"),
        "phone_de": lambda: _phone(rng, "de"),
        "ipv4": lambda: _public_ipv4(rng),
        "ipv6": lambda: _ipv6(rng),
        "aws_key_id": lambda: rng.choice(["AKIA", "ASIA"]) + _rand(rng, string.ascii_uppercase + "234567", 16),
        "aws_secret": lambda: _rand(rng, ALNUM, 4) + _rand(rng, ALNUM + "/+", 32) + _rand(rng, ALNUM, 4),
        "api_token": lambda: _api_token(rng),
        "url_password": lambda: _rand(rng, ALNUM, rng.randint(6, 16)),
        "pem_key": lambda: _pem(rng),
        "card": lambda: _card(rng),
        "ssn": lambda: _ssn(rng),
    }[kind]()


CONTEXTS = {
    "email": ["Contact me at {v} if needed.", "email: {v}", "Mail <{v}> today", '{{"email": "{v}"}}', "cc {v}, bob"],
    "phone": ["Call me on {v} after lunch.", "Tel: {v}", "phone={v}", "My number is {v}.", '{{"phone": "{v}"}}'],
    "ipv4": ["My server is at {v}, thanks.", "ping {v}", "host={v}:8080", "Requests from {v} failed.", "ssh root@{v}"],
    "ipv6": ["My server is at {v}, thanks.", "ping6 {v}", "listen [{v}]:443;", "Requests from {v} failed."],
    "aws_key_id": ["AWS key {v} was rotated.", "aws_access_key_id = {v}", '"AccessKeyId": "{v}"'],
    "aws_secret": [
        "aws_secret_access_key = {v}",
        '{{"SecretAccessKey": "{v}"}}',
        "secret={v}",
        "export AWS_SECRET_ACCESS_KEY={v}",
        "aws configure set aws_secret_access_key {v}",
        "--secret-access-key {v}",
        "my AWS secret key is {v}",
        "AWS_SECRET_ACCESS_KEY: '{v}'",
        "aws_access_key_id=AKIA...\naws_secret_access_key={v}\n",
    ],
    "api_token": [
        "Use the key {v} for the API.",
        "Token: {v} is mine.",
        "OPENAI_API_KEY={v}",
        "auth {v}",
        "Authorization: Bearer {v}",
        'headers = {{"Authorization": "token {v}"}}',
    ],
    "url_password": [
        "git clone https://alice:{v}@git.example.com/repo.git",
        "uri: postgres://app:{v}@db:5432/x",
        "MLFLOW_TRACKING_URI=http://bob:{v}@mlflow.corp.io",
    ],
    "pem_key": ["Here is my key:\n{v}\nkeep it safe", "{v}", "key.pem contents: {v}"],
    "card": ["Card number: {v}, exp 12/27", "pay with {v} please", "my visa is {v}.", "cc={v}", "card {v} cvv 123"],
    "ssn": ["SSN: {v}", "my social security number is {v}.", "ssn={v}", "Employee {v} (SSN) on file"],
}


def _context(kind: str) -> list[str]:
    return CONTEXTS["phone" if kind.startswith("phone") else kind]


def _benign(rng: random.Random) -> str:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    v4 = ".".join(str(rng.randint(0, 20)) for _ in range(4))
    n16 = _digits(rng, 15)
    n16 += str((int(_luhn_digit(n16)) + rng.randint(1, 9)) % 10)  # not Luhn-valid
    bad_ssn = rng.choice(
        [
            f"000-{rng.randint(10, 99)}-{_digits(rng, 4)}",
            f"666-{rng.randint(10, 99)}-{_digits(rng, 4)}",
            f"{rng.randint(900, 999)}-{rng.randint(10, 99)}-{_digits(rng, 4)}",
            f"{rng.randint(100, 665)}-00-{_digits(rng, 4)}",
            f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-0000",
        ]
    )
    return rng.choice(
        [
            f"pip install pkg=={rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)} and then {v4} works",
            f"pip install pkg=={v4}",
            f"upgraded from version {v4} to {rng.randint(1, 9)}.0.0.1",
            f"Firmware v{v4} fixed it.",
            f"release {v4} is out",
            f"numpy>={v4},<3",
            f"Windows build 10.0.{rng.randint(10000, 22631)}.{rng.randint(1, 3000)}",
            f"Meeting on 2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} at {rng.randint(10, 23)}:30:15.",
            f"Datum: {rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.2024, {a % 12 + 1}/{b % 28 + 1}/2023",
            f"Order #{_digits(rng, 5)} ships; ref ORD-2024-{_digits(rng, 6)}; invoice {_digits(rng, 6)}",
            f"What is {a} + {b}? {a} + {b} = {a + b}",
            f"Compute {rng.randint(100, 999)} - {rng.randint(100, 999)} - {rng.randint(100, 999)}.",
            f"{rng.randint(100, 999)} * {rng.randint(100, 999)} = ?",
            f"tracking id {n16}",
            f"account {n16[:4]} {n16[4:8]} {n16[8:12]} {n16[12:]}",
            f"Not an SSN: {bad_ssn}",
            f"The key to success is patience, the token count is {rng.randint(100, 4096)}.",
            f"max_tokens={rng.randint(16, 4096)}, tokenizer=gpt2, password=${{DB_PASSWORD}}",
            f"pi is 3.{_digits(rng, 5)}, scores {a} {b} {a + b} 100",
            f"commit {_rand(rng, '0123456789abcdef', 40)}",
            "std::vector<int> v; a::b::c",
            f"LAN 192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}, 10.0.0.{rng.randint(1, 254)}",
        ]
    )


def planted_corpus(seed: int = 0, per_kind: int = 300) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(kind, value, text) for `per_kind` planted items of every kind, and benign texts."""
    rng = random.Random(seed)
    planted = []
    for kind in PLACEHOLDER_OF:
        for _ in range(per_kind):
            value = _value_of(kind, rng)
            prefix = rng.choice(["", "", "Answer this: ", "Q: ", "note: ", "User said - "])
            planted.append((kind, value, prefix + rng.choice(_context(kind)).format(v=value)))
    benign = [_benign(rng) for _ in range(per_kind * 4)]
    return planted, benign


def recall_per_kind(scrub, planted) -> dict[str, float]:
    """Share of planted items of each kind that left no trace (value gone, the kind's placeholder in place)."""
    found, total = Counter(), Counter()
    for kind, value, text in planted:
        total[kind] += 1
        out = scrub(text)
        found[kind] += value not in out and PLACEHOLDER_OF[kind] in out
    return {kind: found[kind] / total[kind] for kind in total}


def test_planted_corpus_recall_and_benign_kept():
    planted, benign = planted_corpus()
    scrubber = Scrubber(PIIConfig())
    recall = recall_per_kind(lambda t: scrubber.scrub(t)[0], planted)
    assert min(recall.values()) >= 0.99, recall
    changed = [(t, scrubber.scrub(t)[0]) for t in benign if scrubber.scrub(t)[0] != t]
    assert not changed, changed[:10]


def test_formatter_scrubs_every_field_of_chat_and_preference_rows(tmp_path):
    planted, _ = planted_corpus(seed=1, per_kind=20)
    rng = random.Random(1)
    rng.shuffle(planted)
    docs, values = [], []
    for i in range(0, len(planted) - 4, 5):
        items = planted[i : i + 5]
        texts = [t for _, _, t in items]
        messages = [{"role": r, "content": t} for r, t in zip(("system", "user", "assistant"), texts)]
        metadata = (
            {"messages": messages}
            if i % 2
            else {
                "messages": messages,
                "rejected": [{"role": "assistant", "content": texts[3]}, {"role": "assistant", "content": texts[4]}],
            }
        )
        docs.append(Document(text="", id=str(i), metadata=metadata))
        values += [v for _, v, _ in (items if "rejected" in metadata else items[:3])]
    out = list(ChatPIIFormatter(PIIConfig(), str(tmp_path)).run(iter(docs)))
    dumped = json.dumps([d.metadata for d in out]) + "".join(d.text for d in out)
    assert not [v for v in values if v in dumped and json.dumps(v)[1:-1] in dumped]
    counts = json.loads((tmp_path / "00000.json").read_text())
    assert set(counts) == {"secret", "email", "card", "ssn", "ip", "phone", "rows_changed"}


@pytest.mark.slow
def test_data_stage_leaves_no_planted_pii_in_any_row_format(tmp_path):
    """Alpaca, ShareGPT, messages and preference rows, planted items in every field: none reaches an output,
    and the manifest counts replacements per kind and names the detectors that ran."""
    from data_tools.config import DataConfig
    from data_tools.stage import run_data
    from parallel.tiny import build_tokenizer

    tokenizer_dir = tmp_path / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer_dir)
    planted, _ = planted_corpus(seed=2, per_kind=24)
    rng = random.Random(2)
    rng.shuffle(planted)
    texts = [t for _, _, t in planted]
    chunks = [texts[i : i + 3] for i in range(0, len(texts) - 2, 3)]
    writers = {
        "alpaca": lambda s, u, a: {"system": s, "instruction": f"Answer this: {u}", "input": "", "output": a},
        "sharegpt": lambda s, u, a: {
            "conversations": [
                {"from": "system", "value": s},
                {"from": "human", "value": u},
                {"from": "gpt", "value": a},
            ]
        },
        "messages": lambda s, u, a: {
            "messages": [
                {"role": "system", "content": s},
                {"role": "user", "content": u},
                {"role": "assistant", "content": a},
            ]
        },
        "preference": lambda s, u, a: {"prompt": f"Reply to: {s}", "chosen": u, "rejected": a},
    }
    src = tmp_path / "src"
    src.mkdir()
    for n, (name, make) in enumerate(writers.items()):
        rows = [make(*chunk) for chunk in chunks[n::4]]
        (src / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        sources=[{"path": f"src/{name}.jsonl"} for name in writers],
        filters={"gopher_repetition": False, "gopher_quality": False, "c4": False, "fineweb": False},
        format={"max_tokens": 4096},
        tasks=1,
    )
    out = tmp_path / "out"
    manifest = run_data(cfg, tokenizer_dir, out, base_dir=tmp_path)
    outputs = [p for p in out.rglob("*") if p.is_file()]
    leaked = {}
    for path in outputs:
        text = path.read_text(errors="replace")
        leaked |= {v: path for _, v, _ in planted if v in text or json.dumps(v)[1:-1] in text}
    assert not leaked, list(leaked.items())[:5]
    for section in (manifest, manifest["preference"]):
        pii = section["steps"]["pii"]
        assert pii["detectors"] == ["secret", "email", "card", "ssn", "ip", "phone"]
        assert all(pii["replaced"].get(kind, 0) > 0 for kind in pii["detectors"]), pii["replaced"]


def test_ner_model_must_be_a_local_directory(tmp_path):
    with pytest.raises(ValueError, match="absolute path"):
        PIIConfig(ner_model="models/ner")
    with pytest.raises(FileNotFoundError, match="ner_model: .* is not a model directory .*nothing is downloaded"):
        Scrubber(PIIConfig(ner_model=str(tmp_path / "missing")))


def test_ner_names_become_placeholders(tmp_path):
    """A local token-classification model (here one that tags every token as a person) replaces what it finds
    after the patterns ran, leaves their placeholders alone, and is named among the detectors."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    from parallel.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    model = BertForTokenClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scrubber = Scrubber(PIIConfig(ner_model=str(tmp_path)))
    assert scrubber.detectors[-2:] == ["name", "address"]
    assert scrubber.scrub("Alice Smith wrote to bob@example.com") == ("<NAME> <EMAIL>", {"name": 1, "email": 1})
