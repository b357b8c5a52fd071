"""NumPy .npy and .npz files written by numpy.save / savez / savez_compressed, read by ckptview."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptview
from ckptview.errors import CkptviewError, CorruptCheckpointError, TensorDataError
from format_checks import check_every_command, check_every_tab, cli


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "weight": rng.standard_normal((64, 32)).astype(np.float32),
        "half": rng.standard_normal(100).astype(np.float16),
        "ids": np.arange(50, dtype=np.int64),
        "big_endian": np.arange(12, dtype=">f8").reshape(3, 4),
        "fortran": np.asfortranarray(rng.standard_normal((5, 7))),
        "flags": rng.random(9) > 0.5,
        "long": rng.standard_normal(70_000).astype(np.float32),
        "objects": np.array([{"a": 1}, None, "text"], dtype=object),
        "words": np.array(["ab", "c"]),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("numpy")
    data = arrays()
    np.save(folder / "weight.npy", data["weight"])
    np.save(folder / "fortran.npy", data["fortran"])
    np.save(folder / "objects.npy", data["objects"], allow_pickle=True)
    np.savez(folder / "stored.npz", **data)
    np.savez_compressed(folder / "deflated.npz", **data)
    return {name: folder / name for name in ("weight.npy", "fortran.npy", "objects.npy", "stored.npz", "deflated.npz")}


def expected_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("=")))


@pytest.mark.parametrize("name", ["stored.npz", "deflated.npz"])
def test_npz_names_shapes_dtypes_and_values_equal_numpy(files: dict[str, Path], name: str) -> None:
    with np.load(files[name], allow_pickle=False) as reference, ckptview.open(files[name]) as ckpt:
        assert ckpt.format == "npz"
        assert [e.name for e in ckpt.tensors()] == reference.files
        for key in reference.files:
            entry = ckpt.tensor(key)
            if key in ("objects", "words"):
                continue
            array = reference[key]
            assert entry.shape == array.shape
            assert entry.dtype == expected_tensor(array).dtype
            assert entry.layout == ("encoded" if name == "deflated.npz" else "strided")
            assert torch.equal(entry.load(), expected_tensor(array)), key
            # 1000-byte chunks split float64 and float32 elements' runs mid-read of the inflater
            assert torch.equal(torch.cat(list(entry.iter_chunks(1000))), expected_tensor(array).reshape(-1)), key


def test_deflated_members_stream_with_bounded_memory(files: dict[str, Path]) -> None:
    with ckptview.open(files["deflated.npz"]) as ckpt:
        entry = ckpt.tensor("long")
        assert entry.encoding == "deflate" and entry.nbytes < 70_000 * 4
        tracemalloc.start()
        try:
            count = sum(chunk.numel() for chunk in entry.iter_chunks(4096))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert count == 70_000 and peak < 3 << 20  # the member inflates to 280 KB; chunks of 4 KB and 1 MB reads


def test_npy_files_are_read_in_place(files: dict[str, Path]) -> None:
    for name in ("weight.npy", "fortran.npy"):
        array = np.load(files[name])
        with ckptview.open(files[name]) as ckpt:
            (entry,) = ckpt.tensors()
            assert ckpt.format == "npy" and entry.layout == "strided"
            assert entry.shape == array.shape and entry.info.storage is not None
            assert torch.equal(entry.load(), torch.from_numpy(array))
            assert ckpt.details["fortran_order"] == (name == "fortran.npy")


@pytest.mark.parametrize("name", ["objects.npy", "stored.npz", "deflated.npz"])
def test_object_arrays_are_listed_and_never_unpickled(files: dict[str, Path], name: str) -> None:
    with ckptview.open(files[name]) as ckpt:
        entry = ckpt.tensors()[0] if name.endswith(".npy") else ckpt.tensor("objects")
        assert entry.encoding == "object" and entry.shape == (3,)
        row = next(r for r in ckptview.tensor_table(ckpt).rows if r.name == entry.name)
        assert row.encoding == "object"
        with pytest.raises(TensorDataError, match="pickled Python objects.*can run any code"):
            entry.load()
        assert ckptview.stats(ckpt, progress=False)[entry.name].skipped
        if name.endswith(".npz"):
            assert ckpt.tensor("words").encoding == "<U2"


class RunsCode:
    """Unpickling it calls os.system, as a hostile object array would."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, ("echo unpickled",)


@pytest.mark.parametrize("writer", ["npy", "npz", "npz-compressed"])
def test_an_object_array_that_runs_code_when_unpickled_needs_code(tmp_path: Path, writer: str) -> None:
    """numpy.load(allow_pickle=True) unpickles an object array: what its pickle imports is named, never run."""
    array = np.array([RunsCode(), 1.5], dtype=object)
    path = tmp_path / ("evil.npy" if writer == "npy" else "evil.npz")
    if writer == "npy":
        np.save(path, array, allow_pickle=True)
    else:
        (np.savez if writer == "npz" else np.savez_compressed)(path, weight=np.ones(3, np.float32), evil=array)
    with ckptview.open(path) as ckpt:
        assert [imp.name for imp in ckpt.pickle_imports] in (["posix.system"], ["nt.system"])
        assert ckpt.needs_trust and "allow_pickle=True" in ckpt.details["allow_pickle"]
    code, out, _ = cli("scan", str(path))
    assert code == 3 and "system" in out and "numpy.load(allow_pickle=True) would import" in out
    code, out, _ = cli("scan", "--json", str(path))
    record = json.loads(out)
    assert code == 3 and record["needs_code"] is True and record["allow_pickle"] is True


def test_an_object_array_of_plain_data_needs_no_code_but_allow_pickle(files: dict[str, Path]) -> None:
    for name in ("objects.npy", "deflated.npz"):
        code, out, _ = cli("scan", str(files[name]))
        assert code == 0 and "needs no foreign code" in out and "allow_pickle=True" in out, out
    code, out, _ = cli("scan", "--json", str(files["weight.npy"]))
    assert code == 0 and json.loads(out)["allow_pickle"] is False


def test_a_damaged_object_array_pickle_is_never_called_safe(tmp_path: Path) -> None:
    """numpy imports what the pickle names before the damage: scan says so, and does not exit 0."""
    path = tmp_path / "damaged.npy"
    # numpy pickles with protocol 4: the global sits in the first 64 KiB frame, the cut in a later one
    np.save(path, np.array([RunsCode()] + [float(i) for i in range(20_000)], dtype=object), allow_pickle=True)
    content = path.read_bytes()
    path.write_bytes(content[:-1000])
    code, out, err = cli("scan", str(path))
    assert code == 3 and "system" in out
    assert err.count("\n") == 1 and "numpy.load(allow_pickle=True) would import" in err and "torch" not in err


def test_every_command_and_tab_runs(files: dict[str, Path]) -> None:
    for name in ("weight.npy", "deflated.npz"):
        info = check_every_command(files[name])
        assert info["format"] == name.rsplit(".", 1)[1]
        check_every_tab(files[name])
    assert {m["name"]: m["compression"] for m in info["details"]["members"]}["long"] == "deflated"


def test_npy_header_claiming_2_60_elements_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.npy"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1152921504606846976,), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    content = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64)
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match="claims shape \\[1152921504606846976\\]") as caught:
        ckptview.open(path)
    assert "\n" not in str(caught.value)
    code, _, err = cli("info", str(path))
    assert code == 1 and err.count("\n") == 1
    assert path.read_bytes() == content


def _deflated_member(name: str, payload: bytes, declared: int | None = None) -> bytes:
    """A one-member zip whose member is `payload` deflated; its directory may declare another size."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = compressor.compress(payload) + compressor.flush()
    size = len(payload) if declared is None else declared
    crc = zlib.crc32(payload)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), size, len(name), 0)
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(data), size,
                          len(name), 0, 0, 0, 0, 0, 0)
    body = local + name.encode() + data
    directory = central + name.encode()
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(body), 0)
    return body + directory + end


def _npy_bytes(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


def test_npz_zip_bomb_member_is_refused_at_open(tmp_path: Path) -> None:
    # 1 GiB of zeros behind a header for as many float32s: deflate packs it ~1000:1, the directory
    # is told a size far past that ratio
    path = tmp_path / "bomb.npz"
    payload = _npy_bytes((1 << 28,)) + bytes(1 << 20)
    content = _deflated_member("w.npy", payload, declared=(1 << 30) + len(payload))
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="more than deflate can produce") as caught:
            ckptview.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(caught.value) and peak < 16 << 20
    code, _, err = cli("info", str(path))
    assert code == 1 and err.count("\n") == 1 and path.read_bytes() == content


def test_npz_member_inflating_past_its_declared_size_stops(tmp_path: Path) -> None:
    # the directory says 4,096 float32s; the member holds 300,000 (within deflate's ratio of its size)
    path = tmp_path / "liar.npz"
    header = _npy_bytes((4096,))
    payload = header + np.random.default_rng(0).standard_normal(300_000).astype(np.float32).tobytes()
    path.write_bytes(_deflated_member("w.npy", payload, declared=len(header) + 4096 * 4))
    with ckptview.open(path) as ckpt:
        entry = ckpt.tensor("w")
        for read in (entry.load, lambda: list(entry.iter_chunks(1024))):
            with pytest.raises(CorruptCheckpointError, match="inflates to more than"):
                read()


def test_every_cut_of_an_npz_is_refused_or_reads_whole(files: dict[str, Path], tmp_path: Path) -> None:
    content = files["deflated.npz"].read_bytes()
    path = tmp_path / "cut.npz"
    for cut in range(100, len(content), 997):
        path.write_bytes(content[:cut])
        try:
            with ckptview.open(path) as ckpt:
                for entry in ckpt.tensors():
                    if entry.layout != "unsupported":
                        entry.load()
        except CkptviewError as exc:
            assert "\n" not in str(exc)
            continue
        with zipfile.ZipFile(path) as archive:  # only a cut that leaves a whole archive may open
            assert archive.testzip() is None


def test_scan_names_every_global_numpy_load_looks_up(tmp_path: Path) -> None:
    """The differential property against numpy itself (tests/torch_oracle.py runs numpy.load(allow_pickle=True)
    with a recording unpickler), over object arrays in .npy and .npz files, plain and cut short."""
    from test_hostile_round2 import assert_scan_covers_torch

    array = np.array([RunsCode(), {"a": np.float64(1.0)}, collections_counter()] + [float(i) for i in range(20_000)],
                     dtype=object)
    np.save(tmp_path / "evil.npy", array, allow_pickle=True)
    np.savez_compressed(tmp_path / "evil.npz", weight=np.ones(3), evil=array)
    content = (tmp_path / "evil.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(content[:-1000])
    # members compressed with bzip2 and lzma: numpy reads them (zipfile inflates both), ckptview refuses
    # the archive, and still names what its object arrays' pickles import
    for method, name in ((zipfile.ZIP_BZIP2, "bzip2.npz"), (zipfile.ZIP_LZMA, "lzma.npz")):
        with zipfile.ZipFile(tmp_path / "evil.npz") as source, \
                zipfile.ZipFile(tmp_path / name, "w", compression=method) as target:
            for member in source.namelist():
                target.writestr(member, source.read(member))
    names = ("evil.npy", "evil.npz", "cut.npy", "bzip2.npz", "lzma.npz")
    verdicts = [assert_scan_covers_torch(tmp_path / name) for name in names]
    assert verdicts == ["code"] * 5  # cut short after naming os.system: scan exits 3 too
    assert cli("scan", str(tmp_path / "bzip2.npz"))[0] == 3


def collections_counter() -> object:
    import collections

    return collections.Counter("abc")


class CrashingDtype:
    """Pickles as numpy.dtype("b1") BUILT with a state numpy never writes: numpy's own __setstate__ crashes on it."""

    def __reduce__(self) -> tuple[object, ...]:
        return np.dtype, ("b1", False, True), (3, "=", ("a",), ("a", "b"), 1, 4)


def _open_in_a_child(path: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys, ckptview\ntry:\n    ckptview.open(sys.argv[1])\nexcept Exception as e:\n    print(e)"
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.parametrize("case", ["short-object-list", "dtype-state", "dtype-state-in-torch-file"])
def test_numpy_states_that_crash_numpy_are_refused_before_numpy_reads_them(tmp_path: Path, case: str) -> None:
    """numpy's C code trusts a pickle's state: an object array whose list is shorter than its shape (a fuzz
    finding; numpy.load(allow_pickle=True) crashes on it too) and a dtype BUILT with a state numpy never
    writes each crashed the process (SIGSEGV). Opened in a child, so a regression fails instead of crashing."""
    if case == "short-object-list":
        path = Path(__file__).parent / "fuzz_findings" / "npy-object-list-shorter-than-shape.npy"
    elif case == "dtype-state":
        path = tmp_path / "dtype.pkl"
        path.write_bytes(pickle.dumps({"dtype": CrashingDtype()}, protocol=2))
    else:
        path = tmp_path / "dtype.pt"
        torch.save({"w": torch.ones(2), "dtype": CrashingDtype()}, path)
    done = _open_in_a_child(path)
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-500:]}"
    assert done.stdout.count("\n") == 1 and ("do not fill it" in done.stdout or "structured" in done.stdout), done.stdout


def test_numpy_values_in_a_torch_checkpoint_still_list(tmp_path: Path) -> None:
    """What numpy itself pickles stays readable through the checks: scalars, RNG state, big-endian and
    Fortran-ordered arrays, object and string arrays, a bare dtype."""
    values = {"best": np.float64(0.93), "flag": np.bool_(True), "rng": np.random.RandomState(0).get_state(),
              "big_endian": np.arange(6, dtype=">f4").reshape(2, 3), "fortran": np.asfortranarray(np.ones((2, 3))),
              "objects": np.array([{"a": 1}, "x"], dtype=object), "words": np.array(["ab", "c"]),
              "dtype": np.dtype("float16"), "empty": np.zeros((0, 3))}
    path = tmp_path / "numpy-values.pt"
    torch.save({"w": torch.ones(2), **values}, path)
    with ckptview.open(path) as ckpt:
        assert not ckpt.pickle_imports
        root = ckpt.root
        assert root["best"] == 0.93 and bool(root["flag"])
        # numeric arrays are tensors over their pickled bytes (tests/test_pickled_arrays.py); the others stay arrays
        state = torch.from_numpy(values["rng"][1].astype(np.int64)).to(torch.uint32)
        assert torch.equal(ckpt.tensor("rng.1").load(), state)
        for key in ("big_endian", "fortran", "empty"):
            expected = values[key]
            native = expected.astype(expected.dtype.newbyteorder("="))
            assert torch.equal(ckpt.tensor(key).load(), torch.from_numpy(native))
        for key in ("objects", "words"):
            assert np.array_equal(np.asarray(root[key]), values[key]) and root[key].dtype == values[key].dtype, key
        assert repr(root["dtype"]) == "dtype('float16')"


class CalledNdarray:
    """Pickles as a call of numpy.ndarray itself, which numpy's own pickles never make: given shape (2**31,) of
    objects, numpy would allocate and fill 16 GB."""

    def __reduce__(self) -> tuple[object, ...]:
        return np.ndarray, ((3,), "O")


def test_numpy_classes_called_by_a_pickle_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "called.pt"
    torch.save({"w": torch.ones(2), "array": CalledNdarray()}, path)
    with pytest.raises(CorruptCheckpointError, match="numpy's own pickles never do"):
        ckptview.open(path)
