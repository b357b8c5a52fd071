"""
Every file torch.load would unpickle is read as the pickle it is: torch.load unpickles any file that
is not a zip or tar archive, and a pickle needs no PROTO opcode (protocols 0 and 1 write none; a
protocol-0 pickle is plain text). Checked against what torch.load itself looks up (tests/torch_oracle.py); a safetensors file that
also reads as such a pickle is in tests/test_hostile_round2.py.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptview
from ckptview.cli import main as cli_main
from ckptview.errors import CorruptCheckpointError, UnsupportedFormatError

from test_hostile_round2 import assert_scan_covers_torch, scan_verdict


class _RunsCommand:
    """Pickled as `os.system(command)`, as a malicious file would be."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2)).state_dict()


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_every_pickle_protocol_lists_as_torch_loads_it(tmp_path: Path, protocol: int, container: str) -> None:
    # protocol 1 writes no PROTO opcode: its legacy file starts "L1195..." (the magic number as text)
    path = tmp_path / f"p{protocol}.pt"
    torch.save(_state_dict(), path, pickle_protocol=protocol, _use_new_zipfile_serialization=container == "zip")
    expected = torch.load(path, weights_only=False)
    with ckptview.open(path) as ckpt:
        assert ckpt.format == ("torch-zip" if container == "zip" else "torch-legacy")
        listed = {entry.name: entry for entry in ckpt.tensors()}
        assert list(listed) == list(expected)
        for name, tensor in expected.items():
            assert listed[name].shape == tuple(tensor.shape) and listed[name].dtype == tensor.dtype
            assert torch.equal(listed[name].load(), tensor)
    assert cli_main(["scan", str(path)]) == 0


def test_protocol_0_storage_references_are_explained(tmp_path: Path) -> None:
    # protocol 0 writes a persistent id as its repr: torch.load itself cannot read the file back
    path = tmp_path / "p0.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=0, _use_new_zipfile_serialization=False)
    with pytest.raises(AssertionError):
        torch.load(path, weights_only=False)
    with pytest.raises(CorruptCheckpointError, match="pickle_protocol=0"):
        ckptview.open(path)


@pytest.mark.parametrize("make", [
    lambda marker: f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),
    lambda marker: pickle.dumps({"w": _RunsCommand(f"touch {marker}")}, protocol=0),
    lambda marker: pickle.dumps({"w": _RunsCommand(f"touch {marker}")}, protocol=1),
], ids=["handwritten-text", "protocol-0", "protocol-1"])
def test_pickles_without_a_proto_opcode_are_scanned(tmp_path: Path, make) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(make(marker))
    assert path.read_bytes()[:1] != b"\x80"
    assert assert_scan_covers_torch(path) == "code"
    assert scan_verdict(path)[1] & {"os.system", "posix.system"}
    assert cli_main(["scan", str(path)]) == 3
    assert not marker.exists()


@pytest.mark.parametrize("text", [
    b"# Model card\n\nWeights for a small CNN.\n",
    b"import torch\nimport os\n\nprint(torch.__version__)\n",
    b"name,shape\nfc.weight,3x4\n",
    b"abc",
    b"model_checkpoint_paths: x\n",
], ids=["markdown", "python", "csv", "short", "yaml-ish"])
def test_text_files_are_not_taken_for_pickles(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(text)
    with pytest.raises(UnsupportedFormatError, match="not a checkpoint"):
        ckptview.open(path)


def test_a_damaged_pickle_names_what_it_imports_before_the_damage(tmp_path: Path, capsys) -> None:
    # torch.load imports os.system and calls it (REDUCE) before it meets the byte that is no opcode
    marker = tmp_path / "ran"
    path = tmp_path / "damaged.pt"
    path.write_bytes(f"\x80\x02cos\nsystem\n(S'touch {marker}'\ntR\xff".encode("latin-1"))
    with pytest.raises(CorruptCheckpointError, match="Before the damage it names os.system") as refused:
        ckptview.open(path)
    assert [imp.name for imp in refused.value.named_globals] == ["os.system"]
    assert assert_scan_covers_torch(path) == "code"  # what scan exits 3 for

    capsys.readouterr()
    assert cli_main(["scan", str(path)]) == 3
    assert "os.system" in capsys.readouterr().out
    assert cli_main(["scan", "--json", str(path)]) == 3
    record = json.loads(capsys.readouterr().out)
    assert record["needs_code"] is True and record["imports"] == [{"name": "os.system", "count": 1}]

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert cli_main(["scan", str(good), str(path)]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"{path}: NEEDS CODE: refused, but its loader would import os.system")
    assert cli_main(["info", str(path)]) == 1
    assert not marker.exists()


def test_gguf_files_pay_no_pickle_scan(tmp_path: Path) -> None:
    # 'G' (GGUF's magic) is BINFLOAT: the reading stops at the tensor count's next byte, no opcode
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("t", np.ones((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with ckptview.open(path) as ckpt:
        assert not ckpt.pickle_imports and "imports_when_read_as_pickle" not in ckpt.details
    assert assert_scan_covers_torch(path) == "safe"


_BOMB_CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # without the guard: a MemoryError, not a dead machine
import ckptview
from ckptview.errors import CkptviewError
try:
    ckptview.open(sys.argv[1])
    message = ""
except CkptviewError as exc:
    message = str(exc)
print(json.dumps({"message": message, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_a_memory_bomb_is_stopped_within_its_limit(tmp_path: Path) -> None:
    # each EMPTY_SET byte makes a 216-byte set: 12 MB of them would take 2.7 GB
    path = tmp_path / "bomb.pt"
    path.write_bytes(b"\x80\x02" + b"\x8f" * 12_000_000 + b".")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(path)], capture_output=True, text=True, timeout=120)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert "memory bomb" in answer["message"]
    assert answer["peak_kb"] < 1.6 * 2**20  # the 1 GiB floor, one 128 KiB refill (28 MB) and the interpreter
