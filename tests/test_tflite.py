"""
TFLite models: the float and int8 fixtures converted by TensorFlow (tests/fixtures/make_tf_fixtures.py)
checked against what TFLite's interpreter reported, and models built here with the flatbuffers
builder for the layouts the converter writes only for huge models (buffers after the flatbuffer)
and for hostile files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import torch

tflite = pytest.importorskip("tflite")

from format_checks import check_every_command, check_every_tab, cli

import ckptview
from ckptview.errors import CkptviewError, CorruptCheckpointError, TensorDataError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tf"


def report(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ("float.tflite", "int8.tflite"))
def test_constants_equal_what_the_interpreter_reported(name: str) -> None:
    expected = {row["name"]: row for row in report(name)["tensors"]}
    with ckptview.open(FIXTURES / name) as ckpt:
        assert ckpt.format == "tflite"
        entries = ckpt.tensors()
        assert len(entries) == 9
        for entry in entries:
            row = expected[entry.name]
            assert list(entry.shape) == row["shape"]
            params = entry.info.encoding_params
            if row["scales"] and row["dtype"] != "float32":
                # stored integers with a scale: listed as their stored type, loaded dequantized
                assert entry.encoding == row["dtype"] and entry.dtype_name == "float32"
                assert params["channels"] == len(row["scales"])
                assert params["quantized_dimension"] == row["quantized_dimension"]
                assert np.array_equal(np.float32(params["scale"]), np.float32(row["scales"][:16]))
                assert params["zero_point"] == row["zero_points"][:16]
                values = row["dequantized"]
            else:
                assert entry.encoding is None and entry.dtype_name == row["dtype"]
                values = row["stored"]
            wanted = torch.from_numpy(np.asarray(values["values"], dtype=values["dtype"]).reshape(values["shape"]))
            assert torch.equal(entry.load(), wanted), entry.name
            assert torch.equal(torch.cat(list(entry.iter_chunks(chunk_bytes=64))), wanted.reshape(-1)), entry.name
        info = report(name)
        assert [(t["name"], t["shape"], t["dtype"]) for t in ckpt.details["inputs"]] == \
            [(t["name"], t["shape"], t["dtype"]) for t in info["inputs"]]
        assert [t["name"] for t in ckpt.details["outputs"]] == [t["name"] for t in info["outputs"]]
        # the converter's serving signature maps the Keras input's name to the interpreter's input tensor
        index_of = {row["name"]: row["index"] for row in info["tensors"]}
        serving = ckpt.details["signatures"]["serving_default"]
        assert serving["inputs"] == {"image": index_of[info["inputs"][0]["name"]]}
        assert list(serving["outputs"].values()) == [index_of[info["outputs"][0]["name"]]]
        # the interpreter adds DELEGATE nodes when XNNPACK takes over operators; the file has none
        assert ckpt.details["op_counts"] == {op: n for op, n in info["op_counts"].items() if op != "DELEGATE"}


def test_conversion_kept_the_dense_weights() -> None:
    keras = {row["name"]: row for row in report("keras3_trained.h5")["weights"]}
    kernel = np.asarray(keras["dense_1/kernel"]["values"], np.float32).reshape(keras["dense_1/kernel"]["shape"])
    with ckptview.open(FIXTURES / "float.tflite") as ckpt:
        rows = {row.name: row for row in ckptview.tensor_table(ckpt).rows}
        weight = ckpt.tensor("small_cnn_1/dense_1_1/MatMul")
        assert torch.equal(weight.load(), torch.from_numpy(kernel.T.copy()))  # stored [out, in]
        assert rows[weight.name].layer_kind == "Linear"
        assert rows["small_cnn_1/conv_1/convolution"].layer_kind == "Conv2d"
        report_ = ckptview.batchnorm_checks(ckpt)
        assert not report_.layers  # folded into the convolution by the converter


# --- models built with the flatbuffers builder ----------------------------------------------------

def build_model(weight: np.ndarray, *, scales: list[float] | None = None, zero_points: list[int] | None = None,
                axis: int = 0, external_offset: int | None = None, sparse: bool = False, subgraphs: int = 1,
                repeats: int = 0) -> bytes:
    """A one-operator model: FULLY_CONNECTED(input, weight). With `external_offset` the weight's buffer
    is stored after the flatbuffer (offset/size), as the converter writes models over 2 GB; `repeats`
    more entries of the tensor list name the weight's table again (a crafted file)."""
    types = {np.dtype(np.float32): tflite.TensorType.FLOAT32, np.dtype(np.int8): tflite.TensorType.INT8,
             np.dtype(np.int16): tflite.TensorType.INT16, np.dtype(np.uint8): tflite.TensorType.UINT8}
    b = flatbuffers.Builder(1024)
    raw = weight.tobytes()

    def int_vector(start: object, values: list[int]) -> int:
        start(b, len(values))
        for value in reversed(values):
            b.PrependInt32(value)
        return b.EndVector()

    buffers = []
    tflite.BufferStart(b)
    buffers.append(tflite.BufferEnd(b))
    if external_offset is None:
        data = b.CreateByteVector(raw)
        tflite.BufferStart(b)
        tflite.BufferAddData(b, data)
    else:
        tflite.BufferStart(b)
        tflite.BufferAddOffset(b, external_offset)
        tflite.BufferAddSize(b, len(raw))
    buffers.append(tflite.BufferEnd(b))

    quant = None
    if scales is not None:
        tflite.QuantizationParametersStartScaleVector(b, len(scales))
        for scale in reversed(scales):
            b.PrependFloat32(scale)
        scale_vector = b.EndVector()
        tflite.QuantizationParametersStartZeroPointVector(b, len(zero_points))
        for zero in reversed(zero_points):
            b.PrependInt64(zero)
        zero_vector = b.EndVector()
        tflite.QuantizationParametersStart(b)
        tflite.QuantizationParametersAddScale(b, scale_vector)
        tflite.QuantizationParametersAddZeroPoint(b, zero_vector)
        tflite.QuantizationParametersAddQuantizedDimension(b, axis)
        quant = tflite.QuantizationParametersEnd(b)

    sparsity = None
    if sparse:
        tflite.SparsityParametersStart(b)
        sparsity = tflite.SparsityParametersEnd(b)
    subgraph_offsets = []
    for _ in range(subgraphs):  # each subgraph uses the same weight buffer, as TFLite shares constants
        tensors = []
        for name, shape, dtype, buffer in (("x", [1, weight.shape[1]], tflite.TensorType.FLOAT32, 0),
                                           ("fc/weight", list(weight.shape), types[weight.dtype], 1),
                                           ("y", [1, weight.shape[0]], tflite.TensorType.FLOAT32, 0)):
            name_offset = b.CreateString(name)
            shape_vector = int_vector(tflite.TensorStartShapeVector, shape)
            tflite.TensorStart(b)
            tflite.TensorAddName(b, name_offset)
            tflite.TensorAddShape(b, shape_vector)
            tflite.TensorAddType(b, dtype)
            tflite.TensorAddBuffer(b, buffer)
            if buffer and quant is not None:
                tflite.TensorAddQuantization(b, quant)
            if buffer and sparsity is not None:
                tflite.TensorAddSparsity(b, sparsity)
            tensors.append(tflite.TensorEnd(b))
        tensors += [tensors[1]] * repeats
        tflite.SubGraphStartTensorsVector(b, len(tensors))
        for tensor in reversed(tensors):
            b.PrependUOffsetTRelative(tensor)
        tensor_vector = b.EndVector()
        op_inputs = int_vector(tflite.OperatorStartInputsVector, [0, 1, -1])
        op_outputs = int_vector(tflite.OperatorStartOutputsVector, [2])
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, 0)
        tflite.OperatorAddInputs(b, op_inputs)
        tflite.OperatorAddOutputs(b, op_outputs)
        operator = tflite.OperatorEnd(b)
        tflite.SubGraphStartOperatorsVector(b, 1)
        b.PrependUOffsetTRelative(operator)
        operators = b.EndVector()
        inputs, outputs = int_vector(tflite.SubGraphStartInputsVector, [0]), int_vector(tflite.SubGraphStartOutputsVector, [2])
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensor_vector)
        tflite.SubGraphAddInputs(b, inputs)
        tflite.SubGraphAddOutputs(b, outputs)
        tflite.SubGraphAddOperators(b, operators)
        subgraph = tflite.SubGraphEnd(b)
        subgraph_offsets.append(subgraph)
    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    opcode = tflite.OperatorCodeEnd(b)
    vectors = {}
    for key, items in (("codes", [opcode]), ("subgraphs", subgraph_offsets), ("buffers", buffers)):
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        vectors[key] = b.EndVector()
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, vectors["codes"])
    tflite.ModelAddSubgraphs(b, vectors["subgraphs"])
    tflite.ModelAddBuffers(b, vectors["buffers"])
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def external_model(weight: np.ndarray, **quant: object) -> bytes:
    """The flatbuffer, then the weight's bytes at a 16-byte aligned offset after it."""
    size = len(build_model(weight, external_offset=1 << 40, **quant))  # the offset's value does not change the size
    offset = -(-size // 16) * 16
    model = build_model(weight, external_offset=offset, **quant)
    assert len(model) == size
    return model + b"\0" * (offset - size) + weight.tobytes()


def test_flex_ops_that_touch_files_are_code() -> None:
    """The converter kept tf.io.write_file as FlexWriteFile (what the fixture script recorded), which a
    TFLite runtime with TensorFlow's select ops runs; FlexAsString beside it is no code."""
    recorded = json.loads((FIXTURES / "flex_writefile.tflite.json").read_text())
    assert "FlexWriteFile" in recorded["ops"] and "not supported" in recorded["tf.lite.Interpreter refused"]
    code, out, _ = cli("scan", str(FIXTURES / "flex_writefile.tflite"))
    assert code == 3, out
    assert "tf.raw_ops.WriteFile as the Flex op FlexWriteFile (writes a file" in out
    with ckptview.open(FIXTURES / "flex_writefile.tflite") as ckpt:
        assert [imp.name.split(" ")[0] for imp in ckpt.pickle_imports] == ["tf.raw_ops.WriteFile"]
        assert ckpt.details["op_counts"]["CUSTOM:FlexAsString"] == 1
    for plain in ("float.tflite", "int8.tflite"):
        assert cli("scan", str(FIXTURES / plain))[0] == 0


def test_buffers_stored_after_the_flatbuffer(tmp_path: Path) -> None:
    weight = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    path = tmp_path / "external.tflite"
    path.write_bytes(external_model(weight))
    with ckptview.open(path) as ckpt:
        (entry,) = ckpt.tensors()
        assert entry.name == "fc/weight" and torch.equal(entry.load(), torch.from_numpy(weight))
        assert ckpt.layers["fc/weight"].kind == "Linear"


@pytest.mark.parametrize("dtype", (np.int8, np.uint8, np.int16))
def test_per_tensor_and_per_channel_dequantization(dtype: type, tmp_path: Path) -> None:
    info = np.iinfo(dtype)
    weight = np.random.default_rng(0).integers(info.min, info.max, (3, 5), dtype=dtype)
    cases = (([0.05], [7], 0), ([0.5, 0.25, 0.125], [1, -2, 3], 0), ([0.1, 0.2, 0.3, 0.4, 0.5], [0] * 5, 1))
    for index, (scales, zeros, axis) in enumerate(cases):
        path = tmp_path / f"q{index}.tflite"
        path.write_bytes(build_model(weight, scales=scales, zero_points=zeros, axis=axis))
        shape = [1, 1]
        if len(scales) > 1:
            shape[axis] = len(scales)
        expected = (np.float32(scales).astype(np.float64).reshape(shape)
                    * (weight.astype(np.int64) - np.asarray(zeros).reshape(shape))).astype(np.float32)
        with ckptview.open(path) as ckpt:
            entry = ckpt.tensor("fc/weight")
            assert entry.encoding == np.dtype(dtype).name and entry.nbytes == weight.nbytes
            assert torch.equal(entry.load(), torch.from_numpy(expected))
            assert torch.equal(torch.cat(list(entry.iter_chunks(chunk_bytes=8))), torch.from_numpy(expected).reshape(-1))


def test_subgraphs_sharing_a_buffer(tmp_path: Path) -> None:
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "two.tflite"
    path.write_bytes(build_model(weight, subgraphs=2))
    with ckptview.open(path) as ckpt:
        assert [e.name for e in ckpt.tensors()] == ["fc/weight", "subgraph1.fc/weight"]
        assert len(ckpt.details["subgraphs"]) == 2 and ckpt.details["op_counts"] == {"FULLY_CONNECTED": 2}
        # one buffer, two tensors: counted once, as tied weights are
        assert len(ckpt.unique_tensors()) == 1 and ckpt.total_bytes == weight.nbytes
        assert torch.equal(ckpt.tensor("subgraph1.fc/weight").load(), torch.from_numpy(weight))


def test_buffers_over_overlapping_bytes_are_refused(tmp_path: Path) -> None:
    """Tensors that share data share a buffer index; distinct buffers over one range (each reading the
    same 100 MB, say) are refused, as the converter writes each buffer's data once."""
    b = flatbuffers.Builder(1024)
    data = b.CreateByteVector(np.arange(12, dtype=np.float32).tobytes())
    tflite.BufferStart(b)
    buffers = [tflite.BufferEnd(b)]  # buffer 0: empty, as the converter writes it
    for _ in range(2):  # two buffer tables, one data vector
        tflite.BufferStart(b)
        tflite.BufferAddData(b, data)
        buffers.append(tflite.BufferEnd(b))
    tensors = []
    for index in (1, 2):
        name = b.CreateString(f"w{index}")
        tflite.TensorStartShapeVector(b, 1)
        b.PrependInt32(12)
        shape = b.EndVector()
        tflite.TensorStart(b)
        tflite.TensorAddName(b, name)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(b, index)
        tensors.append(tflite.TensorEnd(b))
    tflite.SubGraphStartTensorsVector(b, 2)
    for tensor in reversed(tensors):
        b.PrependUOffsetTRelative(tensor)
    tensor_vector = b.EndVector()
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensor_vector)
    subgraph = tflite.SubGraphEnd(b)
    vectors = []
    for items in ([subgraph], buffers):
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        vectors.append(b.EndVector())
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddSubgraphs(b, vectors[0])
    tflite.ModelAddBuffers(b, vectors[1])
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    path = tmp_path / "overlap.tflite"
    path.write_bytes(bytes(b.Output()))
    with pytest.raises(CorruptCheckpointError, match="buffers 1 and 2 keep their data in overlapping bytes"):
        ckptview.open(path)


def test_sparse_tensors_are_listed_not_decoded(tmp_path: Path) -> None:
    path = tmp_path / "sparse.tflite"
    path.write_bytes(build_model(np.arange(6, dtype=np.float32).reshape(2, 3), sparse=True))
    with ckptview.open(path) as ckpt:
        (entry,) = ckpt.tensors()
        assert entry.layout == "unsupported" and entry.nbytes == 24
        with pytest.raises(TensorDataError, match="sparse TFLite tensor"):
            entry.load()


# --- hostile files ------------------------------------------------------------------------------

def refused(path: Path, error: type[CkptviewError], match: str) -> None:
    before = path.read_bytes()
    with pytest.raises(error, match=match) as caught, ckptview.open(path) as ckpt:
        for entry in ckpt.tensors():
            entry.load()
    assert "\n" not in str(caught.value)
    code, _, err = cli("info", str(path))
    assert code == 1 and err.count("\n") == 1, err
    assert path.read_bytes() == before


def test_buffer_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    weight = np.ones((4, 6), np.float32)
    path = tmp_path / "past.tflite"
    path.write_bytes(external_model(weight)[:-8])
    refused(path, CorruptCheckpointError, "but the file ends at byte")
    path.write_bytes(build_model(weight, external_offset=1 << 40))
    refused(path, CorruptCheckpointError, "but the file ends at byte")


def test_a_tensor_list_naming_one_table_many_times_is_refused_at_once(tmp_path: Path) -> None:
    """4 bytes an entry: a crafted 4 MB file listed one tensor a million times, ~8 µs of the bindings'
    Python each (7.7 s; a 400 MB one 13 minutes). The converter writes each table once."""
    path = tmp_path / "repeated.tflite"
    path.write_bytes(build_model(np.ones((4, 3), np.float32), repeats=100_000))
    with pytest.raises(CorruptCheckpointError, match=r"subgraph 0's tensor list names the same entry more than "
                                                     r"once \(100,000 repeats among 100,003 entries\)"):
        ckptview.open(path)
    path.write_bytes(build_model(np.ones((4, 3), np.float32)))
    with ckptview.open(path) as ckpt:
        assert [entry.name for entry in ckpt.tensors()] == ["fc/weight"]


def test_damaged_models_are_refused(tmp_path: Path) -> None:
    weight = np.ones((4, 6), np.float32)
    bad_scales = tmp_path / "scales.tflite"
    bad_scales.write_bytes(build_model(weight.astype(np.int8), scales=[0.1, 0.2], zero_points=[0, 0], axis=0))
    refused(bad_scales, CorruptCheckpointError, "quantization parameters are damaged")

    data = (FIXTURES / "int8.tflite").read_bytes()
    for cut in (len(data) // 2, 64, 12):
        path = tmp_path / f"cut{cut}.tflite"
        path.write_bytes(data[:cut])
        refused(path, CorruptCheckpointError, "cut off")


def test_every_cli_command_and_explorer_tab(tmp_path: Path) -> None:
    path = tmp_path / "int8.tflite"
    shutil.copy(FIXTURES / "int8.tflite", path)
    info = check_every_command(path)
    assert info["format"] == "tflite" and info["details"]["op_counts"]["FULLY_CONNECTED"] == 2
    check_every_tab(path)
