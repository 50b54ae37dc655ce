import pytest

from data_tools.secrets import is_secret_key, redact, redact_text

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "text,expected,pattern",
    [
        (f"aws_secret_access_key = {AWS_SECRET}", "aws_secret_access_key = <SECRET>", "keyed"),
        (f'{{"SecretAccessKey": "{AWS_SECRET}"}}', '{"SecretAccessKey": "<SECRET>"}', "keyed"),
        (f"secret={AWS_SECRET}.", "secret=<SECRET>.", "keyed"),
        (f"export AWS_SECRET_ACCESS_KEY='{AWS_SECRET}'", "export AWS_SECRET_ACCESS_KEY='<SECRET>'", "keyed"),
        (f"aws s3 ls --secret-access-key {AWS_SECRET}", "aws s3 ls --secret-access-key <SECRET>", "flag"),
        (f"My AWS secret access key is {AWS_SECRET} now", "My AWS secret access key is <SECRET> now", "prose"),
        (
            f"Answer this: AWS_SECRET_ACCESS_KEY: '{AWS_SECRET}'",
            "Answer this: AWS_SECRET_ACCESS_KEY: '<SECRET>'",
            "keyed",
        ),
        (
            f"aws configure set aws_secret_access_key {AWS_SECRET}",
            "aws configure set aws_secret_access_key <SECRET>",
            "spaced",
        ),
        ("db password: hunter2", "db password: <SECRET>", "keyed"),
        ("postgres://app:pa55w0rd@db.internal:5432/x", "postgres://app:<SECRET>@db.internal:5432/x", "url_password"),
        ("Authorization: Bearer abc123DEF456ghi789", "Authorization: Bearer <SECRET>", "authorization"),
        ("-H 'Authorization: Basic dXNlcjpwYXNzd29yZA=='", "-H 'Authorization: Basic <SECRET>'", "authorization"),
        ("key sk-proj-abcdefghijklmnop1234", "key <SECRET>", "token"),
        ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe <SECRET>", "token"),
        ("gh github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "gh <SECRET>", "token"),
        ("login hf_abcdefghijklmnopqrstuvwxyz12", "login <SECRET>", "token"),
        ("id ASIAY34FZKBOKMUTVV7A", "id <SECRET>", "token"),
        ("slack xoxb-123456789012-abcdefghij", "slack <SECRET>", "token"),
        ("g AIzaSyA1234567890abcdefghijklmnopqrstuv", "g <SECRET>", "token"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "jwt <SECRET>", "token"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n-----END OPENSSH PRIVATE KEY-----\n",
            "<SECRET>\n",
            "private_key",
        ),
    ],
)
def test_each_pattern(text, expected, pattern):
    assert redact_text(text) == (expected, {pattern: 1})


def test_lookalikes_are_kept():
    text = (
        "max_tokens=1024, self.token = token, password: ${DB_PASSWORD}, token_count: 4096. The key to success "
        "is patience; the token count is 256. A bearer of bad news. https://example.com:8080/a@b "
        "secret_santa_budget: 20, tokenizer=gpt2"
    )
    assert redact_text(text) == (text, {})


def test_secret_key_names():
    assert all(
        map(
            is_secret_key, ["HF_TOKEN", "WANDB_API_KEY", "SecretAccessKey", "db.password", "Authorization", "x-api-key"]
        )
    )
    assert not any(map(is_secret_key, ["max_tokens", "tokenizer", "author", "NCCL_DEBUG", "num_tokens", "PWD"]))


def test_redact_walks_structures():
    cfg = {"env": {"HF_TOKEN": "x"}, "setup": ["export GITHUB_TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123"], "n": 3}
    assert redact(cfg) == {"env": {"HF_TOKEN": "***"}, "setup": ["export GITHUB_TOKEN=***"], "n": 3}


@pytest.mark.parametrize(
    "token",
    [
        "sk-abcdefghijklmnop1234",
        "sk-proj-abcdefghijklmnop1234",
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "rk_test_4eC39HqLyjWDarjtT1zdp7dc",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "gho_abcdefghijklmnopqrstuvwxyz0123456789",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
        "hf_abcdefghijklmnopqrstuvwxyz12",
        "AKIAY34FZKBOKMUTVV7A",
        "ASIAY34FZKBOKMUTVV7A",
        "xoxb-123456789012-abcdefghij",
        "xapp-1-A0123456789-abcdef",
        "AIzaSyA1234567890abcdefghijklmnopqrstuv",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
    ],
)
def test_vendor_tokens_alone(token):
    """Each vendor prefix on its own (no other word that could open the fast path by chance)."""
    assert redact_text(f"x {token} y") == ("x <SECRET> y", {"token": 1})
