"""The opcode pass run before every unpickle: it must find the same pickle end as pickletools on
every pickle Python or torch writes, and refuse only memo indices no honest pickle has."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from collections import OrderedDict

import pytest
import torch

from ckptview.readers.pickle_scan import MemoIndexRefused, pickle_end

import hostile_files as hostile


def _values() -> list[object]:
    shared = ["shared"]
    return [
        None, True, 0, -1, 255, 65536, -(2 ** 31), 2 ** 64, -(2 ** 200), 1.5, float("inf"), "", "r" * 300,
        "line\nbreak\rr\x00", "é" * 70_000, b"", b"r\n" * 200, bytearray(b"xyz" * 100), (), (1,), (1, 2), (1, 2, 3),
        list(range(3000)), {f"layer{i}.weight": i for i in range(1500)}, {1, 2, 3}, frozenset({4}),
        OrderedDict(a=1), [shared, shared, [shared]], complex(1, 2), slice(1, 5), {"nested": [[[["deep"]]]]},
        [b"\x72" * 5, "\x72\x00\x00\x00\x7f"],  # bytes that look like a LONG_BINPUT, inside strings
        # around the longest string the pass steps over in C (127), for each string opcode a protocol picks
        [("s" * n, b"b" * n, bytearray(n)) for n in (0, 1, 2, 126, 127, 128, 129, 255, 256, 257)],
    ]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_end_agrees_with_pickletools(protocol: int) -> None:
    for value in _values():
        data = pickle.dumps(value, protocol=protocol)
        *_, (opcode, _, stop) = pickletools.genops(data)
        assert opcode.name == "STOP"
        trailing = b"\x00garbage after the pickle"
        assert pickle_end(data + trailing) == stop + 1 == len(data), value
        assert pickle_end(trailing + data + trailing, len(trailing)) == len(trailing) + len(data)


def test_end_of_every_pickle_torch_writes() -> None:
    state = {f"block{i}.conv.weight": torch.ones(2, 2) for i in range(300)} | {"step": 7, "name": "run\nr"}
    members = dict(hostile.zip_members(hostile.saved_zip(state)))
    data_pkl = next(data for name, data in members.items() if name.endswith("data.pkl"))
    assert pickle_end(data_pkl) == len(data_pkl)
    legacy = hostile.saved_legacy(state)
    stream, position = io.BytesIO(legacy), 0
    for _ in range(5):  # magic, protocol, sys info, data, storage keys
        for _ in pickletools.genops(stream):  # leaves the stream just past the STOP
            pass
        assert pickle_end(legacy, position) == stream.tell()
        position = stream.tell()


def test_honest_memo_past_four_million_is_read() -> None:
    # 4.3M memoized lists: LONG_BINPUT indices past the floor, each below its own offset
    data = pickle.dumps([[] for _ in range(4_300_000)], protocol=2)
    assert pickle_end(data) == len(data)


@pytest.mark.parametrize(("opcode", "index"), [(b"r", 1 << 22), (b"r", 2 ** 31 - 1), (b"p", 10 ** 18)])
def test_memo_index_past_its_offset_refused(opcode: bytes, index: int) -> None:
    put = b"r" + struct.pack("<I", index) if opcode == b"r" else b"p" + str(index).encode() + b"\n"
    data = b"\x80\x02]" + put + b"."
    with pytest.raises(MemoIndexRefused, match="memo index") as refused:
        pickle_end(data)
    assert refused.value.offset == 3


def _unpickling_error(data: bytes) -> str:
    with pytest.raises(Exception) as failed:
        pickle.loads(data)
    return f"{type(failed.value).__name__}: {failed.value}"


@pytest.mark.parametrize("damaged", [b"\x80\x02\xff.", b"\x80\x02X\xff\xff\xff\xff.", b"\x80\x02X\x10\x00\x00\x00ab",
                                     b"\x80\x02cos\nsys", b"\x80\x02K"])
def test_damage_is_left_for_the_unpickler_to_name(damaged: bytes) -> None:
    # the slice handed to the unpickler still holds the damage, so it says what it is (not "ran out of input")
    end = pickle_end(damaged)
    assert end <= len(damaged)
    assert _unpickling_error(damaged[:end]) == _unpickling_error(damaged)
