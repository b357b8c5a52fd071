"""The unpickler reads pickles through `PrefetchedBytes` (peek, read, readinto, readline): it must
give the C unpickler exactly the bytes `pickle.loads` sees, however it asks for them."""

from __future__ import annotations

import pickle

import pytest

from ckptview.readers.torch_pickle import PrefetchedBytes
from ckptview.readers.unpickler import SafeUnpickler


def _values() -> list[object]:
    return [
        None, 7, -(2 ** 200), 1.5, "é" * 70_000, "line\nbreak", b"\x00" * 300_000, bytearray(b"xyz" * 100_000),
        list(range(50_000)), {f"layer{i}.weight": i for i in range(3000)}, ("a", ("b", ("c",))), {1, 2}, slice(1, 5),
        [b"r" * 200_000, "x" * 140_000, b""],  # arguments larger than the 128 KiB the unpickler prefetches
    ]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_reads_as_pickle_loads(protocol: int) -> None:
    for value in _values():
        data = pickle.dumps(value, protocol=protocol)
        assert SafeUnpickler(PrefetchedBytes(data)).load() == pickle.loads(data), (protocol, type(value))


def test_reads_past_the_end_stop_at_it() -> None:
    stream = PrefetchedBytes(b"ab\ncd")
    assert bytes(stream.readline()) == b"ab\n" and bytes(stream.peek(100)) == b"cd"
    buffer = bytearray(8)
    assert stream.readinto(buffer) == 2 and buffer[:2] == b"cd"
    assert bytes(stream.read(5)) == b"" and bytes(stream.readline()) == b""
