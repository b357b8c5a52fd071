"""
Remote checkpoints through fsspec (`https://`, `s3://`, `hf://`, any fsspec URL): the same
`Checkpoint`, with `RemoteSource` in place of `FileSource`. Headers are read by small ranged
requests and tensor bytes by exact ranges, so listing a 2 GB file moves kilobytes.
"""

from __future__ import annotations

import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: object) -> bool:
    """True for an fsspec URL (`https://…`, `s3://…`, `hf://…`); `file://` counts as a URL too."""
    return isinstance(path, str) and bool(_URL.match(path))


def remote_file_id(url: str) -> tuple[int, str]:
    """(size, version) of a remote file: the version is its ETag, else its modification time, else ''."""
    fs, path = _filesystem(url)
    info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return int(info.get("size") or 0), str(version)


def _filesystem(url: str) -> tuple[object, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)
