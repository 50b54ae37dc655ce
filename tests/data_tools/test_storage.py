"""s3:// sources and outputs against moto's S3 server on 127.0.0.1 (real HTTP, real s3fs)."""

import gzip
import hashlib
import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from data_tools import synth
from data_tools.config import DataConfig
from data_tools.stage import run_data

SECRET = "moto-secret-0123456789abcdefghij"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-id",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem of another test knows another endpoint
    client = boto3.client("s3")
    client.create_bucket(Bucket="corpus")
    yield client
    server.stop()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from parallel.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    return path


def _files(root) -> dict[str, bytes]:
    rows = synth.generate_tiny_tasks(240, seed=3)
    (root / "in").mkdir()
    (root / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:120]))
    with gzip.open(root / "in" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[120:180])
    pq.write_table(pa.Table.from_pylist(rows[180:]), root / "in" / "c.parquet", row_group_size=25)
    return {p.name: p.read_bytes() for p in sorted((root / "in").iterdir())}


@pytest.mark.slow
def test_s3_sources_and_output_match_local_files(tmp_path, tokenizer_dir, s3):
    files = _files(tmp_path)
    for name, data in files.items():
        s3.put_object(Bucket="corpus", Key=f"in/{name}", Body=data)
    common = {"tasks": 2, "dedup": {"minhash": False}}
    local = run_data(DataConfig(sources=[{"path": "in/*"}], **common), tokenizer_dir, tmp_path / "l", base_dir=tmp_path)
    remote_cfg = DataConfig(sources=[{"path": "s3://corpus/in/*"}], output="s3://corpus/runs/one", **common)
    remote = run_data(remote_cfg, tokenizer_dir, tmp_path / "r", base_dir=tmp_path)

    assert remote["manifest_hash"] == local["manifest_hash"]
    assert remote["steps"] == local["steps"] and remote["splits"] == local["splits"]
    entries = remote["sources"][0]["files"]
    assert [e["url"] for e in entries] == [f"s3://corpus/in/{name}" for name in files]
    for entry, data in zip(entries, files.values()):
        head = s3.head_object(Bucket="corpus", Key=entry["url"].removeprefix("s3://corpus/"))
        assert entry["etag"] == head["ETag"].strip('"') and entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()

    listed = s3.list_objects_v2(Bucket="corpus", Prefix="runs/one/")["Contents"]
    keys = {obj["Key"].removeprefix("runs/one/") for obj in listed}
    assert "manifest.json" in keys and {k for k in remote["files"]} <= keys
    for name, digest in remote["files"].items():
        body = s3.get_object(Bucket="corpus", Key=f"runs/one/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest
    shown = json.loads(s3.get_object(Bucket="corpus", Key="runs/one/manifest.json")["Body"].read())
    assert shown["output"] == "s3://corpus/runs/one" and shown["manifest_hash"] == remote["manifest_hash"]
    leaked = [p for p in (tmp_path / "r").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_missing_objects_and_secrets_in_the_recipe_are_user_errors(tmp_path, tokenizer_dir, s3):
    cfg = DataConfig(sources=[{"path": "s3://corpus/nothing/*.jsonl"}])
    with pytest.raises(ValueError, match=r"data.sources.0.path: s3://corpus/nothing/\*.jsonl names no files"):
        run_data(cfg, tokenizer_dir, tmp_path / "out", base_dir=tmp_path)
    with pytest.raises(ValidationError, match="'client_kwargs.aws_secret_access_key' would hold credentials"):
        DataConfig(sources=[{"path": "x"}], storage_options={"client_kwargs": {"aws_secret_access_key": "x"}})
    with pytest.raises(ValidationError, match="is not a URL such as s3://bucket/prefix"):
        DataConfig(sources=[{"path": "x"}], output="/tmp/out")
    endpoint = {"endpoint_url": s3.meta.endpoint_url}  # a recipe may name the endpoint, not the keys
    assert (
        DataConfig(sources=[{"path": "s3://corpus/in/a.jsonl"}], storage_options=endpoint).check_paths(tmp_path) == []
    )
