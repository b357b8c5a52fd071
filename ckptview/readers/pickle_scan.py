"""
One pass over a pickle's opcodes before the C unpickler sees them: where the pickle ends, and
whether its memo indices are ones that unpickler can hold.

The C unpickler keeps its memo as an array and, on a PUT or LONG_BINPUT index past the array's
end, resizes it to twice the index and zero-fills it: one 5-byte LONG_BINPUT 1,378,644,401 makes
it allocate and touch 22 GB before anything can look at the index. A pickle that memoizes
honestly numbers its objects 0, 1, 2, …, one per PUT, and each PUT follows the opcode that made
the object, so an index is always below the PUT's byte offset. An index at or past its offset is
refused here, with a floor (`_ALWAYS_FINE`, a 64 MB memo) so no small pickle is judged by it.

Most opcodes have a fixed-size argument, and most strings are short; a regular expression steps
over runs of them in C and Python handles only the others (long strings, newline-terminated
arguments, large LONG_BINPUTs), so the pass costs a small part of the unpickling it guards.
"""

from __future__ import annotations

import pickletools
import re
from typing import Any

from ckptview.readers.model import RefusedPickle

# An index below this allocates at most 2 * 4M * 8 bytes = 64 MB, whatever its offset.
_ALWAYS_FINE = 1 << 22

_LINE, _TWO_LINES, _LENGTH1, _LENGTH4, _LENGTH8, _STOP = -1, -2, -3, -4, -5, -6
_PUT, _LONG_BINPUT, _STOP_CODE = ord("p"), ord("r"), ord(".")


def _argument_kinds() -> list[int | None]:
    """Per opcode byte: its fixed argument size, or how its argument's end is found; None when not an opcode."""
    kinds: list[int | None] = [None] * 256
    for opcode in pickletools.opcodes:
        size = opcode.arg.n if opcode.arg is not None else 0
        if size == pickletools.UP_TO_NEWLINE:
            # GLOBAL and INST name a module and a class, one line each
            size = _TWO_LINES if opcode.code in "ci" else _LINE
        elif size == pickletools.TAKEN_FROM_ARGUMENT1:
            size = _LENGTH1
        elif size in (pickletools.TAKEN_FROM_ARGUMENT4, pickletools.TAKEN_FROM_ARGUMENT4U):
            size = _LENGTH4
        elif size == pickletools.TAKEN_FROM_ARGUMENT8U:
            size = _LENGTH8
        kinds[ord(opcode.code)] = size
    kinds[_STOP_CODE] = _STOP
    return kinds


_KINDS = _argument_kinds()


def _fixed_run_pattern() -> re.Pattern[bytes]:
    by_size: dict[int, list[int]] = {}
    for code, kind in enumerate(_KINDS):
        if kind is not None and kind >= 0 and code != _LONG_BINPUT:
            by_size.setdefault(kind, []).append(code)
    branches = [b"[" + b"".join(b"\\x%02x" % code for code in codes) + b"]" + b"." * size
                for size, codes in sorted(by_size.items())]
    # a LONG_BINPUT under _ALWAYS_FINE (little-endian: third byte below 0x40, fourth zero) stays in the run
    branches.append(b"r..[\\x00-\\x3f]\\x00")
    # Strings and bytes shorter than _SHORT stay in the run too, one branch per length: a state dict
    # holds two per tensor (its name, its storage key), and leaving the run for each cost a third of
    # the pass. Each length costs compile time (3 ms in all at import for these).
    for kind, length_bytes in ((_LENGTH1, b""), (_LENGTH4, b"\\x00\\x00\\x00")):
        codes = b"".join(b"\\x%02x" % code for code, code_kind in enumerate(_KINDS) if code_kind == kind)
        lengths = b"|".join(b"\\x%02x%s.{%d}" % (n, length_bytes, n) for n in range(_SHORT))
        branches.append(b"[" + codes + b"](?:" + lengths + b")")
    return re.compile(b"(?:" + b"|".join(branches) + b")*+", re.DOTALL)


_SHORT = 128
_FIXED_RUN = _fixed_run_pattern()


def pickle_end(data: Any, start: int = 0) -> int:
    """
    The offset just past the STOP of the pickle at `start` in `data` (bytes or an mmap), after
    checking its memo indices. A damaged pickle ends just past the damage (an unknown opcode, a
    length that is negative or runs past `data`) or at the end of `data` (no STOP), so the
    unpickler meets the damage and says what it is.

    Raises:
        MemoIndexRefused: a PUT or LONG_BINPUT index that would make the C unpickler allocate a
            memo far larger than the pickle.
    """
    position, end = start, len(data)
    match_run, find, from_bytes, kinds = _FIXED_RUN.match, data.find, int.from_bytes, _KINDS
    while True:
        position = match_run(data, position).end()
        if position >= end:
            return end
        code = data[position]
        kind = kinds[code]
        if kind == _LENGTH4:
            length = from_bytes(data[position + 1:position + 5], "little", signed=True)
            step = 5 + length if length >= 0 else 0
        elif kind == _STOP:
            return position + 1
        elif kind == _LENGTH1:
            step = 2 + (data[position + 1] if position + 1 < end else 0)
        elif code == _LONG_BINPUT:
            _check_memo_index(from_bytes(data[position + 1:position + 5], "little", signed=True), position, start)
            step = 5
        elif kind == _LINE or kind == _TWO_LINES:
            line_end = find(b"\n", position + 1)
            if kind == _TWO_LINES and line_end >= 0:
                line_end = find(b"\n", line_end + 1)
            if line_end < 0:
                return end
            if code == _PUT:
                _check_memo_index(_decimal(data[position + 1:line_end]), position, start)
            step = line_end + 1 - position
        elif kind == _LENGTH8:
            step = 9 + from_bytes(data[position + 1:position + 9], "little")
        else:
            step = 0
        if step == 0 or position + step > end:
            # not an opcode, a negative length or one past the data: the unpickler reports it on meeting it
            return min(position + 9, end)
        position += step


def _decimal(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


class MemoIndexRefused(RefusedPickle):
    """A memo index the C unpickler must not see; `offset` is where its opcode starts in the scanned data."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def _check_memo_index(index: int, position: int, start: int) -> None:
    if index >= _ALWAYS_FINE and index >= position - start:
        raise MemoIndexRefused(f"a memo index of {index:,} at byte {position - start:,} (a pickle numbers its "
                               f"objects in order; unpickling it would allocate {16 * index:,} bytes)", position)
