"""
What each byte means as a pickle opcode (from `pickletools`), and the first-bytes test of whether a
file reads as a pickle. Small on purpose: the format probe of every file imports it, and the opcode
scan of `pickle_scan` (whose pattern takes milliseconds to compile) only a pickle's reader needs.
"""

from __future__ import annotations

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
