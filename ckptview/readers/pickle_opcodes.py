"""
What each byte means as a pickle opcode (from `pickletools`), and the first-bytes test of whether a
file reads as a pickle. Small on purpose: the format probe of every file imports it, and the opcode
scan of `pickle_scan` (whose pattern takes milliseconds to compile) only a pickle's reader needs.
"""

from __future__ import annotations

import mmap
import pickletools

LINE, TWO_LINES, LENGTH1, LENGTH4, LENGTH8, STOP = -1, -2, -3, -4, -5, -6
_STOP_CODE = ord(".")


def _argument_kinds() -> list[int | None]:
    """Per opcode byte: its fixed argument size, or how its argument's end is found; None when not an opcode."""
    kinds: list[int | None] = [None] * 256
    for opcode in pickletools.opcodes:
        size = opcode.arg.n if opcode.arg is not None else 0
        if size == pickletools.UP_TO_NEWLINE:
            # GLOBAL and INST name a module and a class, one line each
            size = TWO_LINES if opcode.code in "ci" else LINE
        elif size == pickletools.TAKEN_FROM_ARGUMENT1:
            size = LENGTH1
        elif size in (pickletools.TAKEN_FROM_ARGUMENT4, pickletools.TAKEN_FROM_ARGUMENT4U):
            size = LENGTH4
        elif size == pickletools.TAKEN_FROM_ARGUMENT8U:
            size = LENGTH8
        kinds[ord(opcode.code)] = size
    kinds[_STOP_CODE] = STOP
    return kinds


ARGUMENT_KINDS = _argument_kinds()


# GLOBAL, INST (a module and a name, one line each) and STACK_GLOBAL: the opcodes that import
_GLOBAL_CODES = frozenset(b"ci\x93")


def reads_as_pickle(head: bytes, whole: bool, *, any_global: bool = True) -> bool:
    r"""
    Whether a file's first bytes `head` (all of the file when `whole`) are what torch.load would
    unpickle to some effect. torch.load unpickles any file that is not a zip or tar archive, and a
    pickle needs no PROTO opcode: protocols 0 and 1 never write one (`cos\nsystem\n(S'ls'\ntR.` is
    all text). True when the bytes step as opcodes to a STOP, or on to the end of a `head` the file
    goes on past, or to a global named before anything that is not an opcode: torch.load imports
    that global before it fails. A text file meets a byte that is no opcode within a few bytes
    ('#', a space, 'f', 'm', ...), or ends with no STOP.

    With `any_global` False only a global named by dotted identifiers counts: "import torch\nimport
    os\n" is INST naming `mport torch`, which no import finds, and the file is a Python script, not
    a damaged pickle. Where a file was read as another format, every global counts (`scan`).
    """
    position, end = 0, len(head)
    if not head or ARGUMENT_KINDS[head[0]] in (None, STOP):
        return False
    while position < end:
        code = head[position]
        kind = ARGUMENT_KINDS[code]
        if kind is None:
            return False
        if kind == STOP:
            return True
        if kind == LINE or kind == TWO_LINES:
            line_end = head.find(b"\n", position + 1)
            if kind == TWO_LINES and line_end >= 0:
                line_end = head.find(b"\n", line_end + 1)
            if line_end < 0:
                break
            if code in _GLOBAL_CODES and (any_global or _names_a_module_member(head[position + 1:line_end])):
                return True
            step = line_end + 1 - position
        elif code in _GLOBAL_CODES and any_global:  # STACK_GLOBAL: it imports strings pushed before it
            return True
        elif kind == LENGTH1:
            step = 2 + (head[position + 1] if position + 1 < end else 0)
        elif kind == LENGTH4:
            step = 5 + int.from_bytes(head[position + 1:position + 5], "little", signed=True)
        elif kind == LENGTH8:
            step = 9 + int.from_bytes(head[position + 1:position + 9], "little")
        else:
            step = 1 + kind
        if step <= 0:
            return False
        position += step
    return not whole


def _names_a_module_member(lines: bytes) -> bool:
    module, _, name = lines.partition(b"\n")
    return all(part.isidentifier() for part in module.decode("latin-1").split(".") + name.decode("latin-1").split("."))


# opcodes that push a str (protocol 0-4: STRING, BINSTRING and SHORT_BINSTRING are str under torch.load's
# encoding), and those that store or fetch the memo
_STRINGS = frozenset(b"VSTU\x8cX\x8d")
_MEMO_PUTS = frozenset(b"pqr\x94")
_MEMO_GETS = frozenset(b"ghj")


def globals_named(data: bytes | mmap.mmap, start: int = 0,
                  end: int | None = None) -> tuple[list[tuple[str, str]], bool, bool]:
    """
    Every global the opcodes from `start` to `end` name, read without unpickling: GLOBAL and INST
    name theirs, a STACK_GLOBAL the two strings pushed just before it (directly or from the memo).
    Returns the (module, name) pairs, as the pickle writes them, whether a STACK_GLOBAL's strings
    could not be told this way, and whether the reading stopped at a STOP, a byte that is no opcode or
    the data's end (False: at `end`, with opcodes left). An over-count of what an unpickler meets:
    for a pickle that ckptview's unpickler stops reading where another reads on.
    """
    data_end = len(data)
    end = data_end if end is None else min(end, data_end)
    names: list[tuple[str, str]] = []
    unknown = False
    recent: list[str | None] = []  # what the last opcodes pushed; None where it is not a string
    memo: dict[int, str | None] = {}
    position = start
    while position < end:
        code = data[position]
        kind = ARGUMENT_KINDS[code]
        if kind is None or kind == STOP:
            return names, unknown, True
        argument_start = position + 1
        if kind == LINE or kind == TWO_LINES:
            line_end = data.find(b"\n", argument_start, end)
            if line_end < 0:
                break
            if kind == TWO_LINES:
                second = data.find(b"\n", line_end + 1, end)
                if second < 0:
                    break
                names.append((_text(data, argument_start, line_end), _text(data, line_end + 1, second)))
                line_end = second
            argument_at, argument_end = argument_start, line_end
            next_position = line_end + 1
        else:
            if kind == LENGTH1:
                size_bytes, length = 1, data[argument_start] if argument_start < end else 0
            elif kind in (LENGTH4, LENGTH8):
                size_bytes = 4 if kind == LENGTH4 else 8
                length = int.from_bytes(data[argument_start:argument_start + size_bytes], "little")
            else:
                size_bytes, length = kind, 0
            argument_at = argument_start + (size_bytes if kind < 0 else 0)
            argument_end = next_position = argument_start + size_bytes + length
        if code in _STRINGS:
            text = _text(data, argument_at, argument_end)
            recent.append(text.strip("'\"") if code == ord("S") else text)
        elif code in _MEMO_PUTS:
            index = len(memo) if code == 0x94 else _memo_index(data, code, argument_at, argument_end)
            memo[index] = recent[-1] if recent else None
        elif code in _MEMO_GETS:
            recent.append(memo.get(_memo_index(data, code, argument_at, argument_end)))
        elif code == 0x93:  # STACK_GLOBAL
            module, name = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
            if module is None or name is None:
                unknown = True
            else:
                names.append((module, name))
            recent.append(None)
        elif code != 0x95:  # FRAME leaves the stack as it is
            recent.append(None)
        del recent[:-2]
        position = next_position
    return names, unknown, end == data_end


_LONGEST_NAME = 4096  # characters of a string kept: no module or class name is longer


def _text(data: bytes | mmap.mmap, start: int, end: int) -> str:
    return bytes(data[start:min(end, start + _LONGEST_NAME)]).decode("utf-8", "replace")


def _memo_index(data: bytes | mmap.mmap, code: int, start: int, end: int) -> int:
    """PUT and GET give the index as a line of digits, the others as a little-endian integer."""
    argument = bytes(data[start:min(end, start + 32)])
    if code in b"pg":
        return int(argument) if argument.isdigit() else -1
    return int.from_bytes(argument, "little")
