"""
ONNX models written by the real libraries at test time (torch.onnx.export, onnx.helper), read
lazily by ckptview and compared with what `onnx` itself reports and computes.
"""

from __future__ import annotations

import contextlib
import io
import tracemalloc
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import ckptview
from ckptview.cli import main as cli_main
from ckptview.errors import CkptviewError, CorruptCheckpointError, TruncatedCheckpointError, UnsupportedFormatError
from ckptview.present.html import batchnorm_findings_html
from ckptview.readers.onnx_file import ONNX_DTYPES, ONNX_ENCODED
from conftest import SmallCNN, train_a_few_steps
from format_checks import check_every_command, check_every_tab

warnings.filterwarnings("ignore", module="torch.onnx")
warnings.filterwarnings("ignore", module="onnxscript")


def export(model: nn.Module, args: tuple, path: Path, **options) -> Path:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=True, **options)
    return path


class TinyLM(nn.Module):
    """Embedding, two pre-norm blocks (MultiheadAttention + MLP), a head: what an LLM export looks like."""

    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(dim), "attn": nn.MultiheadAttention(dim, 4, batch_first=True),
            "ln2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
        }) for _ in range(2))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            y = block["ln1"](x)
            x = x + block["attn"](y, y, y, need_weights=False)[0]
            x = x + block["mlp"](block["ln2"](x))
        return self.head(x)


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmallCNN after a few training steps, exported with its BatchNormalization nodes kept (optimize=False)."""
    torch.manual_seed(0)
    model = SmallCNN()
    train_a_few_steps(model)
    return export(model.eval(), (torch.randn(1, 3, 16, 16),), tmp_path_factory.mktemp("cnn") / "cnn.onnx",
                  optimize=False, external_data=False)


@pytest.fixture(scope="module")
def lm_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(TinyLM().eval(), (torch.randint(0, 50, (2, 8)),), tmp_path_factory.mktemp("lm") / "lm.onnx",
                  external_data=False)


@pytest.fixture(scope="module")
def lm_external(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(TinyLM().eval(), (torch.randint(0, 50, (2, 8)),), tmp_path_factory.mktemp("lmx") / "lm.onnx",
                  external_data=True)


def onnx_tensors(path: Path) -> dict[str, TensorProto]:
    """Every tensor onnx reports, named as ckptview names them: initializers and Constant outputs,
    those of subgraphs under `<node>.<attribute>.` (the node's name, else `<op_type>_<index>`)."""
    model = onnx.load(str(path))
    out: dict[str, TensorProto] = {}

    def walk(graph: onnx.GraphProto, prefix: str) -> None:
        for tensor in graph.initializer:
            out[prefix + tensor.name] = tensor
        for index, node in enumerate(graph.node):
            if node.op_type == "Constant":
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    out[prefix + node.output[0]] = value.t
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g, f"{prefix}{node.name or f'{node.op_type}_{index}'}.{attribute.name}.")

    walk(model.graph, "")
    return out


def torch_dtype_of(proto: TensorProto) -> torch.dtype:
    """The torch dtype holding what onnx.helper says the tensor's numpy type is."""
    return getattr(torch, helper.tensor_dtype_to_np_dtype(proto.data_type).name)


def assert_same_as_onnx(path: Path) -> int:
    expected = onnx_tensors(path)
    with ckptview.open(path) as ckpt:
        entries = {entry.name: entry for entry in ckpt.tensors()}
        for name, proto in expected.items():
            entry = entries[name]
            array = numpy_helper.to_array(proto, base_dir=str(path.parent))
            assert entry.shape == tuple(proto.dims) == array.shape, name
            if proto.data_type == TensorProto.STRING:
                assert entry.encoding == "string" and entry.nbytes == sum(map(len, proto.string_data)), name
                continue
            assert entry.dtype == torch_dtype_of(proto), name
            loaded = entry.load()
            assert loaded.dtype == entry.dtype
            if array.dtype.name.startswith(("bfloat16", "float8")):  # ml_dtypes in onnx, compared by their bits
                bits = np.uint16 if array.dtype.itemsize == 2 else np.uint8
                loaded, array = loaded.view(getattr(torch, bits.__name__)), array.view(bits)
            assert np.array_equal(loaded.numpy(), array), name
    return len(expected)


# --- the schema ----------------------------------------------------------------------------------

def test_dtype_table_is_onnx_helpers() -> None:
    for data_type, dtype in ONNX_DTYPES.items():
        assert str(dtype).removeprefix("torch.") == helper.tensor_dtype_to_np_dtype(data_type).name
    for data_type, (encoding, _) in ONNX_ENCODED.items():
        assert helper.tensor_dtype_to_np_dtype(data_type).name.startswith(encoding.replace("e", "_e", 1)[:4])


# --- torch.onnx.export --------------------------------------------------------------------------

def test_cnn_export_lists_what_onnx_reports(cnn_onnx: Path) -> None:
    assert assert_same_as_onnx(cnn_onnx) >= 12
    model = onnx.load(str(cnn_onnx))
    with ckptview.open(cnn_onnx) as ckpt:
        assert ckpt.format == "onnx"
        details = ckpt.details
    assert details["ir_version"] == model.ir_version
    assert details["opset_import"] == {o.domain: o.version for o in model.opset_import}
    assert details["producer_name"] == model.producer_name == "pytorch"
    assert details["producer_version"] == model.producer_version
    assert details["op_types"]["BatchNormalization"] == 2 and details["op_types"]["Conv"] == 2
    assert details["node_count"] == len(model.graph.node)
    assert details["inputs"] == [{"name": "x", "dtype": "float", "shape": [1, 3, 16, 16]}]
    assert details["outputs"][0]["shape"] == [1, 10]
    assert details["custom_domains"] == []


def test_lm_export_embedded_and_external_data(lm_onnx: Path, lm_external: Path) -> None:
    assert assert_same_as_onnx(lm_onnx) > 20
    assert assert_same_as_onnx(lm_external) > 20
    data_files = [p.name for p in lm_external.parent.iterdir() if p.name != "lm.onnx"]
    with ckptview.open(lm_external) as ckpt:
        assert ckpt.details["external_data"] == data_files == ["lm.onnx.data"]
        assert ckpt.tensor("embed.weight").info.storage.source.path.endswith("lm.onnx.data")


def test_layer_kinds_come_from_the_graph(lm_onnx: Path, cnn_onnx: Path) -> None:
    model = onnx.load(str(lm_onnx))
    with ckptview.open(lm_onnx) as ckpt:
        rows = {row.name: row for row in ckptview.tensor_table(ckpt).rows}
    assert (rows["embed.weight"].layer_kind, rows["embed.weight"].layer_detail) == ("Embedding", "50×32 (vocab×dim)")
    # the exporter pre-transposes Linear weights for MatMul into [in, out] constants named val_*
    matmul_weights = {node.input[1] for node in model.graph.node if node.op_type == "MatMul"} & set(rows)
    assert matmul_weights
    for name in matmul_weights:
        rows_, cols = rows[name].shape
        assert (rows[name].layer_kind, rows[name].layer_detail) == ("Linear", f"{rows_}×{cols} (in×out)")
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm" and node.input[1] in rows)
    assert rows[gemm.input[1]].layer_kind == "attention.out" and "(out×in)" in rows[gemm.input[1]].layer_detail
    with ckptview.open(cnn_onnx) as ckpt:
        rows = {row.name: row for row in ckptview.tensor_table(ckpt).rows}
    assert rows["conv1.weight"].layer_detail == "8, 3, 3×3 (out, in/groups, kernel)"
    assert rows["bn1.running_var"].layer_kind == "BatchNorm" and rows["bn1.running_var"].role == "buffer"


def test_batchnorm_found_through_the_graph_whatever_the_names(cnn_onnx: Path, tmp_path: Path) -> None:
    with ckptview.open(cnn_onnx) as ckpt:
        report = ckptview.batchnorm_checks(ckpt)
    assert [(layer.module, layer.channels) for layer in report.layers] == [("bn1", 8), ("layer1.1", 8)]
    assert report.checks("fusion_hint")[0].tensors == ("conv1.weight", "bn1.running_mean", "bn1.running_var")

    # other exporters name BatchNorm inputs anything: rename every initializer and break one variance
    model = onnx.load(str(cnn_onnx))
    renamed = {tensor.name: f"w{i}" for i, tensor in enumerate(model.graph.initializer)}
    for tensor in model.graph.initializer:
        tensor.name = renamed[tensor.name]
        if tensor.name == renamed["layer1.1.running_var"]:
            values = numpy_helper.to_array(tensor).copy()
            values[3] = -1.0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    path = tmp_path / "opaque.onnx"
    onnx.save(model, str(path))
    with ckptview.open(path) as ckpt:
        report = ckptview.batchnorm_checks(ckpt)
    assert len(report.layers) == 2
    bad = report.checks("running_var_invalid")
    assert len(bad) == 1 and bad[0].tensors == (renamed["layer1.1.running_var"],)


def test_an_export_that_folded_batchnorm_says_so(tmp_path: Path) -> None:
    """The default export of a model in eval mode folds each BatchNorm into the convolution before it: ckptview's
    BatchNorm check on it found none and said only that, where the model the user trained has two."""
    torch.manual_seed(0)
    folded = export(SmallCNN().eval(), (torch.randn(1, 3, 16, 16),), tmp_path / "folded.onnx", external_data=False)
    assert not [node for node in onnx.load(str(folded)).graph.node if node.op_type == "BatchNormalization"]
    with ckptview.open(folded) as ckpt:
        report = ckptview.batchnorm_checks(ckpt)
    (summary,) = report.findings
    assert summary.severity == "ok" and "graph has 2 convolution(s)" in summary.message and "folds" in summary.message
    assert "folds BatchNorm into the convolution" in batchnorm_findings_html(report)  # the tab and the report say it
    torch.save({"conv.weight": torch.ones(4, 3, 3, 3)}, tmp_path / "no_graph.pt")  # names alone: nothing to say
    with ckptview.open(tmp_path / "no_graph.pt") as ckpt:
        assert ckptview.batchnorm_checks(ckpt).findings[0].message == "no BatchNorm layers in this model"


def test_stats_and_diff_against_the_torch_weights(cnn_onnx: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    train_a_few_steps(model)
    state = {k: v for k, v in model.eval().state_dict().items() if not k.endswith("num_batches_tracked")}
    pt = tmp_path / "cnn.pt"
    torch.save(state, pt)
    with ckptview.open(cnn_onnx) as ours:
        stats = {item.name: item for item in ckptview.stats(ours).tensors}
        assert stats["conv1.weight"].max == pytest.approx(float(state["conv1.weight"].max()))
        assert stats["bn1.running_var"].std == pytest.approx(float(state["bn1.running_var"].std()), rel=1e-5)
        with ckptview.open(pt) as theirs:
            result = ckptview.diff(theirs, ours, values=True)
        constants = {entry.name for entry in ours.tensors() if entry.name not in state}
    # the exporter's Constant nodes are in the ONNX file only; every weight lines up and is equal
    assert constants and all(name.startswith("val_") for name in constants)
    assert result.keys.matched == len(state) and set(result.keys.missing) == constants
    assert not result.keys.unexpected and not result.keys.shape_mismatches
    assert len(result.values.tensors) == len(state) and all(row.max_abs_diff == 0 for row in result.values.tensors)


def test_module_tree_folds_onnx_names(lm_onnx: Path) -> None:
    with ckptview.open(lm_onnx) as ckpt:
        tree = ckptview.module_tree(ckpt)
        total = ckpt.parameter_count
    assert tree.root.parameter_count == total
    assert "blocks" in [child.name for child in tree.root.children]


# --- onnx.helper: subgraphs, typed fields, small floats, strings, sparse -------------------------

def _constant(name: str, tensor: TensorProto) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=tensor)


def make_if_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    then_w = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "then_w")
    then_graph = helper.make_graph(
        [_constant("w", then_w), helper.make_node("Constant", [], ["k"], value_floats=[1.5, -2.0]),
         helper.make_node("MatMul", ["x", "w"], ["then_out"])],
        "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2, 4])])
    half = helper.make_tensor("w16", TensorProto.FLOAT16, [3, 4], rng.standard_normal(12).astype(np.float16))  # int32_data
    else_graph = helper.make_graph(
        [_constant("w", half), helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w32"], ["else_out"])],
        "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2, 4])],
        initializer=[numpy_helper.from_array(np.arange(4, dtype=np.int64), "inner_ids")])
    loop_body = helper.make_graph(
        [_constant("step", numpy_helper.from_array(np.array([0.25], dtype=np.float32), "step")),
         helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "step"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])])
    initializers = [
        numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "raw_f32"),
        helper.make_tensor("typed_f32", TensorProto.FLOAT, [2, 3], [0.5, 1, 2, 3, 4, -1]),          # float_data
        helper.make_tensor("typed_f64", TensorProto.DOUBLE, [3], [0.1, 0.2, 0.3]),                 # double_data
        helper.make_tensor("typed_i64", TensorProto.INT64, [4], [1, -2, 3, 1 << 40]),              # int64_data
        helper.make_tensor("typed_i8", TensorProto.INT8, [3], [-128, 0, 127]),                     # int32_data
        helper.make_tensor("typed_u64", TensorProto.UINT64, [2], [1, (1 << 64) - 1]),              # uint64_data
        helper.make_tensor("typed_bool", TensorProto.BOOL, [3], [True, False, True]),
        helper.make_tensor("raw_bf16", TensorProto.BFLOAT16, [2, 2], np.array([1.0, -2.5, 3.0, 0.1], dtype=np.float32)),
        helper.make_tensor("raw_f8", TensorProto.FLOAT8E4M3FN, [4], np.array([0.5, -1.0, 2.0, 448.0], dtype=np.float32)),
        helper.make_tensor("raw_f16", TensorProto.FLOAT16, [2], np.array([1.0, 65504.0], dtype=np.float16).view(np.uint16).tobytes(), raw=True),
        helper.make_tensor("names", TensorProto.STRING, [2], [b"cat", b"dog"]),
        helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        helper.make_tensor("trips", TensorProto.INT64, [], [3]),
        helper.make_tensor("acc0", TensorProto.FLOAT, [1], [0.0]),
    ]
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("sparse_w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("sparse_w_idx", TensorProto.INT64, [3, 2], [0, 1, 2, 3, 3, 0]), [4, 4])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Loop", ["trips", "cond", "acc0"], ["acc"], body=loop_body),
    ]
    graph = helper.make_graph(nodes, "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1])],
                              initializer=initializers, sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="tests")
    helper.set_model_props(model, {"author": "ckptview tests", "license": "Apache-2.0"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_subgraph_constants_typed_fields_and_small_floats(tmp_path: Path) -> None:
    path = make_if_model(tmp_path / "if.onnx")
    assert assert_same_as_onnx(path) == 18  # 14 initializers + then w, else w, else inner_ids, loop step
    with ckptview.open(path) as ckpt:
        names = [entry.name for entry in ckpt.tensors()]
        assert {"branch.then_branch.w", "branch.then_branch.k", "branch.else_branch.w", "branch.else_branch.inner_ids",
                "Loop_1.body.step"} <= set(names)
        assert ckpt.tensor("branch.then_branch.k").load().tolist() == [1.5, -2.0]
        assert ckpt.tensor("branch.else_branch.w").dtype == torch.float16
        strings = ckpt.tensor("names")
        assert (strings.encoding, strings.shape, strings.nbytes) == ("string", (2,), 6)
        with pytest.raises(CkptviewError, match="string"):
            strings.load()
        sparse = ckpt.tensor("sparse_w")
        assert sparse.layout == "sparse_coo" and sparse.shape == (4, 4)
        dense = np.zeros((4, 4), np.float32)
        dense[[0, 2, 3], [1, 3, 0]] = [1, 2, 3]
        assert np.array_equal(sparse.load().to_dense().numpy(), dense)
        assert ckpt.metadata == {"author": "ckptview tests", "license": "Apache-2.0"}
        details = ckpt.details
        assert sorted(details["subgraphs"]) == ["Loop_1.body", "branch.else_branch", "branch.then_branch"]
        assert details["op_types"]["If"] == 1 and details["op_types"]["Constant"] == 4
        assert details["metadata_props"]["author"] == "ckptview tests"
        ckptview.stats(ckpt)  # strings and sparse are listed as skipped, not a failure


# --- quantized models -----------------------------------------------------------------------------

def make_qdq_model(path: Path) -> Path:
    rng = np.random.default_rng(1)
    w8 = rng.integers(-128, 128, (4, 3, 3, 3), dtype=np.int8)
    w_scale = rng.uniform(0.001, 0.05, 4).astype(np.float32)
    w_zero = np.array([0, 3, -5, 1], dtype=np.int8)
    fc = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    block = rng.integers(-8, 8, (6, 8)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w8, "conv.w_q"), numpy_helper.from_array(w_scale, "conv.w_scale"),
        numpy_helper.from_array(w_zero, "conv.w_zero"),
        numpy_helper.from_array(fc, "fc.w_q"), numpy_helper.from_array(np.array(0.02, np.float32), "fc.w_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "fc.w_zero"),
        numpy_helper.from_array(block.astype(ml_dtypes.int4), "proj.w_q"),  # raw_data, two values per byte
        numpy_helper.from_array(rng.uniform(0.01, 0.1, (6, 2)).astype(np.float32), "proj.w_scale"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"), numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["conv.w_q", "conv.w_scale", "conv.w_zero"], ["conv.w"], axis=0),
        helper.make_node("Conv", ["xd", "conv.w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("DequantizeLinear", ["fc.w_q", "fc.w_scale", "fc.w_zero"], ["fc.w"]),
        helper.make_node("MatMul", ["f", "fc.w"], ["h"]),
        helper.make_node("DequantizeLinear", ["proj.w_q", "proj.w_scale"], ["proj.w"], axis=1, block_size=4),
        helper.make_node("MatMul", ["h", "proj.w"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference_dequantize(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """onnx's own DequantizeLinear (the reference evaluator) on the node's initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    inputs = [helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims)) for name in node.input]
    graph = helper.make_graph([node], "dq", inputs, [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)])
    single = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    feeds = {name: numpy_helper.to_array(inits[name]) for name in node.input}
    return ReferenceEvaluator(single).run(None, feeds)[0]


def test_dequantize_linear_weights_load_as_onnx_reference_computes(tmp_path: Path) -> None:
    path = make_qdq_model(tmp_path / "qdq.onnx")
    model = onnx.load(str(path))
    with ckptview.open(path) as ckpt:
        assert ckpt.details["quantized_tensors"] == 3
        for node in model.graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] == "xq":
                continue
            entry = ckpt.tensor(node.input[0])
            stored = next(t for t in model.graph.initializer if t.name == node.input[0])
            assert entry.layout == "encoded"
            assert entry.encoding == {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.INT4: "int4"}[stored.data_type]
            assert entry.info.encoding_params["scale"] == node.input[1]
            assert entry.info.encoding_params["zero_point"] == (node.input[2] if len(node.input) > 2 else None)
            assert entry.dtype == torch.float32 and entry.shape == tuple(stored.dims)
            expected = reference_dequantize(model, node)
            loaded = entry.load()
            assert loaded.dtype == torch.float32 and np.array_equal(loaded.numpy(), expected), node.input[0]
        assert ckpt.tensor("conv.w_q").nbytes == 4 * 3 * 3 * 3  # bytes as stored: int8
        assert ckpt.tensor("proj.w_q").nbytes == 6 * 8 // 2  # int4, two per byte
        rows = {row.name: row for row in ckptview.tensor_table(ckpt).rows}
        assert rows["conv.w_q"].layer_kind == "Conv2d" and rows["fc.w_q"].layer_detail == "4×6 (in×out)"


# --- recognition ----------------------------------------------------------------------------------

def test_other_protobufs_are_not_taken_for_onnx(tmp_path: Path) -> None:
    tensor_pb = tmp_path / "input_0.pb"  # onnx test data: a bare TensorProto, starts with dims (field 1) too
    tensor_pb.write_bytes(numpy_helper.from_array(np.ones((2, 3), np.float32), "x").SerializeToString())
    saved_model = tmp_path / "saved_model.pb"  # TF SavedModel: field 1 varint, then a large binary field 2
    saved_model.write_bytes(b"\x08\x01\x12\xa0\x1f" + bytes(range(256)) * 16)
    for path in (tensor_pb, saved_model):
        with pytest.raises(UnsupportedFormatError):
            ckptview.open(path)


# --- hostile files --------------------------------------------------------------------------------

def _model_with_external(folder: Path, location: str) -> Path:
    tensor = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], initializer=[tensor])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def _refused(path: Path, error: type[CkptviewError], match: str) -> str:
    before = path.read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match) as caught:
            with ckptview.open(path) as ckpt:
                for entry in ckpt.tensors():
                    entry.load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    message = str(caught.value)
    assert "\n" not in message
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["info", str(path)]) == 1
    assert len(stderr.getvalue().strip().splitlines()) == 1
    assert path.read_bytes() == before
    return message


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"TOPSECRET" * 100)
    for name, location in (("relative", "../secret.bin"), ("absolute", str(secret)), ("symlink", "link.bin")):
        folder = tmp_path / name
        folder.mkdir()
        if name == "symlink":
            (folder / "link.bin").symlink_to(secret)
        message = _refused(_model_with_external(folder, location), CorruptCheckpointError, "not a file in the model's folder")
        assert "TOPSECRET" not in message


def test_external_data_in_the_hugging_face_cache_is_read_from_its_blob(tmp_path: Path) -> None:
    """The hub's cache holds model.onnx and its data file as links into the repository's blobs/."""
    from test_hostile_round2 import _hub_snapshot

    made = tmp_path / "made"
    made.mkdir()
    (made / "w.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    model = _model_with_external(made, "w.bin")
    snapshot = _hub_snapshot(tmp_path / "hub", "models--org--onnx", {"onnx/model.onnx": model,
                                                                     "onnx/w.bin": made / "w.bin"})
    with ckptview.open(snapshot / "onnx" / "model.onnx") as ckpt:
        assert ckpt.tensor("w").load().flatten().tolist() == list(range(16))


def test_external_data_past_its_file_end_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"\0" * 10)
    _refused(_model_with_external(tmp_path, "w.bin"), CorruptCheckpointError, "cut off or does not belong")
    (tmp_path / "w.bin").unlink()
    _refused(_model_with_external(tmp_path, "w.bin"), CorruptCheckpointError, "cannot be read")


def _model_reading_ranges(folder: Path, ranges: list[tuple[int, int]]) -> Path:
    """A model whose initializers w0, w1, ... read (offset, length) of one data file, written by onnx."""
    (folder / "w.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    tensors = []
    for index, (offset, length) in enumerate(ranges):
        tensor = numpy_helper.from_array(np.zeros(length // 4, np.float32), f"w{index}")
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "w.bin"), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensors.append(tensor)
    nodes = [helper.make_node("Identity", [t.name], [f"y{i}"]) for i, t in enumerate(tensors)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(tensors))]
    path = folder / "model.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [], outputs, initializer=tensors)), str(path))
    return path


def test_initializers_reading_one_range_are_one_storage_and_overlaps_are_refused(tmp_path: Path) -> None:
    """External data written by an exporter does not overlap. Initializers reading the very same bytes
    are one storage, read once by statistics (a thousand of them over one 100 MB range would otherwise
    read 100 GB); ranges that overlap otherwise are refused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    with ckptview.open(_model_reading_ranges(shared, [(0, 128)] * 1000 + [(128, 64)])) as ckpt:
        assert len(ckpt.tensors()) == 1001 and len(ckpt.unique_tensors()) == 2
        assert ckpt.tensor("w999").load().tolist() == list(range(32))
        rows = {row.name: row for row in ckptview.stats(ckpt, progress=False).tensors}
        assert rows["w999"].mean == rows["w0"].mean == 15.5
    overlapping = tmp_path / "overlapping"
    overlapping.mkdir()
    message = _refused(_model_reading_ranges(overlapping, [(0, 128), (64, 128)]), CorruptCheckpointError,
                       "read overlapping bytes of their external data file")
    assert "'w0' and 'w1'" in message


def test_truncated_and_lying_protobufs(cnn_onnx: Path, tmp_path: Path) -> None:
    data = cnn_onnx.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, TruncatedCheckpointError, "cut off")

    # raw_data of conv1.weight: tag 0x4a, length 864 as the varint e0 06; claim 0x7f more bytes
    weight = numpy_helper.to_array(onnx_tensors(cnn_onnx)["conv1.weight"]).tobytes()
    at = data.index(b"\x4a\xe0\x06" + weight)
    lying = tmp_path / "lying.onnx"
    lying.write_bytes(data[:at + 1] + b"\xff\x07" + data[at + 3:])
    _refused(lying, CorruptCheckpointError, "a length field lies")

    huge = tmp_path / "huge.onnx"  # a dims count of 2^62 elements: refused before any allocation
    model = onnx.load(str(cnn_onnx))
    model.graph.initializer[0].dims[:] = [1 << 31, 1 << 31]
    onnx.save(model, str(huge))
    _refused(huge, CorruptCheckpointError, "need")


# --- CLI and explorer -------------------------------------------------------------------------------

def test_every_cli_command_and_explorer_tab_on_an_onnx_file(cnn_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = check_every_command(cnn_onnx)
    assert info["format"] == "onnx" and info["details"]["op_types"]["Conv"] == 2
    assert cli_main(["bn", str(cnn_onnx), "--json"]) == 0
    assert "fusion_hint" in capsys.readouterr().out
    check_every_tab(cnn_onnx)


def test_open_reads_no_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), f"layers.{i}.weight")
             for i in range(16)]  # 64 MiB embedded
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"layers.{i}.weight"], [f"h{i}"]) for i in range(16)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("h15", TensorProto.FLOAT, [1, 1024])], initializer=inits)
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph), str(path))

    def bytes_read() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    before = bytes_read()
    with ckptview.open(path) as ckpt:
        listing = [(entry.name, entry.shape) for entry in ckpt.tensors()]
        read = bytes_read() - before
        assert len(listing) == 16 and read < 8 << 20, read
        assert torch.equal(ckpt.tensor("layers.3.weight").load(), torch.from_numpy(numpy_helper.to_array(inits[3])))


def test_a_varint_tensor_streams_in_chunks(tmp_path: Path) -> None:
    values = np.arange(100_000, dtype=np.int64) * 7 - 3
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("ids", TensorProto.INT64, [100_000])],
                              initializer=[helper.make_tensor("ids", TensorProto.INT64, [100_000], values.tolist())])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with ckptview.open(path) as ckpt:
        chunks = list(ckpt.tensor("ids").iter_chunks(64 * 1024))
    assert len(chunks) > 10 and np.array_equal(torch.cat(chunks).numpy(), values)


def test_a_constant_whose_tensor_proto_is_damaged_fails_in_our_words() -> None:
    # a fuzz finding (109 bytes): a tensor stored as a TensorProto whose protobuf bytes do not parse.
    # Loading it (or its statistics) raised protobuf's own DecodeError, a raw traceback
    path = Path(__file__).parent / "fuzz_findings" / "onnx-constant-tensor-proto-corrupt.onnx"
    before = path.read_bytes()
    with ckptview.open(path) as ckpt:
        for entry in ckpt.tensors():
            with pytest.raises(CkptviewError, match="not a valid TensorProto") as failed:
                entry.load()
            assert "\n" not in str(failed.value)
        with pytest.raises(CkptviewError, match="not a valid TensorProto"):
            ckptview.stats(ckpt, progress=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(["stats", str(path)]) == 1
    assert path.read_bytes() == before


def test_an_initializer_whose_values_do_not_fill_its_dims_fails_in_our_words() -> None:
    # a fuzz finding (a mutated copy of the fuzzer's ONNX seed): initializer `w` of dims [2, 3] whose typed
    # values field is there but empty. Loading it (or its statistics) raised numpy's "cannot reshape
    # array of size 0" from onnx.numpy_helper.to_array, a raw traceback
    path = Path(__file__).parent / "fuzz_findings" / "onnx-typed-values-short-of-dims.onnx"
    before = path.read_bytes()
    with ckptview.open(path) as ckpt:
        with pytest.raises(CkptviewError, match="do not fill its dims \\[2, 3\\]") as failed:
            ckpt.tensor("w").load()
        assert "\n" not in str(failed.value)
        with pytest.raises(CkptviewError, match="do not fill its dims"):
            ckptview.stats(ckpt, progress=False)
    assert path.read_bytes() == before
