"""The opcode pass run before every unpickle: it must find the same pickle end as pickletools on
every pickle Python or torch writes, refuse only memo indices and frames no honest pickle has, and
hand the unpickler a stream it reads as torch.load reads the file."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from collections import OrderedDict

import pytest
import torch

from ckptview.readers.pickle_scan import RefusedAt, pickle_extent, unframed

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
        opcodes = list(pickletools.genops(data))
        opcode, _, stop = opcodes[-1]
        assert opcode.name == "STOP"
        trailing = b"\x00garbage after the pickle"
        assert pickle_extent(data + trailing).end == stop + 1 == len(data), value
        extent = pickle_extent(trailing + data + trailing, len(trailing))
        assert extent.end == len(trailing) + len(data)
        # read without its frames (protocols 4 and 5 frame up to 64 KiB at a time), the pickle is the same value
        frames = [len(trailing) + position for op, _, position in opcodes if op.name == "FRAME"]
        assert list(extent.frames) == frames, value
        stream = unframed(trailing + data + trailing, len(trailing), extent.end, extent.frames)
        assert pickle.Unpickler(stream).load() == value


def test_end_of_every_pickle_torch_writes() -> None:
    state = {f"block{i}.conv.weight": torch.ones(2, 2) for i in range(300)} | {"step": 7, "name": "run\nr"}
    members = dict(hostile.zip_members(hostile.saved_zip(state)))
    data_pkl = next(data for name, data in members.items() if name.endswith("data.pkl"))
    assert pickle_extent(data_pkl).end == len(data_pkl)
    legacy = hostile.saved_legacy(state)
    stream, position = io.BytesIO(legacy), 0
    for _ in range(5):  # magic, protocol, sys info, data, storage keys
        for _ in pickletools.genops(stream):  # leaves the stream just past the STOP
            pass
        assert pickle_extent(legacy, position).end == stream.tell()
        position = stream.tell()


def test_honest_memo_past_four_million_is_read() -> None:
    # 4.3M memoized lists: LONG_BINPUT indices past the floor, each below its own offset
    data = pickle.dumps([[] for _ in range(4_300_000)], protocol=2)
    assert pickle_extent(data).end == len(data)


@pytest.mark.parametrize(("opcode", "index"), [(b"r", 1 << 22), (b"r", 2 ** 31 - 1), (b"p", 10 ** 18)])
def test_memo_index_past_its_offset_refused(opcode: bytes, index: int) -> None:
    put = b"r" + struct.pack("<I", index) if opcode == b"r" else b"p" + str(index).encode() + b"\n"
    data = b"\x80\x02]" + put + b"."
    with pytest.raises(RefusedAt, match="memo index") as refused:
        pickle_extent(data)
    assert refused.value.offset == 3


def _unpickling_error(data: bytes) -> str:
    with pytest.raises(Exception) as failed:
        pickle.loads(data)
    return f"{type(failed.value).__name__}: {failed.value}"


@pytest.mark.parametrize("damaged", [b"\x80\x02\xff.", b"\x80\x02X\xff\xff\xff\xff.", b"\x80\x02X\x10\x00\x00\x00ab",
                                     b"\x80\x02cos\nsys", b"\x80\x02K"])
def test_damage_is_left_for_the_unpickler_to_name(damaged: bytes) -> None:
    # the slice handed to the unpickler still holds the damage, so it says what it is (not "ran out of input")
    end = pickle_extent(damaged).end
    assert end <= len(damaged)
    assert _unpickling_error(damaged[:end]) == _unpickling_error(damaged)


# --- frames that split an opcode: the C unpickler reads them one way from a BytesIO (torch.load on a zip's
# data.pkl) and another from a stream that can peek (torch.load on a legacy or plain pickle file) -------------

def _framed(payload: bytes, frame_length: int, after: bytes) -> bytes:
    return b"\x80\x04\x95" + struct.pack("<Q", frame_length) + payload + after


class _Names(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> str:
        return f"{module}.{name}"


def _global_read_through(stream: io.BufferedIOBase) -> object:
    try:
        return _Names(stream).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as failed:
        return type(failed).__name__


SPLIT_FRAMES = {
    # the frame ends inside GLOBAL's first line: through a BytesIO the line is read from the bytes after the
    # frame ("s.path\n"), through a peeking stream from the frame's own bytes on ("os.path\n")
    "line": (_framed(b"co", 2 + 1, b"s.path\njoin\n."), "split across the end of a frame"),
    "fixed argument": (_framed(b"]K", 2, b"\x05a."), "split across the end of a frame"),
    "string": (_framed(b"\x8c\x05ab", 4, b"cde."), "split across the end of a frame"),
    "frame in a frame": (_framed(b"\x95" + struct.pack("<Q", 2) + b"K\x01.", 12, b""), "a frame inside a frame"),
    "frame past its STOP": (_framed(b"K\x01.K\x02", 5, b"."), "runs on past the pickle's STOP"),
}


@pytest.mark.parametrize("name", SPLIT_FRAMES)
def test_frame_that_splits_an_opcode_is_refused(name: str) -> None:
    data, why = SPLIT_FRAMES[name]
    with pytest.raises(RefusedAt, match="no pickler writes that") as refused:
        pickle_extent(data)
    assert why in str(refused.value) and refused.value.unknown_after and refused.value.offset > 2


def test_a_split_frame_reads_two_ways_in_the_c_unpickler() -> None:
    # why the refusal: the same bytes name two different globals depending on the stream
    data, _ = SPLIT_FRAMES["line"]
    through_bytesio = _global_read_through(io.BytesIO(data))
    through_peek = _global_read_through(io.BufferedReader(io.BytesIO(data)))
    assert through_bytesio != through_peek


def test_honest_frames_read_the_same_through_any_stream() -> None:
    value = {f"layer{i}": ("x" * (i % 300), list(range(i % 50))) for i in range(3000)}
    data = pickle.dumps(value, protocol=5)
    extent = pickle_extent(data)
    assert len(extent.frames) > 3 and extent.end == len(data)
    assert _Names(io.BytesIO(data)).load() == _Names(io.BufferedReader(io.BytesIO(data))).load() == value
    assert _Names(unframed(data, 0, extent.end, extent.frames)).load() == value


def test_the_memory_guard_checks_at_least_every_prefetch_however_much_is_asked() -> None:
    """The unpickler reads a large bytes or str argument in one call of its length: each read is cut to one
    prefetch (128 KiB), so the memory check between reads runs at least that often."""
    from ckptview.readers.pickle_scan import _PREFETCH, _MemoryGuardedPayload

    payload = _MemoryGuardedPayload(b"\x8f" * (3 * _PREFETCH + 5))
    buffer = bytearray(8 * _PREFETCH)
    assert [payload.readinto(buffer) for _ in range(5)] == [_PREFETCH, _PREFETCH, _PREFETCH, 5, 0]


# --- globals named without unpickling (a refused pickle's rest, which torch.load may read on into) ----

class _Named:
    """A class pickled by reference: each protocol names it its own way (GLOBAL, or STACK_GLOBAL with the
    strings memoized and fetched back for the second use)."""


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_globals_named_finds_what_pickletools_lists(protocol: int) -> None:
    from ckptview.readers.pickle_opcodes import globals_named

    data = pickle.dumps([OrderedDict(a=1), _Named, OrderedDict(b=2), torch.nn.Linear], protocol=protocol)
    named, unresolved, stopped = globals_named(data)
    expected = [(arg.split(" ")[0], arg.split(" ")[1]) for op, arg, _ in pickletools.genops(data)
                if op.name in ("GLOBAL", "INST")]
    if protocol >= 4:  # STACK_GLOBAL: the classes pickle wrote, in order; a memoized one is fetched, not renamed
        expected = [("collections", "OrderedDict"), (__name__, "_Named"), ("torch.nn.modules.linear", "Linear")]
    assert named == expected and not unresolved and stopped


def test_globals_named_says_what_it_cannot_tell() -> None:
    from ckptview.readers.pickle_opcodes import globals_named

    # the strings reach STACK_GLOBAL through a tuple taken apart: no stepping over opcodes tells them
    indirect = b"\x80\x04" + hostile.text("os") + hostile.text("system") + b"\x86" + b"0" + b"\x93."
    assert globals_named(indirect)[1] is True
    long_pickle = pickle.dumps([hostile.global_op("os", "system")] * 1000, protocol=2)
    assert globals_named(long_pickle, 0, 100)[2] is False  # opcodes left past `end`
    assert globals_named(long_pickle)[2] is True
