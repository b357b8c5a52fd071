"""
Remote checkpoints through fsspec (`https://`, `s3://`, `hf://`, any fsspec URL): the same
`Checkpoint`, with `RemoteSource` in place of `FileSource`. Headers are read by small ranged
requests and tensor bytes by exact ranges, so listing a 2 GB safetensors file moves kilobytes.

A server that ignores HTTP Range requests would send the whole file for every read; that is
found before anything else is read (one 1-byte range request) and refused with what it would cost.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from ckptview.errors import (
    CheckpointNotFoundError,
    CkptviewError,
    CorruptCheckpointError,
    ShardError,
    TruncatedCheckpointError,
    UnsupportedFormatError,
)
from ckptview.readers.model import Checkpoint, TensorInfo

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class RangeNotSupportedError(CkptviewError):
    """The server answers ranged requests with the whole file."""


# Listing a file reads its headers: kilobytes for safetensors and torch files, a few MB for a GGUF
# vocabulary or a large ONNX graph, at most 100 MB for a safetensors header (that library's own
# limit). A file whose listing would read more is damaged or crafted (a GGUF whose metadata arrays
# fill the file, say): it is refused before the bytes past the limit are asked for.
LISTING_BYTES_LIMIT = 128 * 2**20

_listing_bytes: ContextVar[list[int] | None] = ContextVar("ckptview_remote_listing_bytes", default=None)


@contextlib.contextmanager
def listing_limit() -> Iterator[None]:
    """Every remote read inside (opening a file: headers only) counts against LISTING_BYTES_LIMIT."""
    token = _listing_bytes.set([0])
    try:
        yield
    finally:
        _listing_bytes.reset(token)


def is_url(path: object) -> bool:
    """True for an fsspec URL (`https://…`, `s3://…`, `hf://…`)."""
    return isinstance(path, str) and bool(_URL.match(path))


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as exc:
        raise CkptviewError(url, "reading checkpoints by URL needs fsspec: pip install 'ckptview[remote]'") from exc
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise CkptviewError(url, f"fsspec cannot read this URL ({exc}); install the back-end it names "
                                 "(s3fs for s3://, huggingface_hub for hf://)") from exc


def _info(url: str) -> dict[str, Any]:
    fs, path = _filesystem(url)
    try:
        return fs.info(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(url, "the server has no such file: check the URL") from None
    except Exception as exc:  # back-ends raise their own types (aiohttp, botocore)
        raise CkptviewError(url, f"cannot reach it ({type(exc).__name__}: {exc})") from exc


def remote_file_id(url: str) -> tuple[int, str]:
    """(size, version) of a remote file: the version is its ETag, else its modification time, else ''."""
    info = _info(url)
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return int(info.get("size") or 0), str(version)


class RemoteSource:
    """Positional reads of one remote file, each an exact byte range; the surface of `FileSource`."""

    def __init__(self, url: str, size: int) -> None:
        self.path = url
        self.size = size
        self._fs, self._fspath = _filesystem(url)
        self._http = url.split("://", 1)[0].lower() in ("http", "https")
        if self._http:
            self._check_ranges()

    def _check_ranges(self) -> None:
        if self.size < 2:
            return
        try:
            with self._fs.open(self._fspath, "rb", block_size=1, cache_type="none", size=self.size) as stream:
                stream.seek(1)
                stream.read(1)
        except ValueError as exc:
            if "range" not in str(exc).lower():
                raise
            size_text = f"{self.size / 2**30:.2f} GiB" if self.size >= 2**30 else f"{self.size / 2**20:.1f} MiB"

            raise RangeNotSupportedError(
                self.path, f"the server ignores HTTP Range requests, so every read would download the whole "
                           f"file from its start ({size_text} for each tensor, and again for the "
                           "header). Download the file and open the local copy, or serve it from a server that "
                           "supports Range (S3, the Hugging Face Hub, nginx, `python -m http.server` does not).",
            ) from exc

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        listed = _listing_bytes.get()
        if listed is not None:
            listed[0] += size
            if listed[0] > LISTING_BYTES_LIMIT:
                raise CorruptCheckpointError(
                    self.path, f"listing it would download more than {LISTING_BYTES_LIMIT / 2**20:g} MiB of headers "
                               f"(it asks for bytes {offset:,}..{offset + size:,}); a checkpoint's headers are far "
                               "smaller, so the file is damaged or crafted. ckptview stopped before downloading it.")
        try:
            if self._http:
                from fsspec.asyn import sync

                data = sync(self._fs.loop, self._fetch, offset, size)
            else:
                data = self._fs.cat_file(self._fspath, start=offset, end=offset + size)
        except RangeNotSupportedError:
            raise
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.path, "the server no longer has this file") from None
        except Exception as exc:  # back-ends raise their own types (aiohttp, botocore)
            raise CkptviewError(self.path, f"reading bytes {offset:,}..{offset + size:,} failed "
                                           f"({type(exc).__name__}: {exc}); try again") from exc
        if len(data) < size:
            raise TruncatedCheckpointError(self.path, f"the file ends at byte {offset + len(data):,} but its data "
                                                      f"continues to byte {offset + size:,}: it was cut off. "
                                                      "Upload it again.")
        if len(data) > size:
            raise RangeNotSupportedError(self.path, f"asked for {size:,} bytes, the server sent {len(data):,}: it "
                                                    "ignores Range requests. Download the file and open the copy.")
        return data

    async def _fetch(self, offset: int, size: int) -> bytes:
        """
        Bytes `offset..offset + size` by one ranged GET, of which at most `size + 1` bytes are taken
        whatever the server sends: fsspec's `cat_file` reads the whole answer into memory, and a server
        that answered the first ranges and then ignored them sent 3 GB into a 6 GB process.
        """
        fs = self._fs
        options = fs.kwargs.copy()
        headers = dict(options.pop("headers", None) or {})
        headers["Range"] = f"bytes={offset}-{offset + size - 1}"
        session = await fs.set_session()
        async with session.get(fs.encode_url(self._fspath), headers=headers, **options) as response:
            if response.status == 404:
                raise FileNotFoundError(self.path)
            response.raise_for_status()
            ranged = response.status == 206
            if ranged and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise RangeNotSupportedError(self.path, f"asked for bytes from {offset:,}, the server sent "
                                                        f"{response.headers.get('Content-Range') or 'another range'}: it "
                                                        "does not serve Range requests as asked. Download the file "
                                                        "and open the copy.")
            if not ranged and offset:
                raise RangeNotSupportedError(self.path, f"asked for bytes {offset:,}..{offset + size:,}, the server "
                                                        "sent the file from its start: it ignores Range requests. "
                                                        "Download the file and open the copy.")
            chunks, received = [], 0
            while received <= size:
                chunk = await response.content.read(min(1 << 20, size + 1 - received))
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
        data = b"".join(chunks)
        return data if ranged else data[:size]  # the whole file, asked from its start: its first bytes

    def read_into(self, buffer: memoryview, offset: int) -> None:
        buffer[:] = self.read(offset, len(buffer))

    def close(self) -> None:
        """Nothing to close: every read is its own request."""



def source_for(path: str) -> Any:
    """A `RemoteSource` for a URL, else a `FileSource`: what the readers read bytes through."""
    from ckptview.readers.model import FileSource

    return RemoteSource(path, remote_file_id(path)[0]) if is_url(path) else FileSource(path)


def open_remote(url: str, *, trust: bool) -> Checkpoint:
    """`ckptview.open` of a URL: the format found from its first bytes, read through ranged requests."""
    from ckptview.readers.registry import HEAD_BYTES, Probe, find_format
    from ckptview.readers.sniff import not_a_checkpoint

    size = remote_file_id(url)[0]
    source = RemoteSource(url, size)
    if size == 0:
        raise CorruptCheckpointError(url, "the file is empty (0 bytes): upload it again.")
    with listing_limit():
        head = source.read(0, min(HEAD_BYTES, size))
        fmt = find_format(Probe(url, head, size))
        if fmt is None:
            raise UnsupportedFormatError(url, not_a_checkpoint(head))
        if fmt.name == "sharded":
            return _open_remote_index(url, source, size, trust=trust)
        return fmt.read(url, size, trust=trust)


def _open_remote_index(url: str, source: RemoteSource, size: int, *, trust: bool) -> Checkpoint:
    """A shard index by URL: its shards are the files it names beside it (plain names only, never another place)."""
    from ckptview.readers import open_checkpoint

    try:
        index = json.loads(source.read(0, size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(url, "this JSON file cannot be parsed; re-download it.") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UnsupportedFormatError(url, "a JSON document without a weight_map, not a shard index")
    names = list(dict.fromkeys(str(v) for v in weight_map.values()))
    bad = [n for n in names if "/" in n or "\\" in n or n in (".", "..") or not n]
    if bad:
        raise ShardError(url, f"the index names shard {bad[0][:80]!r}, which is not a file beside it: refused.")
    base = url.rsplit("/", 1)[0]
    shards = {name: open_checkpoint(f"{base}/{name}", trust=trust) for name in names}
    by_shard = {name: {e.name: e.info for e in ckpt.tensors()} for name, ckpt in shards.items()}
    root: dict[str, TensorInfo] = {}
    for tensor, shard in weight_map.items():
        info = by_shard[str(shard)].get(tensor)
        if info is None:
            raise ShardError(url, f"the index places {tensor!r} in {shard}, which does not hold it: re-download the set.")
        root[tensor] = info
    kinds = {ckpt.format for ckpt in shards.values()}
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return Checkpoint(url, ("safetensors" if kinds == {"safetensors"} else "torch") + "-sharded", root,
                      file_size=size + sum(ckpt.file_size for ckpt in shards.values()),
                      sources=[s for ckpt in shards.values() for s in ckpt._sources],
                      metadata={str(k): str(v) for k, v in metadata.items()},
                      pickle_imports=[i for ckpt in shards.values() for i in ckpt.pickle_imports], trust=trust,
                      details={"shards": names})
