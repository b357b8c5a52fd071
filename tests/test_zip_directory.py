"""The torch archive's zip directory reader against Python's zipfile, on archives torch and zipfile write."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from ckptview.readers.model import FileSource
from ckptview.readers.zip_directory import BadZip, NoEndRecord, data_offset, read_directory, read_member


def _members(path: Path) -> list[tuple[str, int, int, int, int]]:
    return [(m.name, m.header_offset, m.compress_type, m.file_size, m.crc)
            for m in read_directory(FileSource(path).read, path.stat().st_size)]


def _zipfile_members(path: Path) -> list[tuple[str, int, int, int, int]]:
    with zipfile.ZipFile(path) as archive:
        return [(i.filename, i.header_offset, i.compress_type, i.file_size, i.CRC) for i in archive.infolist()]


def test_torch_save_archive_reads_as_zipfile_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({f"w{i}": torch.randn(3) for i in range(50)}, path)
    members = _members(path)
    assert members == _zipfile_members(path)
    data_pkl = read_directory(FileSource(path).read, path.stat().st_size)[0]
    with zipfile.ZipFile(path) as archive:
        assert read_member(FileSource(path).read, data_pkl) == archive.read(data_pkl.name)


def test_zip64_directory_of_more_than_65535_members(tmp_path: Path) -> None:
    # past 65,535 members the entry count only fits the ZIP64 end record, as in a torch file that large
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(70_000):
            archive.writestr(f"archive/data/{index}", b"")
    members = _members(path)
    assert len(members) == 70_000
    assert members == _zipfile_members(path)


def test_bytes_prepended_to_the_archive_shift_offsets_as_in_zipfile(tmp_path: Path) -> None:
    plain = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, plain)
    shifted = tmp_path / "shifted.pt"
    shifted.write_bytes(b"#!stub\n" * 100 + plain.read_bytes())
    assert _members(shifted) == _zipfile_members(shifted)
    assert _members(shifted)[0][1] == 700


def test_deflated_member_and_damaged_checksum(tmp_path: Path) -> None:
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"x" * 10_000)
    source = FileSource(path)
    (member,) = read_directory(source.read, path.stat().st_size)
    assert read_member(source.read, member) == b"x" * 10_000
    with pytest.raises(BadZip, match="checksum"):
        read_member(source.read, member._replace(crc=member.crc ^ 1))


def test_cut_off_archive_and_nul_in_a_name(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) - 30])
    with pytest.raises(NoEndRecord):
        read_directory(FileSource(cut).read, cut.stat().st_size)
    # zipfile cuts "archive/data.pkl\0x" at the NUL, torch's reader does not: refused, not guessed
    named = tmp_path / "nul.zip"
    with zipfile.ZipFile(named, "w") as archive:
        archive.writestr("archive/data.pklXx", b"")
    named.write_bytes(named.read_bytes().replace(b"data.pklXx", b"data.pkl\0x"))
    with pytest.raises(BadZip, match="NUL"):
        read_directory(FileSource(named).read, named.stat().st_size)


def test_data_offset_of_names_in_every_encoding_and_a_local_header_naming_another(tmp_path: Path) -> None:
    path = tmp_path / "names.zip"
    names = ["a/data/0", "a/données/é" * 3, "a/模型/权重", "a/" + "x" * 300]
    with zipfile.ZipFile(path, "w") as archive:
        for number, name in enumerate(names):
            archive.writestr(name, bytes([number]) * (number + 5))
    source = FileSource(path)
    with zipfile.ZipFile(path) as archive:
        for member in read_directory(source.read, path.stat().st_size):
            start = data_offset(source.read, member.name, member.header_offset)
            assert source.read(start, member.file_size) == archive.read(member.name)
    # the directory says "a/data/0"; a local header that says "a/data/00" (one byte longer) is another member
    data = bytearray(path.read_bytes())
    first = read_directory(source.read, len(data))[0]
    local = bytes(data).replace(b"a/data/0", b"a/data/00", 1)  # shifts the rest; only the first header is read
    forged = tmp_path / "forged.zip"
    forged.write_bytes(local[:first.header_offset + 26] + (9).to_bytes(2, "little") + local[first.header_offset + 28:])
    with pytest.raises(BadZip, match="disagrees"):
        data_offset(FileSource(forged).read, first.name, first.header_offset)


def _nest_second_member(path: Path, second: str) -> None:
    """Point member `second`'s directory entry into the data of the member before it, as an overlapping
    ("quoted overlap") zip bomb does: its bytes are read again through the second name."""
    import struct

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    index = [info.filename for info in infos].index(second)
    before = infos[index - 1]
    entry = data.rindex(second.encode()) - 46  # the central directory's entry: its name starts 46 bytes in
    assert data[entry:entry + 4] == b"PK\x01\x02"
    data[entry + 42:entry + 46] = struct.pack("<L", before.header_offset + 30 + len(before.filename))
    path.write_bytes(bytes(data))


def test_members_overlapping_one_another_are_refused(tmp_path: Path) -> None:
    """Zip writers lay members one after another; members nested in one another make every reader read
    the shared bytes once per member (ten thousand tensors over one 100 MB range: a terabyte for
    statistics; deflated, the classic overlapping zip bomb). Refused from the directory alone, in a
    torch archive and in an .npz."""
    import numpy as np

    import ckptview
    from ckptview.errors import CorruptCheckpointError

    torch_file = tmp_path / "nested.pt"
    torch.save({"a": torch.ones(64), "b": torch.zeros(64)}, torch_file)
    with zipfile.ZipFile(torch_file) as archive:
        storages = [name for name in archive.namelist() if "/data/" in name]
    _nest_second_member(torch_file, storages[1])
    with pytest.raises(CorruptCheckpointError, match="the archive's members .* overlap: zip writers lay members"):
        ckptview.open(torch_file)

    npz = tmp_path / "nested.npz"
    np.savez_compressed(npz, a=np.ones(4096), b=np.zeros(4096))
    _nest_second_member(npz, "b.npy")
    with pytest.raises(CorruptCheckpointError, match="the .npz's members a.npy and b.npy overlap"):
        ckptview.open(npz)
