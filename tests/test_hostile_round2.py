"""
Hostile files, round 2: `scan` never calls a code-running file safe (checked against what torch.load
itself looks up), one file never changes how the next is read, paths stay inside their folder,
bombs are refused before they inflate, and every failure is one line in our words.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ckptview
from ckptview.cli import main as cli_main
from ckptview.errors import CkptviewError, CorruptCheckpointError, ShardError, UnsupportedFormatError
from ckptview.readers.dcp import _DCP_CLASSES
from ckptview.readers.torch_pickle import TORCHSCRIPT_CODE, UNKNOWN_IMPORTS
from ckptview.readers.unpickler import _allowed
from ckptview.readers.weights_only import TORCH_SAFE_CLASSES

import hostile_files as hostile
from torch_oracle import torch_lookups

REPO = Path(__file__).resolve().parents[1]


def scan_verdict(path: Path) -> tuple[str, set[str]]:
    """("code"/"safe", the imports scan names); ("code", what it names) when ckptview refuses a file
    whose pickles name globals before the point of failure (`scan` exits 3), else ("error", set())."""
    try:
        with ckptview.open(path) as ckpt:
            imports = {imp.name for imp in ckpt.pickle_imports}
            return ("code" if imports or ckpt.format == "torchscript" else "safe"), imports
    except CkptviewError as exc:
        named = {imp.name for imp in getattr(exc, "named_globals", [])}
        return ("code", named) if named else ("error", set())


def assert_scan_covers_torch(path: Path) -> str:
    """The differential property: every global torch.load would look up beyond the allow-list is named
    by scan, and a file torch would take code from is never called safe."""
    observed = torch_lookups(path)
    verdict, imports = scan_verdict(path)
    # less torch's own classes its weights-only loader accepts (DTensor's), which scan counts as torch's
    foreign = (set(observed["lookups"]) - set(_allowed()) - set(TORCH_SAFE_CLASSES)
               - (_DCP_CLASSES if path.is_dir() else set()))
    if observed["torchscript"]:
        assert verdict in ("code", "error")
    if verdict != "error" and not any(name.startswith("<unknown") for name in imports):  # unknown: anything
        assert foreign <= imports, f"torch.load looks up {sorted(foreign - imports)}, which scan does not name"
    if foreign:
        assert verdict != "safe"
    return verdict


# --- 1. scan is a guarantee ----------------------------------------------------------------------

@pytest.mark.parametrize("position", [0, 1, 2, 4], ids=["magic", "protocol", "sys-info", "storage-keys"])
def test_legacy_side_pickles_are_scanned(tmp_path: Path, position: int) -> None:
    marker = tmp_path / "ran"
    path = hostile.legacy_side_pickle(tmp_path, position, marker)
    assert torch_lookups(path)["lookups"][:1] == ["os.system"] or position != 0
    assert assert_scan_covers_torch(path) == "code"
    _, imports = scan_verdict(path)
    assert "os.system" in imports
    assert cli_main(["scan", str(path)]) == 3
    assert not marker.exists()


@pytest.mark.parametrize("evil_first", [True, False])
def test_zip_with_repeated_member_names_is_refused(tmp_path: Path, evil_first: bool) -> None:
    path = hostile.zip_duplicate_data_pkl(tmp_path, tmp_path / "ran", evil_first)
    with pytest.raises(CorruptCheckpointError, match="2 members named archive/data.pkl") as caught:
        ckptview.open(path)
    # torch reads one of the copies, which one depends on its zip reader: what either names counts
    assert [imp.name for imp in caught.value.named_globals] == ["os.system"]
    assert assert_scan_covers_torch(path) == "code"
    assert cli_main(["scan", str(path)]) == 3


def test_a_refused_torchscript_archive_is_code(tmp_path: Path) -> None:
    # torch.load hands an archive with constants.pkl to torch.jit.load, which runs its code: refused
    # for a repeated data.pkl, it still needs code
    saved = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), saved)
    members = hostile.zip_members(saved.read_bytes())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = hostile.write_zip(tmp_path / "repeated.pt", members + [m for m in members if m[0].endswith("/data.pkl")])
    with pytest.raises(CorruptCheckpointError, match="2 members named .*TorchScript code") as caught:
        ckptview.open(path)
    assert [imp.name for imp in caught.value.named_globals] == [TORCHSCRIPT_CODE]
    assert cli_main(["scan", str(path)]) == 3


def test_zip_is_read_from_the_folder_torch_reads(tmp_path: Path) -> None:
    path = hostile.zip_second_folder(tmp_path, tmp_path / "ran")
    assert scan_verdict(path)[0] != "safe"
    assert_scan_covers_torch(path)


@pytest.mark.parametrize(("module", "name"), [
    ("torch.distributed.checkpoint.filesystem", "os.system"),
    ("pathlib", "os.system"),
    ("posix", "system"),
])
def test_dcp_metadata_globals_are_matched_exactly(tmp_path: Path, module: str, name: str) -> None:
    marker = tmp_path / "ran"
    folder = hostile.dcp_metadata_payload(tmp_path, marker, module, name)
    assert assert_scan_covers_torch(folder) == "code"
    assert f"{module}.{name}" in scan_verdict(folder)[1]
    assert not marker.exists()


@pytest.mark.parametrize(("make", "kind"), [
    # torch.load runs the payload, then fails where ckptview does
    (hostile.code_then_failure, "legacy-protocol"), (hostile.code_then_failure, "legacy-truncated"),
    (hostile.code_then_failure, "zip-missing-storage"),
    # ckptview stops reading where torch.load reads on: the opcodes it did not unpickle are read for their globals
    (hostile.past_what_ckptview_refuses, "numpy-call"), (hostile.past_what_ckptview_refuses, "bad-checksum"),
    (hostile.past_what_ckptview_refuses, "deflated-storage"),
])
def test_code_torch_reaches_in_a_refused_file_is_code(tmp_path: Path, make: Any, kind: str) -> None:
    # scan exits 3 naming the payload, not 1 as for a merely damaged file
    marker = tmp_path / "ran"
    path = make(tmp_path, marker, kind)
    assert "os.system" in torch_lookups(path)["lookups"]
    with pytest.raises(CkptviewError, match="names os.system") as caught:
        ckptview.open(path)
    assert [imp.name for imp in caught.value.named_globals] == ["os.system"]
    assert assert_scan_covers_torch(path) == "code"
    assert cli_main(["scan", str(path)]) == 3
    assert not marker.exists()


@pytest.mark.parametrize("payload_in", [None, "storages", "tensors", "pickle"])
def test_legacy_tar_pickles_are_scanned(tmp_path: Path, payload_in: str | None) -> None:
    # torch.load reads a tar holding `storages` as its pre-1.0 format, unpickling member by member
    marker = tmp_path / "ran"
    path = hostile.legacy_tar(tmp_path, marker, payload_in)
    verdict = assert_scan_covers_torch(path)
    assert verdict == ("error" if payload_in is None else "code")
    assert cli_main(["scan", str(path)]) == (1 if payload_in is None else 3)
    assert not marker.exists()


def test_a_file_of_no_format_that_torch_unpickles_is_scanned(tmp_path: Path) -> None:
    # torch.load unpickles any file that is no zip or tar: this one imports torch._utils.os.system (a
    # dotted STACK_GLOBAL, os.system) before a BINBYTES8 longer than the file, which no format claims
    marker = tmp_path / "ran"
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x88" + hostile.text("torch") + hostile.text("_utils.os.system") + b"\x93]a"
                     + b"\x8e" + struct.pack("<Q", 2**40) + b"abc")
    assert "torch._utils.os.system" in torch_lookups(path)["lookups"]
    with pytest.raises(UnsupportedFormatError, match="unknown binary data.*names torch._utils.os.system"):
        ckptview.open(path)
    assert assert_scan_covers_torch(path) == "code"
    assert cli_main(["scan", str(path)]) == 3
    assert not marker.exists()


def test_a_polyglot_whose_format_is_refused_names_what_its_pickle_imports(tmp_path: Path) -> None:
    # a safetensors header (its 9th byte "{") inside a pickle's string: refused as safetensors (the
    # length is absurd), while torch.load unpickles it and runs the payload after the string
    marker = tmp_path / "ran"
    inside = b'abcd{"x":1}'
    path = tmp_path / "polyglot.bin"  # torch.load reads a name ending .safetensors with safetensors
    path.write_bytes(b"\x80\x02\x8c" + bytes([len(inside)]) + inside + b"0"
                     + hostile.call_and_drop(hostile.global_op("os", "system"), f"touch {marker}") + b"N.")
    assert "os.system" in torch_lookups(path)["lookups"]
    with pytest.raises(CorruptCheckpointError, match="safetensors header claims .* It names os.system") as caught:
        ckptview.open(path)
    assert [imp.name for imp in caught.value.named_globals] == ["os.system"]
    assert cli_main(["scan", str(path)]) == 3
    assert not marker.exists()


@pytest.mark.parametrize("make", [hostile.dcp_bytes_item_payload, hostile.dcp_item_replaced_by_pickle])
def test_dcp_non_tensor_items_are_scanned(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any) -> None:
    # dcp.load reads a non-tensor item with torch.load(weights_only=False), a torch.save archive or not:
    # its pickle is the checkpoint's code
    marker = tmp_path / "ran"
    folder = make(tmp_path, marker)
    assert {"posix.system", "os.system"} & set(torch_lookups(folder)["lookups"])
    assert assert_scan_covers_torch(folder) == "code"
    assert cli_main(["scan", str(folder)]) == 3
    said = capsys.readouterr().out
    assert ("torch.distributed.checkpoint.load would import" in said if make is hostile.dcp_bytes_item_payload
            else f"{folder}: NEEDS CODE: refused, but its loader would import os.system" in said)
    assert not marker.exists()


def test_a_damaged_dcp_metadata_naming_only_dcp_classes_is_no_code(tmp_path: Path) -> None:
    # DCP's own classes are no foreign code in a damaged .metadata either: exit 1 (damaged), not 3
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "epoch": 3}, checkpoint_id=str(folder), no_dist=True)
    metadata = bytearray((folder / ".metadata").read_bytes())
    metadata[-1] = 0xFF  # its STOP, now no opcode: the pickle fails after naming every class
    (folder / ".metadata").write_bytes(metadata)
    with pytest.raises(CorruptCheckpointError, match="cannot be read") as caught:
        ckptview.open(folder)
    assert not getattr(caught.value, "named_globals", None) and "names" not in str(caught.value)


def test_normal_files_scan_as_torch_reads_them(tmp_path: Path) -> None:
    for name, save in {"zip.pt": lambda p: torch.save({"w": torch.ones(2), "n": 3}, p),
                       "legacy.pt": lambda p: torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False),
                       "model.pt": lambda p: torch.save(torch.nn.Linear(2, 2), p)}.items():
        save(tmp_path / name)
        verdict = assert_scan_covers_torch(tmp_path / name)
        assert verdict == ("code" if name == "model.pt" else "safe")


# --- 2. one file never changes how the next is read ------------------------------------------------

def test_poisoning_file_then_a_normal_file(tmp_path: Path) -> None:
    normal = tmp_path / "normal.pt"
    reference = {"w": torch.randn(5), "b": torch.arange(3, dtype=torch.int64), "h": torch.randn(2, dtype=torch.float16)}
    torch.save(reference, normal)
    legacy = tmp_path / "legacy.pt"
    torch.save(reference, legacy, _use_new_zipfile_serialization=False)
    for name, path in hostile.poisoning_files(tmp_path).items():
        if name == "ordered-dict-items":
            # OrderedDicts are BUILT legitimately (torch stores `_metadata` so): the state is kept as data
            with ckptview.open(path) as ckpt:
                assert [e.name for e in ckpt.tensors()] == ["w"] and list(ckpt.root.items())[0][0] == "w"
                assert ckpt.root.pickled_state == {"items": 1}
        else:
            with pytest.raises(CorruptCheckpointError, match="does not let a file change"):
                ckptview.open(path)
        for good in (normal, legacy):
            with ckptview.open(good) as ckpt:
                assert {e.name: e.dtype for e in ckpt.tensors()} == {k: v.dtype for k, v in reference.items()}, name
                for entry in ckpt.tensors():
                    assert torch.equal(entry.load(), reference[entry.name]), name
        diff = ckptview.diff(normal, legacy, values=True)
        assert not diff.keys.missing and all(d.max_abs_diff == 0 for d in diff.values.tensors), name


def test_every_global_handed_out_refuses_build() -> None:
    """No object the unpickler hands a file accepts BUILD: neither a __dict__ nor a slot-state write."""
    from ckptview.readers.unpickler import SafeUnpickler

    for full_name in _allowed():
        module, _, name = full_name.rpartition(".")
        for state in (b"}" + hostile.text("x") + b"K\x01s", b"N}" + hostile.text("x") + b"K\x01s\x86"):
            data = b"\x80\x02" + hostile.global_op(module, name) + state + b"b."
            with pytest.raises(Exception) as caught:
                SafeUnpickler(io.BytesIO(data)).load()
            assert not isinstance(caught.value, AssertionError), full_name


# --- 3. confinement --------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_shard_index_cannot_reach_outside_its_folder(tmp_path: Path, where: str) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_text("TOPSECRET first line of a private file\n")
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    target = {"parent": "../secret.safetensors", "absolute": str(secret), "symlink": "link.safetensors"}[where]
    if where == "symlink":
        (folder / "link.safetensors").symlink_to(secret)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": target}}))
    with pytest.raises(CorruptCheckpointError, match="not a file inside its folder") as caught:
        ckptview.open(index)
    assert "TOPSECRET" not in str(caught.value)


def _hub_snapshot(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache repository as huggingface_hub lays one out: each file of the snapshot a
    relative link into the repository's blobs/ (named by content hash)."""
    import hashlib

    snapshot = cache / repo / "snapshots" / "0123abcd"
    (cache / repo / "blobs").mkdir(parents=True)
    for name, made in files.items():
        blob = cache / repo / "blobs" / hashlib.sha256(made.read_bytes()).hexdigest()
        made.rename(blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_sharded_set_in_the_hugging_face_cache_opens_and_is_still_confined(tmp_path: Path) -> None:
    made = tmp_path / "made"
    made.mkdir()
    tensors = {"a": torch.arange(4.0), "b": torch.ones(3)}
    for name, value in tensors.items():
        save_file({name: value}, made / f"{name}.safetensors")
    files = {"model-00001-of-00002.safetensors": made / "a.safetensors",
             "model-00002-of-00002.safetensors": made / "b.safetensors"}
    (made / "index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                "b": "model-00002-of-00002.safetensors"}}))
    snapshot = _hub_snapshot(tmp_path / "hub", "models--org--tiny", files | {"model.safetensors.index.json":
                                                                               made / "index.json"})
    with ckptview.open(snapshot / "model.safetensors.index.json") as ckpt:
        assert {e.name: e.load().tolist() for e in ckpt.tensors()} == {k: v.tolist() for k, v in tensors.items()}
    secret = tmp_path / "secret.safetensors"
    save_file({"s": torch.zeros(1)}, secret)
    (snapshot / "leak.safetensors").symlink_to(secret)  # a link out of the repository, not into its blobs
    blob = next(p.name for p in (snapshot.parent.parent / "blobs").iterdir())
    for named in ("leak.safetensors", f"../../blobs/{blob}"):  # nor may the index itself name a blob
        (snapshot / "other.index.json").write_text(json.dumps({"weight_map": {"s": named}}))
        with pytest.raises(CorruptCheckpointError, match="not a file inside its folder"):
            ckptview.open(snapshot / "other.index.json")
    # the same layout outside a hub cache repository (models--, datasets--, spaces--) is a link leading out
    plain = tmp_path / "plain"
    (tmp_path / "hub" / "models--org--tiny").rename(plain)
    with pytest.raises(CorruptCheckpointError, match="not a file inside its folder"):
        ckptview.open(plain / "snapshots" / "0123abcd" / "model.safetensors.index.json")


def test_shard_naming_an_index_is_refused(tmp_path: Path) -> None:
    first, second = tmp_path / "a.index.json", tmp_path / "b.index.json"
    first.write_text(json.dumps({"weight_map": {"w": "b.index.json"}}))
    second.write_text(json.dumps({"weight_map": {"w": "a.index.json"}}))
    (tmp_path / "self.index.json").write_text(json.dumps({"weight_map": {"w": "self.index.json"}}))
    for index in (first, tmp_path / "self.index.json"):
        with pytest.raises(ShardError, match="not a checkpoint file ckptview reads"):
            ckptview.open(index)


def test_shard_that_is_not_a_checkpoint_is_not_quoted(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("TOPSECRET password=hunter2\n")
    (tmp_path / "x.index.json").write_text(json.dumps({"weight_map": {"w": "notes.txt"}}))
    with pytest.raises(ShardError) as caught:
        ckptview.open(tmp_path / "x.index.json")
    assert "TOPSECRET" not in str(caught.value)


# --- 4. bounded work -----------------------------------------------------------------------------

def _run_measured(code: str, timeout: float = 60) -> dict[str, float]:
    """Run `code` in a fresh process; it prints JSON; add its wall time and peak RSS (MB)."""
    script = ("import json, resource, sys, time\nstart = time.perf_counter()\n" + code
              + "\nresult['seconds'] = time.perf_counter() - start"
              + "\nresult['peak_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
              + "\nprint(json.dumps(result))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_OPEN_REFUSED = """
import ckptview
from ckptview.errors import CkptviewError
import_done = time.perf_counter()
try:
    ckptview.open(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    result = {{'refused': False}}
except CkptviewError as exc:
    result = {{'refused': True, 'message': str(exc)}}
result['open_seconds'] = time.perf_counter() - import_done
"""


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bombs")
    return {"data.pkl": hostile.deflate_bomb(tmp, "/data.pkl", 1 << 30),
            "byteorder": hostile.deflate_bomb(tmp, "/byteorder", 1 << 30),
            "bzip2": hostile.bzip2_member(tmp)}


@pytest.mark.parametrize("which", ["data.pkl", "byteorder", "bzip2"])
def test_zip_bombs_are_refused_before_inflating(bombs: dict[str, Path], which: str) -> None:
    path = bombs[which]
    before = path.read_bytes()
    result = _run_measured(_OPEN_REFUSED.format(path=str(path)))
    assert result["refused"], result
    assert result["open_seconds"] < 1 and result["peak_mb"] < 200 + _import_baseline_mb(), result
    assert "\n" not in result["message"] and "Error:" not in result["message"]
    assert path.read_bytes() == before


_BASELINE: list[float] = []


def _import_baseline_mb() -> float:
    """Peak RSS of a process that only imports ckptview (torch included): the bombs' budget is on top."""
    if not _BASELINE:
        _BASELINE.append(_run_measured("import ckptview\nresult = {}")["peak_mb"])
    return _BASELINE[0]


def test_a_tar_header_bomb_is_not_read_whole(tmp_path: Path) -> None:
    # tarfile reads a pax header whole: one claiming 1 GB must not be read to say what the tar is
    path = hostile.tar_header_bomb(tmp_path)
    result = _run_measured(_OPEN_REFUSED.format(path=str(path)))
    assert result["refused"] and "tar archive" in result["message"], result
    assert result["peak_mb"] < 100 + _import_baseline_mb(), result
    assert cli_main(["scan", str(path)]) == 3  # torch would read it and go on: what follows is unknown


def test_overlapping_view_statistics_stay_bounded(tmp_path: Path) -> None:
    path = hostile.overlapping_view(tmp_path)
    code = (f"import ckptview\nckpt = ckptview.open({str(path)!r})\n"
            "report = ckptview.stats(ckpt)\n"
            "(row,) = report.tensors\nresult = {'skipped': row.skipped}\n"
            f"diff = ckptview.diff({str(path)!r}, {str(path)!r}, values=True)\n"
            "result['diffed'] = len(diff.values.tensors)")
    result = _run_measured(code)
    assert result["peak_mb"] < 200 + _import_baseline_mb() and result["seconds"] < 20, result
    assert "view" in result["skipped"]


@pytest.mark.parametrize(("kind", "depth"), [("list", 100_000), ("tuple", 50_000)])
def test_deep_nesting_costs_linear_time(tmp_path: Path, kind: str, depth: int, capsys: pytest.CaptureFixture[str]) -> None:
    path = hostile.nested(tmp_path, depth, kind)
    start = time.perf_counter()
    for command in ("info", "tensors", "tree", "scan"):
        assert cli_main([command, str(path)]) == 0, command
    assert time.perf_counter() - start < 4.0
    capsys.readouterr()


def test_deep_nesting_info_under_a_second(tmp_path: Path) -> None:
    path = hostile.nested(tmp_path, 100_000, "list")
    import ckptview.cli.inspect  # noqa: F401 - import cost outside the timed part

    start = time.perf_counter()
    with ckptview.open(path) as ckpt:
        from ckptview.cli.inspect import info_data

        data = info_data(ckpt)
    assert time.perf_counter() - start < 1.0
    assert data["tensor_count"] == 1


def _header_variants() -> dict[str, dict[str, object]]:
    """A valid header (16 data bytes) and one change each: what a damaged or crafted file may hold."""
    def valid() -> dict[str, object]:
        return {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F16", "shape": [1, 3], "data_offsets": [8, 14]},
                "c": {"dtype": "BF16", "shape": [], "data_offsets": [14, 16]},
                "e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [16, 16]}}
    changes: dict[str, tuple[str, str, object]] = {
        "overlap": ("b", "data_offsets", [6, 12]), "past the data": ("c", "data_offsets", [15, 17]),
        "reversed offsets": ("a", "data_offsets", [8, 0]), "negative offset": ("a", "data_offsets", [-8, 0]),
        "huge offsets": ("a", "data_offsets", [2**70, 2**70 + 8]), "three offsets": ("a", "data_offsets", [0, 4, 8]),
        "offsets as text": ("a", "data_offsets", "08"), "offsets as object": ("a", "data_offsets", {"0": 8}),
        "float offset": ("a", "data_offsets", [0.0, 8]), "size mismatch": ("a", "shape", [3]),
        "negative dim": ("b", "shape", [-1, -6]), "float dim": ("a", "shape", [2.0]), "shape as text": ("a", "shape", "2"),
        "shape as object": ("a", "shape", {"2": 1}), "shape as number": ("a", "shape", 2), "bool dims": ("a", "shape", [True, 2]),
        "huge dims": ("a", "shape", [2**62, 2**62]), "unknown dtype": ("a", "dtype", "F33"), "dtype list": ("a", "dtype", ["F32"]),
        "dtype object": ("a", "dtype", {"F32": 1}), "dtype number": ("a", "dtype", 4), "dtype null": ("a", "dtype", None),
        "dtype lower case": ("a", "dtype", "f32"), "empty tensor past the data": ("e", "data_offsets", [99, 99]),
        "empty tensor inside another": ("e", "data_offsets", [4, 4]),
    }
    variants = {"valid": valid(), "no tensors": {"__metadata__": {"format": "pt"}}, "empty": {}}
    for label, (name, field, value) in changes.items():
        header = valid()
        header[name] = dict(header[name], **{field: value})  # type: ignore[arg-type]
        variants[label] = header
    for label, spec in {"spec list": [1], "spec text": "F32", "spec null": None, "spec number": 3}.items():
        variants[label] = dict(valid(), b=spec)
    # three offsets and one: flattened, they read as the valid header's pairs
    variants["offsets of three and of one"] = dict(valid(), a=dict(valid()["a"], data_offsets=[0, 8, 8]),  # type: ignore[arg-type]
                                                   b=dict(valid()["b"], data_offsets=[14]))  # type: ignore[arg-type]
    variants["missing dtype"] = dict(valid(), b={"shape": [1, 3], "data_offsets": [8, 14]})
    variants["missing offsets"] = dict(valid(), b={"dtype": "F16", "shape": [1, 3]})
    return variants


@pytest.mark.parametrize(("label", "header"), _header_variants().items())
def test_bulk_header_check_accepts_only_what_the_one_by_one_check_accepts(label: str, header: dict[str, object]) -> None:
    # a million-tensor header is checked a column at a time; the per-tensor check stays the authority
    from ckptview.readers.safetensors_file import _valid_in_bulk, _valid_one_by_one

    bulk = _valid_in_bulk(header, 16)
    try:
        one_by_one = _valid_one_by_one("x.safetensors", header, 8, 8 + 16)
    except CorruptCheckpointError:
        assert bulk is None, label
        return
    if bulk is not None:
        assert list(bulk.names) == list(one_by_one), label
        assert list(zip(bulk.dtypes, map(tuple, bulk.shapes), bulk.begins, bulk.ends)) == list(one_by_one.values()), label


# --- 5. every failure is ours -----------------------------------------------------------------------

def _safetensors_with_header(path: Path, header: object) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    return path


def raw_traceback_cases(tmp: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {}
    device = (b"\x80\x02}" + hostile.text("d") + hostile.global_op("torch", "device") + hostile.text("cudaxx:zz")
              + b"\x85Rs.")
    cases["bogus device"] = hostile.zip_with_data_pkl(tmp / "device.pt", device, {})
    members = hostile.zip_members(hostile.saved_zip({"w": torch.ones(2)}))
    encrypted = hostile.write_zip(tmp / "encrypted.pt", members)
    data = bytearray(encrypted.read_bytes())
    for offset in _central_entries(bytes(data)):
        data[offset + 8] |= 1  # general-purpose flag bit 0: encrypted
    encrypted.write_bytes(bytes(data))
    cases["encrypted member"] = encrypted
    cases["dtype list"] = _safetensors_with_header(tmp / "dtype-list.safetensors",
                                                   {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}})
    cases["dtype dict"] = _safetensors_with_header(tmp / "dtype-dict.safetensors",
                                                   {"w": {"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]}})
    nested = tmp / "nested.safetensors"
    raw = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    nested.write_bytes(struct.pack("<Q", len(raw)) + raw)
    cases["deep json metadata"] = nested
    for dtype_ops, label in ((b"K\x07", "meta dtype int"), (hostile.text("float32"), "meta dtype string")):
        meta = (b"\x80\x02}" + hostile.text("m") + hostile.global_op("torch._utils", "_rebuild_meta_tensor_no_storage")
                + b"(" + dtype_ops + b"K\x02\x85K\x01\x85\x89tRs.")
        cases[label] = hostile.zip_with_data_pkl(tmp / f"{label.replace(' ', '-')}.pt", meta, {})
    parts = hostile.legacy_pickles(hostile.saved_legacy({"w": torch.arange(4.0)}))
    cases["legacy view offsets"] = tmp / "legacy-view.pt"
    cases["legacy view offsets"].write_bytes(b"".join(parts[:3] + [_legacy_view(parts[3])] + parts[4:]))
    return cases


def _central_entries(data: bytes) -> list[int]:
    offsets, start = [], 0
    while (found := data.find(b"PK\x01\x02", start)) >= 0:
        offsets.append(found)
        start = found + 4
    return offsets


def _legacy_view(data_pickle: bytes) -> bytes:
    """The data pickle with its storage reference given a view (key, offset, size) far past the storage."""
    marker = b"X\x03\x00\x00\x00cpu"  # the location string, just before numel in ('storage', type, key, 'cpu', numel, None)
    at = data_pickle.find(marker)
    assert at > 0
    numel_end = at + len(marker)
    numel_end += {b"q": 2, b"r": 5}.get(data_pickle[numel_end:numel_end + 1], 0)  # BINPUT / LONG_BINPUT
    numel_end += {b"K": 2, b"M": 3, b"J": 5}[data_pickle[numel_end:numel_end + 1]]
    view = b"(" + hostile.text("0") + b"\x8a\x08" + struct.pack("<q", 2**62) + b"K\x04t"
    rest = data_pickle[numel_end:]
    assert rest[:1] == b"N"
    return data_pickle[:numel_end] + view + rest[1:]


def test_each_failure_is_one_line_in_our_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for label, path in raw_traceback_cases(tmp_path).items():
        before = path.read_bytes()
        with pytest.raises(CkptviewError) as caught:
            ckptview.open(path)
        message = str(caught.value)
        assert "\n" not in message, label
        for library_text in ("UnpicklingError:", "MemoryError", "RuntimeError", "TypeError:", "Traceback"):
            assert library_text not in message, (label, message)
        assert cli_main(["info", str(path)]) == 1, label
        assert path.read_bytes() == before


# --- 6. terminal and message injection -------------------------------------------------------------

def test_ansi_names_and_newline_paths_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ansi.safetensors"
    save_file({"\x1b[2J\x1b[Hfake.weight\nok 0 problems": torch.ones(2)}, path)
    for command in (["tensors"], ["tree"], ["info"], ["stats"]):
        assert cli_main([*command, str(path)]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\nok 0 problems" not in out, command
        assert command == ["info"] or "\\x1b[2J" in out, command
    odd = tmp_path / "line\nbreak.pt"
    odd.write_bytes(b"not a checkpoint")
    assert cli_main(["info", str(odd)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line\\nbreak.pt" in err


def test_the_cli_stdout_escapes_what_a_command_forgot_to() -> None:
    # the last line of defence: whatever a command writes, a control character reaches the terminal escaped
    import io

    from ckptview.cli import _TerminalSafe

    for text in ("a\x1b[2Jb\tc\n", "\u00e9\x1b[2J\x7f\n", "plain\n"):  # ASCII, non-ASCII, clean
        stream = io.StringIO()
        _TerminalSafe(stream).write(text)
        written = stream.getvalue()
        assert "\x1b" not in written and "\x7f" not in written and written.endswith("\n"), text
        assert text == "plain\n" or "\\x1b" in written, written


# --- found by the fuzzer -----------------------------------------------------------------------------

def test_statistics_of_subnormal_values(tmp_path: Path) -> None:
    # the blocks' centred sums left m2 a rounding residue below zero: sqrt raised a bare ValueError
    path = tmp_path / "subnormal.safetensors"
    save_file({"a": torch.tensor([6.794756e-41, 0.0, 0.0, 0.0]), "b": torch.tensor([0.0, 2.27795e-41, 2.27795e-41,
                                                                                   2.27795e-41])}, path)
    with ckptview.open(path) as ckpt:
        report = ckptview.stats(ckpt, progress=False)
    assert all(row.std >= 0 for row in report.tensors)


@pytest.mark.parametrize("length", [0x00630280, 0x6328], ids=["proto-global", "mark-global-no-proto"])
def test_safetensors_that_also_reads_as_a_pickle(tmp_path: Path, length: int) -> None:
    """A valid safetensors file whose header length starts 0x80 0x02 'c' (PROTO, GLOBAL) or '(' 'c'
    (MARK, GLOBAL: no PROTO, as protocols 0 and 1 write): torch.load on a file not named .safetensors
    unpickles it and looks the global up. scan names it."""
    entry = b'{\n"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}\n'
    header = entry + b" " * (length - len(entry) - 1) + b"}"
    path = tmp_path / "polyglot.pt"
    path.write_bytes(struct.pack("<Q", length) + header + struct.pack("<f", 1.5))
    with ckptview.open(path) as ckpt:
        assert ckpt.format == "safetensors" and [e.name for e in ckpt.tensors()] == ["w"]
        assert ckpt.needs_trust and ckpt.details["imports_when_read_as_pickle"]
    assert assert_scan_covers_torch(path) == "code"
    assert cli_main(["scan", str(path)]) == 3


def test_refused_files_leave_no_descriptor_open(tmp_path: Path) -> None:
    # found by the fuzzer: each refused file kept its descriptor, and after ~20,000 a kernel could open nothing
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 20) + b'{"a": 1, "b": [1] }' + b"x")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(hostile.saved_zip({"w": torch.ones(3)})[:-30])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        for path in (bad, cut):
            with pytest.raises(CkptviewError):
                ckptview.open(path)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


# --- memo-index bombs: a 5-byte LONG_BINPUT made the C unpickler allocate twice its index in pointers ----------

FINDINGS = Path(__file__).resolve().parent / "fuzz_findings"


def _memo_bomb_pickle(opcode: bytes, before: bytes = b"") -> bytes:
    # an honest pickle up to a value that is then memoized at index 1,378,644,401 (a 22 GB memo)
    index = 1_378_644_401
    put = b"r" + struct.pack("<I", index) if opcode == b"r" else b"p" + str(index).encode() + b"\n"
    return b"\x80\x02" + before + hostile.body({"w": [1, 2]}) + put + b"."


@pytest.mark.parametrize("name", ["legacy-memo-index-bomb.pt", "legacy-memo-index-bomb-22gb.pt", "zip", "put"])
def test_memo_index_bomb_refused_before_it_allocates(tmp_path: Path, name: str) -> None:
    if name == "zip":
        path = hostile.zip_with_data_pkl(tmp_path / "bomb.pt", _memo_bomb_pickle(b"r"), {})
    elif name == "put":
        path = tmp_path / "bomb.pkl"
        path.write_bytes(_memo_bomb_pickle(b"p"))
    else:
        path = FINDINGS / name
    before = path.read_bytes()
    result = _run_measured(_OPEN_REFUSED.format(path=str(path)))
    assert result["refused"] and result["peak_mb"] < 200 + _import_baseline_mb(), result
    assert "memo index of" in result["message"] and "\n" not in result["message"]
    assert path.read_bytes() == before


def test_globals_named_before_a_memo_bomb_still_count(tmp_path: Path) -> None:
    # torch.load imports os.system on meeting its opcode, before it reaches the index
    path = tmp_path / "bomb.pkl"
    path.write_bytes(_memo_bomb_pickle(b"r", before=hostile.call_and_drop(hostile.global_op("os", "system"), "true")))
    with pytest.raises(CorruptCheckpointError, match="memo index") as refused:
        ckptview.open(path)
    assert [imported.name for imported in refused.value.named_globals] == ["os.system"]
    assert cli_main(["scan", str(path)]) != 0


def test_globals_named_in_a_frame_before_a_memo_bomb_still_count(tmp_path: Path) -> None:
    # the bomb sits inside a frame: the unpickler is handed the bytes up to it without their FRAME
    # opcode, so it still meets the global torch.load imports before the index (cut inside the frame,
    # the frame itself would fail to read and the global would go unnamed)
    inner = _memo_bomb_pickle(b"r", before=hostile.call_and_drop(hostile.global_op("os", "system"), "true"))[2:]
    path = tmp_path / "framed-bomb.pkl"
    path.write_bytes(b"\x80\x04\x95" + struct.pack("<Q", len(inner)) + inner)
    with pytest.raises(CorruptCheckpointError, match="memo index") as refused:
        ckptview.open(path)
    assert [imported.name for imported in refused.value.named_globals] == ["os.system"]


def test_a_frame_ending_inside_a_global_is_refused() -> None:
    # a fuzz finding: FRAME's length ends inside "torch._utils\n". torch.load, reading data.pkl from a
    # BytesIO, looks up ch._utils._rebuild_tensor_v2; a stream that can peek reads torch._utils. No
    # pickler splits an opcode across a frame, so ckptview refuses the file rather than pick a reading,
    # and counts "anything" among what it would import.
    path = FINDINGS / "zip-frame-global-read-as-torch-reads-it.pt"
    with pytest.raises(CorruptCheckpointError, match="split across the end of a frame") as refused:
        ckptview.open(path)
    assert UNKNOWN_IMPORTS in [imported.name for imported in refused.value.named_globals]
    assert cli_main(["scan", str(path)]) == 3  # refused, but what torch.load would import is not known
