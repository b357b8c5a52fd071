"""`ckptview info / tensors / scan`: the text people read and the JSON scripts rely on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptview.cli import main
from conftest import SmallCNN


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_contract(capsys: pytest.CaptureFixture[str], cnn_state_dict_path: Path, trained_cnn: SmallCNN) -> None:
    info = run_json(capsys, "info", str(cnn_state_dict_path))
    state = trained_cnn.state_dict()
    assert info["format"] == "torch-zip"
    assert info["tensor_count"] == len(state)
    assert info["parameter_count"] == sum(t.numel() for t in state.values())
    assert info["total_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert info["sections"] == [{"kind": "state_dict", "path": [], "name": "<root>", "tensor_count": len(state),
                                 "explanation": info["sections"][0]["explanation"]}]
    assert info["needs_code"] is False and info["pickle_imports"] == []


def test_tied_weights_counted_once_in_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = torch.randn(50, 8)
    path = tmp_path / "tied.pt"
    torch.save({"wte.weight": shared, "lm_head.weight": shared}, path)
    info = run_json(capsys, "info", str(path))
    assert (info["tensor_count"], info["parameter_count"], info["total_bytes"]) == (2, 400, 1600)


def test_tensors_json_matches_torch_load(capsys: pytest.CaptureFixture[str], tmp_path: Path, trained_cnn: SmallCNN) -> None:
    path = tmp_path / "model.safetensors"
    save_file(trained_cnn.state_dict(), path)
    rows = run_json(capsys, "tensors", str(path))
    state = trained_cnn.state_dict()
    assert {r["name"]: (r["shape"], r["dtype"], r["numel"], r["nbytes"]) for r in rows} == {
        name: (list(t.shape), str(t.dtype).removeprefix("torch."), t.numel(), t.numel() * t.element_size())
        for name, t in state.items()
    }


def test_tensors_json_is_what_json_writes_for_every_kind_of_record(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`tensors --json` formats its records around json's string encoder; it must read as json.dumps of each
    record would, character for character, whatever the names and tensor kinds."""
    import numpy as np

    import ckptview
    from ckptview.cli.inspect import _tensor_record, tensor_json_items
    from ckptview.readers.model import TensorEntry, TensorInfo
    from test_gguf import write_model

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    odd_names = {'quote"back\\slash': base, "tab\tnew\nline\x1b[31m": base[1], "ünïcødé.権重.🙂": base.t(),
                 "": torch.zeros(0), "7": torch.ones((), dtype=torch.bfloat16)}
    state = {**odd_names, "sparse": base.to_sparse(), "meta": torch.empty(3, 2, device="meta"),
             "quantized": torch.quantize_per_tensor(base, 0.1, 3, torch.quint8), "int8": base.to(torch.int8)}
    pt = tmp_path / "kinds.pt"
    torch.save(state, pt)
    for path in (pt, write_model(tmp_path / "model.gguf")):
        with ckptview.open(path) as ckpt:
            records = [_tensor_record(e.name, e.info) for e in ckpt.tensors()]
        assert main(["tensors", "--json", str(path)]) == 0
        out = capsys.readouterr().out
        assert out == "[\n  " + ",\n  ".join(json.dumps(record) for record in records) + "\n]\n"
        assert json.loads(out) == records
    # a record with something other than ints and strings is written by json itself
    odd = TensorEntry("x", TensorInfo(shape=(np.int64(3),), dtype="float32", storage=None))
    assert tensor_json_items([odd]) == [json.dumps(_tensor_record("x", odd.info), default=str)]


def test_tensors_table_is_aligned_with_totals(capsys: pytest.CaptureFixture[str], cnn_state_dict_path: Path) -> None:
    assert main(["tensors", str(cnn_state_dict_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rule = lines[0], lines[1]
    assert header.split() == ["name", "shape", "dtype", "params", "size"]
    fc_row = next(line for line in lines if line.startswith("fc.weight "))
    assert "[10, 8]" in fc_row and "float32" in fc_row and fc_row.rstrip().endswith("320 B")
    body = lines[2:lines.index("")]
    # the params column is right-aligned: every row ends it at the same column
    params_end = header.index("params") + len("params")
    assert all(row[:params_end].endswith(tuple("0123456789")) for row in body)
    assert len({len(row) for row in body}) == 1 and len(rule) == len(body[0])
    # totals line agrees with the column sum
    total_params = sum(int(row[:params_end].split()[-1].replace(",", "")) for row in body)
    assert lines[-1].startswith(f"{len(body):,} tensors, {total_params:,} elements")


def test_a_very_long_name_is_shortened_in_tables_and_whole_in_json(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    long_name = "block." + "x" * 5000 + ".weight"
    path = tmp_path / "long.pt"
    torch.save({long_name: torch.ones(2), "fc.bias": torch.zeros(3)}, path)
    assert main(["tensors", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) < 220 and lines[2].startswith("block.xxx") and ".weight  [2]" in lines[2]
    assert main(["tensors", "--json", str(path)]) == 0
    assert [item["name"] for item in json.loads(capsys.readouterr().out)] == [long_name, "fc.bias"]


def test_columns_line_up_in_terminal_cells_with_cjk_and_accented_names(capsys: pytest.CaptureFixture[str],
                                                                         tmp_path: Path) -> None:
    # a CJK character takes two terminal cells and a combining accent none: padded by len(), the
    # columns after such a name were shifted by one cell per character
    def display_width(text: str) -> int:
        return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) == "W" else 1 for c in text)

    path = tmp_path / "names.pt"
    torch.save({"编码器.权重": torch.ones(2), "cafe\u0301.bias": torch.zeros(3), "fc.weight": torch.ones(4)}, path)
    assert main(["tensors", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()[:5]
    shape_at = {display_width(line[:line.index("[")]) for line in lines[2:]}
    assert len(shape_at) == 1 and display_width(lines[1].split()[0]) + 2 == shape_at.pop()


def test_info_text_names_sections(capsys: pytest.CaptureFixture[str], tmp_path: Path, trained_cnn: SmallCNN) -> None:
    path = tmp_path / "train.pt"
    optimizer = torch.optim.SGD(trained_cnn.parameters(), lr=0.1)
    torch.save({"model_state_dict": trained_cnn.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "epoch": 4}, path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for expected in ("torch-zip", "state_dict", "model_state_dict", "optimizer", "optimizer_state_dict", "progress", "epoch"):
        assert expected in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["info"])
    assert raised.value.code == 2


def test_console_script_runs(cnn_state_dict_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ckptview", "info", "--json", str(cnn_state_dict_path)],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["format"] == "torch-zip"


def test_the_command_writes_all_it_printed_before_its_fast_exit(tmp_path: Path) -> None:
    # `ckptview` ends with os._exit (no interpreter teardown): what sits in stdout's buffer must be flushed
    # first. scan prints a line per file, each small enough to wait in the buffer.
    paths = []
    for name in ("a", "b"):
        torch.save({"w": torch.ones(2)}, tmp_path / f"{name}.pt")
        paths.append(tmp_path / f"{name}.pt")
    (tmp_path / "evil.pt").write_bytes(b"\x80\x02cos\nsystem\n\x8c\x04true\x85R.")
    paths.insert(1, tmp_path / "evil.pt")
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-m", "ckptview", "scan", *map(str, paths)], capture_output=True, text=True,
                          env=buffered)
    assert done.returncode == 3 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == [str(p) for p in paths] and "evil.pt: NEEDS CODE" in lines[1]
    # the reader of its output leaves early (`| head`) with more than a pipe holds unread: no error, exit 0
    torch.save({f"w{i}": torch.ones(1) for i in range(3000)}, tmp_path / "many.pt")
    reader = subprocess.Popen([sys.executable, "-m", "ckptview", "tensors", str(tmp_path / "many.pt")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=buffered)
    assert reader.stdout is not None and reader.stdout.read(1)
    reader.stdout.close()
    assert reader.wait(timeout=60) == 0 and reader.stderr is not None and reader.stderr.read() == b""
    # or before anything was written: the little output waits in the buffer, and flushing it fails
    gone = subprocess.Popen([sys.executable, "-m", "ckptview", "tensors", str(paths[0])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=buffered)
    assert gone.stdout is not None and gone.stderr is not None
    gone.stdout.close()
    assert gone.wait(timeout=60) == 0 and gone.stderr.read() == b""


def test_scan_and_info_over_many_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zoo = tmp_path / "zoo"
    (zoo / "sub").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, zoo / "a.pt")
    torch.save({"w": torch.ones(3)}, zoo / "b.pt")
    marker = tmp_path / "ran"
    (zoo / "sub" / "evil.pt").write_bytes(
        b"\x80\x02cos\nsystem\n" + b"\x8c" + bytes([len(f"touch {marker}")]) + f"touch {marker}".encode() + b"\x85R.")
    (zoo / "config.json").write_text("{}")  # not a checkpoint: not reported when the folder is walked
    assert main(["scan", str(zoo / "a.pt"), str(zoo / "sub" / "evil.pt"), str(zoo / "b.pt")]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "evil.pt: NEEDS CODE: imports os.system" in lines[1] and "a.pt: no foreign code" in lines[0]
    assert main(["scan", "--json", str(zoo)]) == 3
    records = json.loads(capsys.readouterr().out)
    assert [Path(r["path"]).name for r in records] == ["a.pt", "b.pt", "evil.pt"]
    assert [r["needs_code"] for r in records] == [False, False, True]
    (zoo / "cut.pt").write_bytes(b"PK\x03\x04junk")
    assert main(["scan", str(zoo / "a.pt"), str(zoo / "cut.pt")]) == 1  # unreadable: 1, worse than 0
    capsys.readouterr()
    assert main(["info", "--json", str(zoo / "a.pt"), str(zoo / "cut.pt")]) == 1
    first, second = json.loads(capsys.readouterr().out)
    assert first["tensor_count"] == 1 and "cut off" in second["error"]
    assert not marker.exists()


def test_a_folder_scan_judges_pickles_by_content_whatever_their_name(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`torch.jit.load("model.torchscript")`, `pickle.load(open("weights.pickle", "rb"))`, a hub blob without a
    suffix: loaders unpickle these whatever their name, and a folder scan that picked files by suffix skipped
    them and passed the folder (exit 0) with code inside. A folder without checkpoints is said so (exit 1)."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()
    (zoo / "weights.pickle").write_bytes(b"\x80\x02cos\nsystem\n\x8c" + bytes([len(command)]) + command + b"\x85R.")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(zoo / "model.torchscript"))
    torch.save({"w": torch.ones(2)}, zoo / "blob")
    (zoo / "notes.txt").write_bytes(b"\x80\x02N.")  # a pickle by content, but a name no loader unpickles
    (zoo / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # protobuf
    os.mkfifo(zoo / "pipe")  # looked at without blocking: nothing will ever write to it
    import tarfile

    with tarfile.open(zoo / "backup", "w") as archive:  # torch.load unpickles a pre-1.0 tar's members
        archive.add(zoo / "notes.txt", arcname="pickle")
    assert main(["scan", "--json", str(zoo)]) == 3
    records = {Path(r["path"]).name: r["needs_code"] for r in json.loads(capsys.readouterr().out)}
    assert records == {"backup": None, "blob": False, "model.torchscript": True, "weights.pickle": True}
    assert main(["info", str(zoo / "blob")]) == 0 and not marker.exists()
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("models go here")
    for command in ("scan", "info"):
        assert main([command, str(empty)]) == 1
        assert "no checkpoint files in" in capsys.readouterr().err


def test_a_hub_cache_folder_lists_each_file_once_by_its_name(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The Hugging Face hub's cache keeps a file as `blobs/<hash>` and `snapshots/<rev>/pytorch_model.bin`, a
    link to it: judged by content, the blob was listed beside the link, under its hash."""
    repo = tmp_path / "models--org--net"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, repo / "blobs" / "9f86d081884c7d65")
    (repo / "snapshots" / "abc123" / "pytorch_model.bin").symlink_to("../../blobs/9f86d081884c7d65")
    assert main(["scan", "--json", str(repo)]) == 0
    assert [Path(r["path"]).name for r in json.loads(capsys.readouterr().out)] == ["pytorch_model.bin"]


def test_a_walked_folder_is_listed_in_the_order_its_files_are_numbered(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A run saved epoch_1 … epoch_12: `scan run/` in a pre-commit hook reads like the run, not like `ls`."""
    for epoch in (10, 2, 1, 12, 11, 3):
        (tmp_path / f"run_{epoch}").mkdir()
        torch.save({"w": torch.ones(1)}, tmp_path / f"run_{epoch}" / f"epoch_{epoch}.pt")
    assert main(["scan", "--json", str(tmp_path)]) == 0
    assert [Path(r["path"]).name for r in json.loads(capsys.readouterr().out)] == [
        "epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_10.pt", "epoch_11.pt", "epoch_12.pt"]


def test_scan_of_a_checkpoint_folder_judges_a_file_it_does_not_read(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A sharded set, a DCP folder, a SavedModel: one checkpoint each, but a pickle dropped beside them is not part of it, and
    `scan` of the folder called the folder safe (exit 0) with it inside."""
    import torch.distributed.checkpoint as dcp

    evil = b"\x80\x02cos\nsystem\n\x8c\x04true\x85R."
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.ones(2)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(3)}, sharded / "model-00002-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    dcp.save({"w": torch.ones(4)}, checkpoint_id=str(tmp_path / "dcp"))
    shutil.copytree(Path(__file__).parent / "fixtures" / "tf" / "savedmodel", tmp_path / "savedmodel")
    for folder in (sharded, tmp_path / "dcp", tmp_path / "savedmodel"):
        # the shards, the .distcp files, variables/variables.index and its data: read as the checkpoint
        assert main(["scan", str(folder)]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1
        (folder / "extras").mkdir()
        (folder / "extras" / "helper.pt").write_bytes(evil)
        for scanned in (folder, tmp_path):
            assert main(["scan", "--json", str(scanned)]) == 3
            records = {Path(r["path"]).name: r["needs_code"] for r in json.loads(capsys.readouterr().out)}
            assert records.pop("helper.pt") is True and records and not any(records.values()), records
        (folder / "extras" / "helper.pt").unlink()


def test_tensors_table_says_which_tensors_are_not_plain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Sparse, quantized and unreadable tensors get a layout column (a nested tensor's shape is only its buffer's)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype API
        nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    path = tmp_path / "layouts.pt"
    torch.save({"dense": torch.ones(2), "sparse": torch.eye(3).to_sparse(), "nested": nested,
                "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)}, path)
    assert main(["tensors", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "layout"
    by_name = {line.split()[0]: line for line in lines[2:6]}
    assert by_name["dense"].rstrip().endswith("B")  # nothing to say about a plain tensor
    assert by_name["sparse"].endswith("sparse_coo") and by_name["q"].endswith("quantized")
    assert by_name["nested"].endswith("unsupported: nested tensor")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    assert main(["tensors", str(plain)]) == 0
    assert "layout" not in capsys.readouterr().out


def test_info_on_a_bare_tensor_says_no_sections_instead_of_an_empty_table(capsys: pytest.CaptureFixture[str],
                                                                          tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save(torch.ones(3, 3), path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no sections" in out and "what it is" not in out
