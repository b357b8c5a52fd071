"""Every checkpoint people have: training dicts, Lightning, sharded sets, TorchScript, whole modules, DCP."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptview
from ckptview.analyzers.sections import find_sections, model_state_dict, pickled_modules
from ckptview.analyzers.training import training_state
from ckptview.cli import main
from ckptview.errors import ModelBuildError, UntrustedCodeError
from ckptview.readers.torchscript import describe_script_module
from ckptview.readers.trusted import load_module
from conftest import SmallCNN, train_a_few_steps
from test_open import flatten
from test_safety import RunsACommand


def kinds(ckpt: ckptview.Checkpoint) -> dict[str, str]:
    return {s.name: s.kind for s in find_sections(ckpt)}


# --- sections ------------------------------------------------------------------------------------

def test_training_dict_sections(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    optimizer = train_a_few_steps(trained_cnn, steps=1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    scaler = torch.amp.GradScaler("cpu")
    ema = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    path = tmp_path / "train.pt"
    torch.save({"model_state_dict": trained_cnn.state_dict(), "model_ema": ema, "optimizer_state_dict": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": 12, "best_acc1": 0.71,
                "args": {"lr": 0.1, "arch": "cnn"}, "git_sha": "abc123"}, path)
    with ckptview.open(path) as ckpt:
        assert kinds(ckpt) == {"model_state_dict": "state_dict", "model_ema": "ema_state_dict",
                               "optimizer_state_dict": "optimizer", "scheduler": "scheduler", "scaler": "grad_scaler",
                               "epoch": "progress", "best_acc1": "progress", "args": "hyper_parameters",
                               "git_sha": "metadata"}
        counts = {s.name: s.tensor_count for s in find_sections(ckpt)}
        assert counts["model_state_dict"] == counts["model_ema"] == len(trained_cnn.state_dict())
        assert list(model_state_dict(ckpt)) == list(trained_cnn.state_dict())
        state = training_state(ckpt)
        assert state.progress == {"epoch": 12, "best_acc1": 0.71}
        assert state.hyper_parameters == {"args": {"lr": 0.1, "arch": "cnn"}}
        assert state.schedulers[0]["step_size"] == 1 and state.grad_scaler["growth_factor"] == 2.0


def test_nested_model_state_dict_is_found(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    path = tmp_path / "nested.pth"
    torch.save({"model": {"state_dict": trained_cnn.state_dict(), "name": "cnn"}, "meta": {"epoch": 3}}, path)
    with ckptview.open(path) as ckpt:
        assert kinds(ckpt)["model.state_dict"] == "state_dict"
        assert list(model_state_dict(ckpt)) == list(trained_cnn.state_dict())


def test_bare_state_dict_is_one_section(cnn_state_dict_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json", str(cnn_state_dict_path)]) == 0
    sections = json.loads(capsys.readouterr().out)["sections"]
    assert [(s["kind"], s["path"], s["tensor_count"]) for s in sections] == [("state_dict", [], 14)]  # SmallCNN: 14 tensors


# --- optimizer state mapped to names -------------------------------------------------------------

@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("named", [False, True], ids=["ids", "param_names"])
def test_optimizer_state_maps_to_parameter_names(tmp_path: Path, cnn: SmallCNN, optimizer_class: type, named: bool) -> None:
    params = cnn.named_parameters() if named else cnn.parameters()
    kwargs = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    optimizer = optimizer_class(params, lr=0.01, **kwargs)
    cnn(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "opt.pt"
    torch.save({"model": cnn.state_dict(), "optimizer": optimizer.state_dict()}, path)
    with ckptview.open(path) as ckpt:
        (opt,) = training_state(ckpt).optimizers
    names = [name for name, _ in cnn.named_parameters()]
    assert [p.name for p in opt.params] == names
    assert opt.mapping == ("param_names" if named else "order")
    shapes = dict((n, tuple(p.shape)) for n, p in cnn.named_parameters())
    moment = "momentum_buffer" if optimizer_class is torch.optim.SGD else "exp_avg"
    assert all(p.tensors[moment][0] == shapes[p.name] for p in opt.params)
    assert opt.groups[0].lr == 0.01
    # torch saves decoupled_weight_decay in each Adam group since 2.6, so Adam and AdamW are told apart
    assert opt.optimizer_kind == {torch.optim.SGD: "SGD with momentum", torch.optim.Adam: "Adam",
                                  torch.optim.AdamW: "AdamW"}[optimizer_class]


@pytest.mark.parametrize(("optimizer_class", "kind"), [
    (torch.optim.Adafactor, "Adafactor"), (torch.optim.LBFGS, "LBFGS"), (torch.optim.Rprop, "Rprop"),
    (torch.optim.Adamax, "Adamax"), (torch.optim.ASGD, "ASGD")])
def test_less_common_optimizers_are_named_and_mapped(tmp_path: Path, cnn: SmallCNN, optimizer_class: type,
                                                     kind: str) -> None:
    """Adafactor factors a matrix's second moment (row_var [m, 1], col_var [1, n]) and LBFGS keeps one flat
    state for all its parameters: neither's shapes are the parameters', and both read as "the optimizer may
    belong to another model"; each is named by what its state holds."""
    optimizer = optimizer_class(cnn.parameters(), lr=0.01)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = cnn(torch.randn(2, 3, 8, 8)).square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    path = tmp_path / "opt.pt"
    torch.save({"model": cnn.state_dict(), "optimizer": optimizer.state_dict()}, path)
    with ckptview.open(path) as ckpt:
        (opt,) = training_state(ckpt).optimizers
    assert opt.optimizer_kind.startswith(kind) and opt.mapping == "order"
    assert [p.name for p in opt.params] == [name for name, _ in cnn.named_parameters()]
    assert "another model" not in opt.mapping_note


def test_frozen_layers_mapped_by_order_and_shape(tmp_path: Path, cnn: SmallCNN) -> None:
    for parameter in cnn.conv1.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in cnn.parameters() if p.requires_grad])
    cnn(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "frozen.pt"
    torch.save({"state_dict": cnn.state_dict(), "optimizer": optimizer.state_dict()}, path)
    with ckptview.open(path) as ckpt:
        (opt,) = training_state(ckpt).optimizers
    assert opt.mapping == "order+shape"
    assert [p.name for p in opt.params] == [n for n, p in cnn.named_parameters() if p.requires_grad]


def _decay_groups_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW over two groups as the Hugging Face Trainer, timm and nanoGPT make them: weight decay for
    matrices and kernels, none for biases and norm weights, each group in the model's order; one step."""
    named = list(model.named_parameters())
    decay, no_decay = [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]
    params = dict(named)
    optimizer = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": 0.01},
                                   {"params": [params[n] for n in no_decay], "weight_decay": 0.0}])
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return optimizer, decay + no_decay


def test_weight_decay_groups_are_mapped_group_by_group(tmp_path: Path, cnn: SmallCNN) -> None:
    optimizer, ids_order = _decay_groups_optimizer(cnn)
    path = tmp_path / "groups.pt"
    torch.save({"state_dict": cnn.state_dict(), "optimizer": optimizer.state_dict()}, path)
    with ckptview.open(path) as ckpt:
        (opt,) = training_state(ckpt).optimizers
    # ids run through the decay group, then the rest: not the model's order, but each group keeps it
    assert ids_order != [n for n, _ in cnn.named_parameters()]
    assert opt.mapping == "order+shape" and "2 groups" in opt.mapping_note
    assert [p.name for p in opt.params] == ids_order


def test_trainer_folder_sorted_by_name_is_mapped_by_shape_and_says_so(tmp_path: Path, cnn: SmallCNN) -> None:
    from safetensors.torch import save_file

    optimizer, ids_order = _decay_groups_optimizer(cnn)
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    # as the Trainer saves: safetensors lists the tensors by name, the optimizer's ids follow the model
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1, "epoch": 1.0, "log_history": []}))
    shapes = {n: tuple(p.shape) for n, p in cnn.named_parameters()}
    with ckptview.open(folder) as ckpt:
        (opt,) = training_state(ckpt).optimizers
    assert opt.mapping == "shape" and "may be swapped" in opt.mapping_note
    assert sorted(p.name for p in opt.params) == sorted(shapes)
    assert all(p.tensors["exp_avg"][0] == shapes[p.name] for p in opt.params)
    # a shape only one parameter has names it exactly
    unique = {n for n, shape in shapes.items() if list(shapes.values()).count(shape) == 1}
    assert unique and all(p.name == ids_order[p.param_id] for p in opt.params if ids_order[p.param_id] in unique)


def test_optimizer_of_another_model_is_reported(tmp_path: Path, cnn: SmallCNN) -> None:
    other = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2))
    optimizer = torch.optim.Adam(other.parameters())
    other(torch.randn(1, 5)).sum().backward()
    optimizer.step()
    path = tmp_path / "mixed.pt"
    torch.save({"state_dict": cnn.state_dict(), "optimizer": optimizer.state_dict()}, path)
    with ckptview.open(path) as ckpt:
        (opt,) = training_state(ckpt).optimizers
    assert opt.mapping == "failed" and "cannot map" in opt.mapping_note
    assert all(p.name is None for p in opt.params)


# --- Lightning -----------------------------------------------------------------------------------

lightning = pytest.importorskip("lightning", reason="the test extra installs lightning")


class LitClassifier(lightning.LightningModule):
    def __init__(self, hidden: int = 8, extra: object = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}


def _lightning_checkpoint(tmp_path: Path, extra: object) -> Path:
    import argparse  # noqa: F401 - the hyper-parameters hold an argparse.Namespace

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    trainer = lightning.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", enable_checkpointing=True)
    trainer.fit(LitClassifier(extra=extra), torch.utils.data.DataLoader(data, batch_size=8))
    path = tmp_path / "lit.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_lightning_checkpoint(tmp_path: Path) -> None:
    import argparse

    from omegaconf import OmegaConf

    marker = tmp_path / "lightning-pwned"
    extra = {"ns": argparse.Namespace(depth=3, name="x"), "cfg": OmegaConf.create({"opt": {"lr": 0.1}}),
             "payload": RunsACommand(marker)}
    path = _lightning_checkpoint(tmp_path, extra)
    reference = torch.load(path, weights_only=False)  # trusted: we wrote it (this runs the payload)
    marker.unlink()
    with ckptview.open(path) as ckpt:
        assert {e.name: e.shape for e in ckpt.tensors()} == {n: tuple(t.shape) for n, t in flatten(reference).items()}
        assert kinds(ckpt)["state_dict"] == "state_dict" and kinds(ckpt)["optimizer_states.0"] == "optimizer"
        assert kinds(ckpt)["hyper_parameters"] == "hyper_parameters" and kinds(ckpt)["loops"] == "loops"
        state = training_state(ckpt)
        assert state.lightning["version"] == lightning.__version__
        assert state.lightning["global_step"] == 2 and state.lightning["callbacks"][0].startswith("ModelCheckpoint")
        assert "fit_loop" in state.lightning["loops"]
        hparams = state.hyper_parameters["hyper_parameters"]
        assert hparams["hidden"] == 8
        assert hparams["extra"]["ns"] == {"__class__": "argparse.Namespace", "depth": 3, "name": "x"}
        assert hparams["extra"]["cfg"] == {"opt": {"lr": 0.1}}
        (opt,) = state.optimizers
        assert [p.name for p in opt.params][:2] == ["model.0.weight", "model.0.bias"]
        assert state.schedulers[0]["step_size"] == 1
        assert "posix.system" in {imp.name for imp in ckpt.pickle_imports}
    assert not marker.exists()


# --- sharded sets --------------------------------------------------------------------------------

def _shard(state: dict[str, torch.Tensor], folder: Path, shards: int, kind: str) -> Path:
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for index in range(shards):
        suffix = "safetensors" if kind == "safetensors" else "bin"
        stem = "model" if kind == "safetensors" else "pytorch_model"
        file = f"{stem}-{index + 1:05d}-of-{shards:05d}.{suffix}"
        part = {n: state[n].contiguous() for n in names[index * per:(index + 1) * per]}
        save_file(part, folder / file) if kind == "safetensors" else torch.save(part, folder / file)
        weight_map.update({n: file for n in part})
    index_name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return folder / index_name


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_set_is_one_checkpoint(tmp_path: Path, trained_cnn: SmallCNN, kind: str) -> None:
    state = trained_cnn.state_dict()
    index = _shard(state, tmp_path, 3, kind)
    for path in (index, tmp_path):
        with ckptview.open(path) as ckpt:
            assert ckpt.format == ("safetensors-sharded" if kind == "safetensors" else "torch-sharded")
            assert [e.name for e in ckpt.tensors()] == list(state)
            for entry in ckpt.tensors():
                assert torch.equal(entry.load(), state[entry.name])
            assert ckpt.details["problems"] == []


def test_torch_shards_numbering_their_storages_alike_stay_apart(tmp_path: Path) -> None:
    """Each torch shard numbers its storages from "0": layers.1.weight in the second shard has the key,
    offset and shape of layers.0.weight in the first. They are still two tensors with their own values
    in every count, statistic and loaded model (by key alone, the second read as the first)."""
    from ckptview.analyzers.stats import stats
    from ckptview.analyzers.table import tensor_table
    from ckptview.inference.loading import load_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    state = model.state_dict()
    index = _shard(state, tmp_path, 2, "bin")
    with ckptview.open(index) as ckpt:
        assert ckpt.parameter_count == sum(t.numel() for t in state.values()) == 40
        assert ckpt.total_bytes == 160 and len(ckpt.unique_tensors()) == 4
        assert not any(row.shared or row.tied_to for row in tensor_table(ckpt).rows)
        for item in stats(ckpt, progress=False).tensors:
            assert (item.min, item.max) == (state[item.name].min().item(), state[item.name].max().item()), item.name
        loaded = load_model(ckpt, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), device="cpu").model
        for name, value in loaded.state_dict().items():
            assert torch.equal(value, state[name]), name


def test_weight_map_pointing_at_absent_tensor_is_reported(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    index = _shard(trained_cnn.state_dict(), tmp_path, 2, "safetensors")
    data = json.loads(index.read_text())
    data["weight_map"]["head.extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with ckptview.open(index) as ckpt:
        assert ckpt.details["missing_tensors"] == ["head.extra.weight (index says model-00001-of-00002.safetensors)"]
        assert "1 weight_map entries point to tensors absent from their shard" in ckpt.details["problems"][0]


def _sparse_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A real safetensors header with the data region left as a hole: GBs that take no disk."""
    header, offset = {}, 0
    sizes = {"BF16": 2, "F32": 4}
    for name, (dtype, shape) in tensors.items():
        nbytes = sizes[dtype] * int(torch.tensor(shape).prod())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as stream:
        stream.write(len(raw).to_bytes(8, "little") + raw)
        stream.truncate(8 + len(raw) + offset)
    return offset


def test_hundred_gigabyte_sparse_sharded_set_opens(tmp_path: Path) -> None:
    """A 100 GB set (sparse files) opens from headers only; bench/sharded_bench.py times it."""
    hidden, layers, shards = 8192, 80, 20
    weight_map, total = {}, 0
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for layer in range(shard * layers // shards, (shard + 1) * layers // shards):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[f"model.layers.{layer}.self_attn.{proj}.weight"] = ("BF16", [hidden, hidden])
            for proj, shape in (("gate_proj", [28672, hidden]), ("up_proj", [28672, hidden]), ("down_proj", [hidden, 28672])):
                tensors[f"model.layers.{layer}.mlp.{proj}.weight"] = ("BF16", shape)
        total += _sparse_safetensors(tmp_path / file, tensors)
        weight_map.update({name: file for name in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with ckptview.open(tmp_path) as ckpt:
        assert ckpt.total_bytes == total > 100e9
        assert ckpt.tensor_count == len(weight_map) == 560
        assert ckpt.tensor("model.layers.79.mlp.down_proj.weight").shape == (hidden, 28672)


# --- TorchScript ---------------------------------------------------------------------------------

class Scriptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_listed_without_loading_and_described_with_trust(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    model = Scriptable().eval()
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.randn(1, 3, 8, 8))
    path = tmp_path / f"{how}.pt"
    torch.jit.save(scripted, path)
    reference = torch.jit.load(path).state_dict()
    with ckptview.open(path) as ckpt:
        assert ckpt.format == "torchscript"
        assert {e.name: e.shape for e in ckpt.tensors()} == {n: tuple(t.shape) for n, t in reference.items()}
        for entry in ckpt.tensors():
            assert torch.equal(entry.load(), reference[entry.name])
        assert kinds(ckpt) == {"<root>": "torchscript"}
        assert ckpt.pickle_imports == () and any(f.startswith("code/__torch__/torch/nn/modules/conv") for f in ckpt.details["code_files"])
        with pytest.raises(UntrustedCodeError, match="trust=True"):
            describe_script_module(ckpt)
    with ckptview.open(path, trust=True) as ckpt:
        summary = describe_script_module(ckpt)
        assert [name for name, _ in summary.modules] == ["<root>", "conv", "bn", "fc"]
        assert "def forward" in summary.forward_code


def test_torchscript_archive_with_malicious_pickle_is_not_run(tmp_path: Path) -> None:
    path = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(Scriptable()), path)
    marker = tmp_path / "ts-pwned"
    import pickle

    evil = pickle.dumps({"payload": RunsACommand(marker)}, protocol=2)
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    members[next(n for n in members if n.endswith("/data.pkl"))] = evil
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with ckptview.open(path) as ckpt:
        assert [imp.name for imp in ckpt.pickle_imports] == ["posix.system"]
    assert not marker.exists()


# --- whole pickled modules -----------------------------------------------------------------------

def test_whole_module_listed_without_class_and_loaded_with_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "userlib"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.bn = nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn(self.conv(x))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import userlib

    model = nn.Sequential(userlib.Block(), nn.Flatten())
    path = tmp_path / "whole.pt"
    torch.save(model, path)

    with ckptview.open(path) as ckpt:
        assert [e.name for e in ckpt.tensors()] == list(model.state_dict())
        assert kinds(ckpt) == {"<root>": "module"}
        assert [(m.name, m.class_path) for m in pickled_modules(ckpt)] == [
            ("", "torch.nn.modules.container.Sequential"), ("0", "userlib.Block"),
            ("0.conv", "torch.nn.modules.conv.Conv2d"), ("0.bn", "torch.nn.modules.batchnorm.BatchNorm2d"),
            ("1", "torch.nn.modules.flatten.Flatten")]
        with pytest.raises(UntrustedCodeError, match="userlib.Block"):
            load_module(ckpt)
    with ckptview.open(path, trust=True) as ckpt:
        loaded = load_module(ckpt)
        x = torch.randn(1, 3, 8, 8)
        assert torch.equal(loaded.eval()(x), model.eval()(x))

    monkeypatch.delitem(sys.modules, "userlib")
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    os.rename(package, tmp_path / "moved")
    with ckptview.open(path, trust=True) as ckpt, pytest.raises(ModelBuildError) as raised:
        load_module(ckpt)
    assert "userlib" in str(raised.value) and "torch.save(model.state_dict())" in str(raised.value)


def test_whole_module_payload_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "module-pwned"
    model = nn.Linear(2, 2)
    model.hook = RunsACommand(marker)  # an attribute that runs a command when unpickled
    path = tmp_path / "evil_module.pt"
    torch.save(model, path)
    with ckptview.open(path) as ckpt:
        assert [e.name for e in ckpt.tensors()] == ["weight", "bias"]
        assert "posix.system" in {imp.name for imp in ckpt.pickle_imports}
    assert not marker.exists()


# --- DTensor state dicts (FSDP2, tensor parallel) saved with torch.save ---------------------------

_WRITE_DTENSORS = textwrap.dedent("""
    import os, socket, sys
    import torch, torch.distributed as dist
    with socket.socket() as probe:  # a free port on this machine only
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    # what rank 0 of two saves: its half of a [6, 4] weight (the global shape given, as FSDP2 knows it)
    state = {"weight": DTensor.from_local(torch.randn(3, 4), mesh, [Shard(0)], run_check=False,
                                          shape=torch.Size([6, 4]), stride=(4, 1)),
             "bias": distribute_tensor(torch.arange(3.0), mesh, [Replicate()]), "step": torch.tensor(7)}
    torch.save(state, sys.argv[1])
    dist.destroy_process_group()
""")


def test_dtensor_state_dict_lists_each_local_part(tmp_path: Path) -> None:
    """A DTensor is listed as the part the file holds (its local tensor: shape and values as
    `to_local()` gives them), its placements and global shape said beside it; torch's own DTensor
    classes are not foreign code, and torch.load(weights_only=True) needs torch.distributed.tensor."""
    import subprocess

    path = tmp_path / "rank0.pt"
    subprocess.run([sys.executable, "-c", _WRITE_DTENSORS, str(path)], check=True, capture_output=True, timeout=120)
    import torch.distributed.tensor  # noqa: F401  (what torch.load needs for the reference)

    reference = torch.load(path, weights_only=True)
    with ckptview.open(path) as ckpt:
        assert not ckpt.pickle_imports and not ckpt.needs_trust
        for name in ("weight", "bias"):
            entry, local = ckpt.tensor(name), reference[name].to_local()
            assert (entry.shape, entry.dtype) == (tuple(local.shape), local.dtype)
            assert torch.equal(entry.load(), local)
        assert ckpt.tensor("weight").info.note == "DTensor Shard(dim=0) of [6, 4]"
        assert ckpt.tensor("bias").info.note == "DTensor Replicate() of [3]"
        assert "torch.distributed.tensor is imported" in ckpt.details["weights_only"]
        assert ckptview.stats(ckpt, progress=False)["weight"].max == reference["weight"].to_local().max().item()
    assert main(["scan", str(path)]) == 0
    assert main(["tensors", str(path)]) == 0
    # into the whole model: a shard no fix of names makes whole, said so
    report = ckptview.doctor(path, lambda: nn.Linear(4, 6))
    assert [fix.kind for fix in report.fixes] == ["dtensor_shards"] and not report.loads_after_fix
    assert "weight: [3, 4] here, [6, 4] in the model; DTensor Shard(dim=0) of [6, 4]" in report.fixes[0].description
    from ckptview.ui import explore

    panel = explore(path).select("Tensors")
    panel.wait()
    panel.selected = "weight"
    panel.wait()
    assert "DTensor Shard(dim=0) of [6, 4]" in panel.detail.value
    from test_hostile_round2 import assert_scan_covers_torch

    # as torch 2.4 and earlier named it: listed the same way, its (now unregistered) names foreign
    old = tmp_path / "rank0_torch24.pt"
    with zipfile.ZipFile(path) as archive, zipfile.ZipFile(old, "w") as out:
        for member in archive.namelist():
            data = archive.read(member)
            if member.endswith("data.pkl"):
                data = data.replace(b"ctorch.distributed.tensor\nDTensor\n", b"ctorch.distributed._tensor.api\nDTensor\n")
            out.writestr(member, data)
    with ckptview.open(old) as ckpt:
        assert ckpt.tensor("weight").info.note == "DTensor Shard(dim=0) of [6, 4]"
        assert "torch.distributed._tensor.api.DTensor" in {imp.name for imp in ckpt.pickle_imports}

    assert assert_scan_covers_torch(path) == "safe"  # what torch.load looks up beyond them: none


def test_nested_jagged_tensor_is_torchs_own_not_foreign_code(tmp_path: Path) -> None:
    """A jagged nested tensor pickles as torch.nested's NestedTensor and _rebuild_njt and torch._dynamo's
    _DimRange, which those packages register as weights-only safe globals: listed, and not foreign."""
    import torch._dynamo  # noqa: F401  (what torch.load(weights_only=True) needs for the reference)

    jagged = torch.nested.nested_tensor([torch.arange(6.0).reshape(2, 3), torch.ones(4, 3)], layout=torch.jagged)
    path = tmp_path / "njt.pt"
    torch.save({"njt": jagged, "w": torch.ones(2)}, path)
    reference = torch.load(path, weights_only=True)["njt"]
    with ckptview.open(path) as ckpt:
        assert not ckpt.pickle_imports
        values = next(e for e in ckpt.tensors() if e.name.startswith("njt") and e.name.endswith("values"))
        assert torch.equal(values.load(), reference.values())
        assert "torch._dynamo and torch.nested are imported" in ckpt.details["weights_only"]
    assert main(["scan", str(path)]) == 0
    from test_hostile_round2 import assert_scan_covers_torch

    assert assert_scan_covers_torch(path) == "safe"


# --- torch.distributed.checkpoint ----------------------------------------------------------------

def test_dcp_directory_listing_equals_dcp_reader(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    optimizer = train_a_few_steps(trained_cnn, steps=1)
    state = {"model": trained_cnn.state_dict(), "optim": optimizer.state_dict(), "epoch": 4}
    folder = tmp_path / "dcp"
    dcp.save(state, checkpoint_id=str(folder))
    dcp_to_torch_save(str(folder), str(tmp_path / "consolidated.pt"))
    reference = flatten(torch.load(tmp_path / "consolidated.pt", weights_only=False))
    with ckptview.open(folder) as ckpt:
        assert ckpt.format == "torch-dcp" and not ckpt.needs_trust
        assert {e.name: e.shape for e in ckpt.tensors()} == {n: tuple(t.shape) for n, t in reference.items()}
        for entry in ckpt.tensors():
            assert torch.equal(entry.load(), reference[entry.name])
        assert kinds(ckpt) == {"model": "state_dict", "optim": "optimizer", "epoch": "progress"}
        (opt,) = training_state(ckpt).optimizers
        assert [p.name for p in opt.params] == [n for n, _ in trained_cnn.named_parameters()]


def test_dcp_item_saved_in_chunks_keeps_its_dtype(tmp_path: Path) -> None:
    """A tensor several ranks saved in chunks is listed as unsupported (consolidate it first), with the
    dtype its .metadata names: the check looked for a torch.dtype, which the safe unpickler never
    makes, and listed every such bfloat16 tensor as float32."""
    import dataclasses
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    folder = tmp_path / "dcp"
    dcp.save({"w": torch.randn(4, 3).to(torch.bfloat16)}, checkpoint_id=str(folder))
    with open(folder / ".metadata", "rb") as stream:
        metadata = pickle.load(stream)  # our own file: what two ranks saving halves of `w` write instead
    item = metadata.state_dict_metadata["w"]
    halves = [ChunkStorageMetadata(offsets=torch.Size([row, 0]), sizes=torch.Size([2, 3])) for row in (0, 2)]
    metadata.state_dict_metadata["w"] = dataclasses.replace(item, chunks=halves)
    with open(folder / ".metadata", "wb") as stream:
        pickle.dump(metadata, stream)
    with ckptview.open(folder) as ckpt:
        entry = ckpt.tensor("w")
        assert (entry.layout, entry.dtype, entry.shape) == ("unsupported", torch.bfloat16, (4, 3))
        assert "2 chunks" in entry.info.note


def test_dcp_metadata_payload_not_run(tmp_path: Path) -> None:
    import pickle

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(folder))
    marker = tmp_path / "dcp-pwned"
    metadata = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)) + metadata)
    with pytest.raises(ckptview.CkptviewError):
        ckptview.open(folder)  # the leading pickle is not DCP metadata: refused, not run
    assert not marker.exists()


def test_dcp_metadata_named_alone_opens_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`.metadata` named alone was read as a bare pickle: DCP's own classes and pathlib's were called
    foreign code (scan exit 3). It is the checkpoint's index; a crafted one is still code."""
    import pickle

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(folder))
    assert main(["scan", str(folder / ".metadata")]) == 0
    assert "no foreign code (torch-dcp)" in capsys.readouterr().out
    with ckptview.open(folder / ".metadata") as ckpt:
        assert ckpt.format == "torch-dcp" and torch.equal(ckpt.tensor("w").load(), torch.ones(3))
    marker = tmp_path / "dcp-pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    assert main(["scan", str(folder / ".metadata")]) == 3
    assert not marker.exists()
    # without DCP's data files beside it, a `.metadata` is a file like any other
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / ".metadata").write_bytes(pickle.dumps({"step": 3}))
    assert main(["scan", str(alone / ".metadata")]) == 0
    assert "(pickle" in capsys.readouterr().out


def test_dcp_items_overlapping_in_a_data_file_are_refused(tmp_path: Path) -> None:
    """DCP writes each item once. An item whose range starts earlier than its archive (over the item
    before it) still parses, as bytes before an archive shift its offsets, so a crafted .metadata could
    have many items read one archive, each read again by statistics: refused. The .metadata is
    torch's own, re-pickled with one change."""
    import dataclasses
    import pickle

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    dcp.save({"a": torch.ones(64), "b": torch.zeros(64)}, checkpoint_id=str(folder))
    with ckptview.open(folder) as ckpt:
        assert sorted(entry.name for entry in ckpt.tensors()) == ["a", "b"]
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    (first_index, first), (second_index, second) = sorted(metadata.storage_data.items(), key=lambda kv: kv[1].offset)
    metadata.storage_data[second_index] = dataclasses.replace(second, offset=first.offset,
                                                              length=second.offset + second.length - first.offset)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ckptview.CkptviewError, match="overlap in __0_0.distcp: DCP writes each item once"):
        ckptview.open(folder)


def test_numpy_values_and_a_lone_tensor(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "numpy.pt"
    torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}, "best_acc": np.float64(0.93), "epoch": np.int64(3),
                "confusion": np.arange(4).reshape(2, 2)}, path, pickle_protocol=4)
    with ckptview.open(path) as ckpt:
        assert not ckpt.needs_trust  # numpy scalars and arrays are data, not code
        assert training_state(ckpt).progress == {"best_acc": 0.93, "epoch": 3}
        assert ckptview.training_state(ckpt).hyper_parameters == {}
    lone = tmp_path / "tensor.pt"
    torch.save(torch.arange(6.0).reshape(2, 3), lone)
    with ckptview.open(lone) as ckpt:
        (entry,) = ckpt.tensors()
        assert entry.name == "<root>" and torch.equal(entry.load(), torch.arange(6.0).reshape(2, 3))
