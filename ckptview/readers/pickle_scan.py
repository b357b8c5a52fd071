"""
One pass over a pickle's opcodes before the C unpickler sees them: where the pickle ends, whether
its memo indices are ones that unpickler can hold, and whether its frames read the same however
its bytes arrive.

The C unpickler keeps its memo as an array and, on a PUT or LONG_BINPUT index past the array's
end, resizes it to twice the index and zero-fills it: one 5-byte LONG_BINPUT 1,378,644,401 makes
it allocate and touch 22 GB before anything can look at the index. A pickle that memoizes
honestly numbers its objects 0, 1, 2, …, one per PUT, and each PUT follows the opcode that made
the object, so an index is always below the PUT's byte offset. An index at or past its offset is
refused here, with a floor (`_ALWAYS_FINE`, a 64 MB memo) so no small pickle is judged by it.

A FRAME (protocol 4+) makes the C unpickler read its payload in one piece. Read from a stream
without `peek` (torch.load's BytesIO over a zip's data.pkl), a frame's bytes are then gone from the
stream, so an opcode whose argument or line runs past the frame's end is completed from the bytes
after the frame, skipping the frame's tail; read from a stream with `peek` (torch.load's open file
for a legacy or plain pickle), it may be completed from the very next bytes, depending on what the
stream had buffered. A fuzzed file used that to make torch look up `ch._utils` where a reading
through `peek` saw `torch._utils`. No pickler splits an opcode across a frame's end (Python's own
pure-Python unpickler refuses it), so such a pickle is refused here, as are a frame inside a frame
and a frame that runs on past the pickle's STOP (where the next pickle of a legacy file starts
would depend on the stream too). Every other pickle reads the same with its FRAME opcodes left
out, which is how `unframed` hands it to the unpickler: through any stream, in any piece sizes.

Most opcodes have a fixed-size argument, and most strings are short; a regular expression steps
over runs of them in C and Python handles only the others (long strings, newline-terminated
arguments, large LONG_BINPUTs, FRAMEs), so the pass costs a small part of the unpickling it guards.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, NamedTuple

from ckptview.readers.model import RefusedPickle
from ckptview.readers.pickle_opcodes import ARGUMENT_KINDS as _KINDS
from ckptview.readers.pickle_opcodes import LENGTH1 as _LENGTH1
from ckptview.readers.pickle_opcodes import LENGTH4 as _LENGTH4
from ckptview.readers.pickle_opcodes import LENGTH8 as _LENGTH8
from ckptview.readers.pickle_opcodes import LINE as _LINE
from ckptview.readers.pickle_opcodes import STOP as _STOP
from ckptview.readers.pickle_opcodes import TWO_LINES as _TWO_LINES

# An index below this allocates at most 2 * 4M * 8 bytes = 64 MB, whatever its offset.
_ALWAYS_FINE = 1 << 22

_PUT, _LONG_BINPUT, _STOP_CODE, _FRAME = ord("p"), ord("r"), ord("."), 0x95
_FRAME_HEADER = 9  # the opcode and its 8-byte length

# the C unpickler peeks this much ahead (_pickle.c's PREFETCH) from a stream that can
_PREFETCH = 8192 * 16


def _fixed_run_pattern() -> re.Pattern[bytes]:
    by_size: dict[int, list[int]] = {}
    for code, kind in enumerate(_KINDS):
        if kind is not None and kind >= 0 and code not in (_LONG_BINPUT, _FRAME):
            by_size.setdefault(kind, []).append(code)
    branches: dict[int | str, bytes] = {
        size: b"[" + b"".join(b"\\x%02x" % code for code in codes) + b"]" + b"." * size
        for size, codes in by_size.items()}
    # a LONG_BINPUT under _ALWAYS_FINE (little-endian: third byte below 0x40, fourth zero) stays in the run
    branches["memo"] = b"r..[\\x00-\\x3f]\\x00"
    # Strings and bytes shorter than _SHORT stay in the run too, one branch per length: a state dict
    # holds two per tensor (its name, its storage key), and leaving the run for each cost a third of
    # the pass. Each length costs compile time (3 ms in all at import for these).
    for kind, length_bytes in ((_LENGTH1, b""), (_LENGTH4, b"\\x00\\x00\\x00")):
        codes = b"".join(b"\\x%02x" % code for code, code_kind in enumerate(_KINDS) if code_kind == kind)
        lengths = b"|".join(b"\\x%02x%s.{%d}" % (n, length_bytes, n) for n in range(_SHORT))
        branches[kind] = b"[" + codes + b"](?:" + lengths + b")"
    # Tried in turn, so the most frequent first. A 20,000-tensor torch.save pickle is a quarter
    # LONG_BINPUTs (every object past the 256th is memoized by one), a third 0-byte and a third
    # 1-byte opcodes (MARK, TUPLE, REDUCE; BININT1, BINGET); this order took the pass from 19 to 14 ms.
    order = ("memo", 0, 1, _LENGTH4, *(size for size in sorted(by_size) if size > 1), _LENGTH1)
    return re.compile(b"(?:" + b"|".join(branches[key] for key in order) + b")*+", re.DOTALL)


_SHORT = 128
_FIXED_RUN = _fixed_run_pattern()


class PickleExtent(NamedTuple):
    end: int  # just past the pickle's STOP, or past the damage the unpickler will meet
    frames: tuple[int, ...]  # where its FRAME opcodes start, to be left out (see `unframed`)


def pickle_extent(data: Any, start: int = 0) -> PickleExtent:
    """
    Where the pickle at `start` in `data` (bytes or an mmap) ends and where its frames are, after
    checking its memo indices and frames. A damaged pickle ends just past the damage (an unknown
    opcode, a length that is negative or runs past `data`) or at the end of `data` (no STOP), so
    the unpickler meets the damage and says what it is.

    Raises:
        RefusedAt: a memo index that would make the C unpickler allocate a memo far larger than
            the pickle, or a frame that does not hold whole opcodes.
    """
    position, end = start, len(data)
    frames: list[int] = []
    frame_end = -1  # the end of the frame being read, while in one
    limit = end  # no run of opcodes steps past a frame's end
    match_run, find, from_bytes, kinds = _FIXED_RUN.match, data.find, int.from_bytes, _KINDS
    while True:
        position = match_run(data, position, limit).end()
        if position == frame_end:
            frame_end, limit = -1, end
            continue
        if position >= end:
            return PickleExtent(end, tuple(frames))
        code = data[position]
        kind = kinds[code]
        if kind == _LENGTH4:
            length = from_bytes(data[position + 1:position + 5], "little", signed=True)
            step = 5 + length if length >= 0 else 0
        elif kind == _STOP:
            if frame_end >= 0 and position + 1 != frame_end:
                raise _split(position, start, frames, "a frame that runs on past the pickle's STOP")
            return PickleExtent(position + 1, tuple(frames))
        elif kind == _LENGTH1:
            step = 2 + (data[position + 1] if position + 1 < end else 0)
        elif code == _LONG_BINPUT:
            _check_memo_index(from_bytes(data[position + 1:position + 5], "little", signed=True), position, start,
                              frames)
            step = 5
        elif code == _FRAME:
            if frame_end >= 0:
                raise _split(position, start, frames, "a frame inside a frame")
            step = _FRAME_HEADER
            if position + step <= end:
                frame_end = position + step + from_bytes(data[position + 1:position + step], "little")
                if frame_end <= end:
                    frames.append(position)
                    limit = frame_end
                    position += step
                    continue
            # a frame past the end of the data: the unpickler fails on reading it, as torch.load does
            return PickleExtent(min(position + step, end), tuple(frames))
        elif kind == _LINE or kind == _TWO_LINES:
            line_end = find(b"\n", position + 1)
            if kind == _TWO_LINES and line_end >= 0:
                line_end = find(b"\n", line_end + 1)
            if line_end < 0:
                return PickleExtent(end, tuple(frames))
            if code == _PUT:
                _check_memo_index(_decimal(data[position + 1:line_end]), position, start, frames)
            step = line_end + 1 - position
        elif kind == _LENGTH8:
            step = 9 + from_bytes(data[position + 1:position + 9], "little")
        elif kind is not None:
            step = 1 + kind  # a fixed-size argument the run stopped short of: at a frame's end or the data's
        else:
            step = 0
        if step == 0 or position + step > end:
            # not an opcode, a negative length or one past the data: the unpickler reports it on meeting it
            return PickleExtent(min(position + 9, end), tuple(frames))
        if position + step > limit:
            raise _split(position, start, frames, "an opcode split across the end of a frame")
        position += step


def unframed(data: Any, start: int, end: int, frames: tuple[int, ...]) -> io.BufferedReader:
    """
    The pickle in `data[start:end]` as a stream for the C unpickler, its FRAME opcodes (at
    `frames`, as `pickle_extent` found them) left out. With every frame holding whole opcodes, the
    opcodes read the same without them, and then through any stream: this one lets the unpickler
    peek 128 KiB ahead, where reading a BytesIO cost a `read` call per opcode and per argument.
    """
    if frames:
        pieces, position = [], start
        for frame in frames:
            pieces.append(data[position:frame])
            position = frame + _FRAME_HEADER
        pieces.append(data[position:end])
        payload = b"".join(pieces)
    else:
        payload = data if start == 0 and end == len(data) and isinstance(data, bytes) else data[start:end]
    return io.BufferedReader(_MemoryGuardedPayload(payload), _PREFETCH)


# What unpickling may add to the process, per byte of pickle: a state dict's records take ~16 (40 MB
# for a 20,000-tensor file's 2.5 MB data.pkl), while a byte of EMPTY_SET makes a 216-byte set and a
# byte of EMPTY_DICT a 64-byte dict. At least 1 GiB, so no real pickle is judged by the ratio; at
# most 4 GiB, so a 2 GB pickle of NONE (8 bytes of stack per byte) cannot take 16.
MEMORY_PER_PICKLE_BYTE = 48
MEMORY_FLOOR = 1 << 30
MEMORY_CEILING = 4 << 30
_UNCHECKED_BYTES = 1 << 20  # up to here a pickle can make at most 224 MB: nothing to measure
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _anonymous_memory() -> int | None:
    """The process's resident memory that no file backs (what unpickling allocates; mapped checkpoint
    pages are file-backed, so a thread streaming tensors does not count), or None without /proc."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * _PAGE_BYTES


class MemoryBomb(Exception):
    """Raised from the unpickler's reads: not an UnpicklingError, which the C unpickler would report
    as "Ran out of input"."""


class _MemoryGuardedPayload(io.RawIOBase):
    """
    A pickle's bytes for the unpickler's buffered reader, which refills 128 KiB at a time: past the
    first MiB, each refill checks how much memory the process has grown by since unpickling began.
    The C unpickler calls nothing of ckptview's while it builds containers, so this is where a
    memory bomb (a pickle of EMPTY_SET opcodes: 12 MB of them make 2.7 GB) is stopped, within one
    refill of crossing its limit, rather than exhausting the machine.
    """

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self._payload = memoryview(payload)
        self._position = 0
        self._limit = max(MEMORY_FLOOR, min(MEMORY_PER_PICKLE_BYTE * len(payload), MEMORY_CEILING))
        self._baseline = _anonymous_memory() if len(payload) > _UNCHECKED_BYTES else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # at most one prefetch's worth per call, whatever is asked: a large bytes or str argument is read
        # in one call of its own length, and the check between reads must not wait for it
        count = min(len(buffer), len(self._payload) - self._position, _PREFETCH)
        buffer[:count] = self._payload[self._position:self._position + count]
        self._position += count
        if self._baseline is not None and self._position > _UNCHECKED_BYTES:
            grown = (_anonymous_memory() or 0) - self._baseline
            if grown > self._limit:
                raise MemoryBomb(f"unpickling its first {self._position:,} bytes made {grown / 2**30:.1f} GiB of "
                                 f"objects, more than ckptview holds for a pickle of {len(self._payload):,} bytes "
                                 "(a memory bomb: opcodes that each build a container); ckptview stopped reading it")
        return count


def _decimal(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


class RefusedAt(RefusedPickle):
    """
    A pickle refused at `offset` (in the scanned data) before the C unpickler sees the bytes there.
    `frames` are the FRAME opcodes before it (the scan has seen no others). `unknown_after`: what torch.load would read past the
    offset cannot be known (it depends on how its bytes arrive), so it may import anything.
    """

    def __init__(self, message: str, offset: int, frames: list[int], unknown_after: bool = False) -> None:
        super().__init__(message)
        self.offset = offset
        self.frames = tuple(frames)
        self.unknown_after = unknown_after


def _split(position: int, start: int, frames: list[int], what: str) -> RefusedAt:
    return RefusedAt(f"{what} at byte {position - start:,}: no pickler writes that, and how torch.load would read on from "
                     "there depends on how the bytes reach it", position, frames, unknown_after=True)


def _check_memo_index(index: int, position: int, start: int, frames: list[int]) -> None:
    if index >= _ALWAYS_FINE and index >= position - start:
        raise RefusedAt(f"a memo index of {index:,} at byte {position - start:,} (a pickle numbers its "
                        f"objects in order; unpickling it would allocate {16 * index:,} bytes)", position, frames)
