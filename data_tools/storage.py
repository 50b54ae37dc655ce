"""Sources and outputs on object storage (`s3://`, `gs://`, any fsspec URL) next to local paths.

Credentials come from the environment the jobs run in (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN or a profile; AWS_ENDPOINT_URL for an S3-compatible server), never from the recipe:
`data.storage_options` (fsspec options such as endpoint_url or client_kwargs) may not hold keys, secrets,
tokens or passwords. The manifest records each remote file's URL, ETag, size and the sha256 of what was read.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# Option names that hold credentials (fsspec's s3/gcs/azure spellings), anywhere in storage_options.
SECRET_OPTION = re.compile(r"(key|secret|token|password|credential|sas|signature)", re.I)


def is_url(path: str | Path) -> bool:
    """A path with a protocol other than file:// (s3://bucket/key, gs://..., memory://...)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def secret_options(options: dict, where: str = "") -> list[str]:
    """One message per option name (dotted path inside `options`) that would put credentials into the recipe."""
    problems = []
    for name, value in options.items():
        path = f"{where}.{name}" if where else name
        if isinstance(value, dict):
            problems += secret_options(value, path)
        elif SECRET_OPTION.search(name):
            problems.append(
                f"{path!r} would hold credentials; they come from the environment (e.g. AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), never from the recipe"
            )
    return problems


def filesystem(url: str, options: dict):
    """(fsspec filesystem, path without protocol) for `url`."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url, **options)
    except ImportError as err:
        raise ValueError(f"{url}: no filesystem for its protocol ({err}); for s3:// install s3fs") from None


def expand(pattern: str, options: dict) -> list[str]:
    """The files a URL or URL pattern names, as full URLs in sorted order."""
    fs, path = filesystem(pattern, options)
    protocol = pattern.split("://", 1)[0]
    found = fs.glob(path) if any(c in path for c in "*?[") else ([path] if fs.isfile(path) else [])
    return [f"{protocol}://{p}" for p in sorted(found) if fs.isfile(p)]


def open_input(path: str | Path, options: dict):
    """A binary, seekable file object for a local path or a URL."""
    if not is_url(path):
        return open(path, "rb")
    fs, inner = filesystem(path, options)
    return fs.open(inner, "rb")


def remote_info(url: str, options: dict) -> dict:
    """{url, size, etag} of a remote file (etag when the store has one)."""
    fs, inner = filesystem(url, options)
    info = fs.info(inner)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return {"url": url, "size": info.get("size")} | ({"etag": str(etag).strip('"')} if etag else {})


def sha256_input(path: str | Path, options: dict) -> str:
    digest = hashlib.sha256()
    with open_input(path, options) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload(local_dir: Path, url: str, options: dict, names: list[str]) -> list[str]:
    """Copy `names` (files or folders under local_dir) to the folder `url` through a datatrove DataFolder;
    the relative paths written, in the order written."""
    from datatrove.io import get_datafolder

    folder = get_datafolder((url, options))
    written = []
    for name in names:  # in the order given
        source = local_dir / name
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in files:
            relative = str(path.relative_to(local_dir))
            with open(path, "rb") as src, folder.open(relative, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
            written.append(relative)
    return written
