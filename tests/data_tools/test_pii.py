import json

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
    ],
)
def test_each_kind_is_replaced(text, expected, kind):
    scrubbed, counts = Scrubber(PIIConfig()).scrub(text)
    assert scrubbed == expected
    assert counts == {kind: 1}


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
