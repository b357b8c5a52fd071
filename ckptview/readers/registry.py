"""
The formats ckptview reads, one `Format` record each, tried in order on a file's content.

A record says how to recognise the content (from a `Probe`: the first bytes, the size, and for
zip archives the member names) and names the function that reads it as "module:function", so
recognising a file imports nothing heavy: only the winning reader's module is imported. The
"not a checkpoint" message and the README's format table are built from these records.

Adding a format is one reader module plus one record here (see docs/DEVELOPING.md). A record
lives here and not in its module because importing every reader to ask it would cost every
`ckptview` command the import of onnx, gguf, h5py, ... .
"""

from __future__ import annotations

import importlib
import os
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptview.readers.model import Checkpoint

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
HEAD_BYTES = 4096


class Probe:
    """What recognisers look at: a file's first `HEAD_BYTES`, its size, and (zips) its member names."""

    def __init__(self, path: str, head: bytes, size: int) -> None:
        self.path = path
        self.head = head
        self.size = size

    @cached_property
    def zip_names(self) -> tuple[str, ...]:
        """The member names of a zip archive; empty when the file is not one or its directory is unreadable
        (the torch-zip reader, the fallback for zips, then says what is wrong)."""
        if not self.head.startswith(ZIP_MAGIC):
            return ()
        try:
            with zipfile.ZipFile(self.path) as archive:
                return tuple(archive.namelist())
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError):
            return ()


@dataclass(frozen=True)
class Format:
    """
    One file format ckptview reads.

    Attributes:
        name: `Checkpoint.format` of what the reader returns (a reader may return a refinement,
            e.g. "torchscript" from the torch-zip reader).
        label: what it is for people, with the usual file names, for the "not a checkpoint" message.
        recognise: True when the probe's content is this format (content only, never the extension).
        reader: "module:function" taking `(path, size, *, trust)` and returning a `Checkpoint`.
        rows: the README table's rows for it: (what you have, how ckptview reads it).
    """

    name: str
    label: str
    recognise: Callable[[Probe], bool]
    reader: str
    rows: tuple[tuple[str, str], ...]

    def read(self, path: str, size: int, *, trust: bool) -> Checkpoint:
        module_name, _, function = self.reader.partition(":")
        return getattr(importlib.import_module(module_name), function)(path, size, trust=trust)


def _is_pickle(probe: Probe) -> bool:
    head = probe.head
    if head[:1] == b"\x80":
        return len(head) >= 2 and head[1] <= 5  # PROTO: the C unpickler reads protocols 0 to 5
    # protocols 0 and 1 write no PROTO opcode (a legacy torch.save with pickle_protocol=1 starts "L1195...")
    from ckptview.readers.pickle_opcodes import reads_as_pickle

    return reads_as_pickle(head, whole=probe.size <= len(head), any_global=False)


SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


def _is_safetensors(probe: Probe) -> bool:
    head = probe.head
    if len(head) < 9 or probe.size < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= header_len


def _is_json(probe: Probe) -> bool:
    return probe.head.lstrip()[:1] == b"{"


def _is_zip(probe: Probe) -> bool:
    return probe.head.startswith(ZIP_MAGIC)


def _first_member(head: bytes) -> bytes | None:
    """The name of a zip's first member, from its local header (None when `head` is no zip): read
    before the directory, which for a large torch zip lists 20,000 names."""
    if not head.startswith(ZIP_MAGIC) or len(head) < 30:
        return None
    (name_length,) = struct.unpack("<H", head[26:28])
    return head[30:30 + name_length]


def _is_gguf(probe: Probe) -> bool:
    return probe.head.startswith(b"GGUF")


NPY_MAGIC = b"\x93NUMPY"


def _is_npy(probe: Probe) -> bool:
    return probe.head.startswith(NPY_MAGIC)


def _is_npz(probe: Probe) -> bool:
    # numpy.savez names every member "<key>.npy"; a torch zip never does. The first member's local
    # header says so before the zip's directory (20,000 names for a large torch zip) is read.
    first = _first_member(probe.head)
    if first is None or not first.endswith(b".npy"):
        return False
    names = probe.zip_names
    return bool(names) and all(name.endswith(".npy") for name in names)


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(probe: Probe) -> bool:
    return probe.head.startswith(HDF5_MAGIC)


def _is_keras_zip(probe: Probe) -> bool:
    # Keras 3 writes metadata.json, config.json, model.weights.h5 in that order: only an archive whose
    # first member is one of them costs reading the zip's directory.
    if _first_member(probe.head) not in (b"metadata.json", b"config.json", b"model.weights.h5", b"assets/"):
        return False
    from ckptview.readers.remote import is_url

    if is_url(probe.path):  # its directory is not read by URL: the first member decides (the reader says why not)
        return True
    return {"config.json", "model.weights.h5"} <= set(probe.zip_names)


def _is_tflite(probe: Probe) -> bool:
    return probe.head[4:8] == b"TFL3"  # the FlatBuffer file identifier TFLite's schema declares


def _is_tf_index(probe: Probe) -> bool:
    # The first entry is the bundle header under the empty key (no shared, no unshared key bytes), its
    # value a BundleHeaderProto starting with num_shards (field 1, varint: 0x08); the table's footer
    # ends in LevelDB's magic. Either suffices, so a cut-off index is still told it was cut off.
    head = probe.head
    if head[:2] != b"\x00\x00" or len(head) < 4:
        return False
    if head[2] < 0x80 and head[3] == 0x08:
        return True
    from ckptview.readers.tf_checkpoint import looks_like_tensor_bundle_index

    return looks_like_tensor_bundle_index(probe.head, probe.size, probe.path)


def _is_tf_checkpoint_state(probe: Probe) -> bool:
    return probe.head.startswith(b"model_checkpoint_path:")


def _is_saved_model(probe: Probe) -> bool:
    """saved_model_schema_version 1 (field 1), then the first MetaGraphDef (field 2) opening with its
    MetaInfoDef (field 1): `08 01 12 <length> 0a`."""
    head = probe.head
    if not head.startswith(b"\x08\x01\x12"):
        return False
    pos = 3
    while pos < len(head) and head[pos] & 0x80:
        pos += 1
    return pos + 1 < len(head) and head[pos + 1] == 0x0A


def _is_torchscript(probe: Probe) -> bool:
    # torch.save writes data.pkl first and jit.save its tensors first: only an archive not opening
    # with data.pkl costs reading the zip's directory for its constants.pkl and code/ files.
    first = _first_member(probe.head)
    if first is None or first.endswith(b"data.pkl"):
        return False
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in probe.zip_names)


def _is_pt2(probe: Probe) -> bool:
    # torch.export.save writes the weights first: again only an archive not opening with data.pkl
    # costs reading the directory, for its `<folder>/archive_format`
    first = _first_member(probe.head)
    if first is None or first.endswith(b"data.pkl"):
        return False
    from ckptview.readers.pt2_archive import is_pt2_archive

    return is_pt2_archive(probe.zip_names)


TENSORRT_SIGNATURES = (b"ptrt", b"ftrt")  # as netron's source/tensorrt.js recognises engines


def _is_tensorrt(probe: Probe) -> bool:
    head = probe.head
    if head[:4] in TENSORRT_SIGNATURES:
        return True
    # Ultralytics (and others) prefix the engine with a little-endian uint32 length and that many bytes of JSON
    if len(head) < 8 or head[3] != 0 or head[4:5] != b"{":
        return False
    start = 4 + struct.unpack("<I", head[:4])[0]
    if start + 4 > probe.size:
        return False
    if start + 4 <= len(head):
        return head[start:start + 4] in TENSORRT_SIGNATURES
    with open(probe.path, "rb") as stream:
        stream.seek(start)
        return stream.read(4) in TENSORRT_SIGNATURES


def _is_onnx(probe: Probe) -> bool:
    # Protobuf writers emit fields in number order, so a ModelProto starts with ir_version (field 1,
    # a varint: byte 0x08); the fields after it decide (readers/onnx_file.py, which imports no onnx).
    if probe.head[:1] != b"\x08":
        return False
    from ckptview.readers.onnx_file import looks_like_onnx

    return looks_like_onnx(probe.head, probe.size)


# Tried in order. safetensors goes before the pickle formats: a header length whose low bytes are
# 0x80 0x02..0x05 makes a real safetensors file start like a pickle (its reader also scans that
# reading of the bytes, which torch.load would take for a file not named .safetensors). Zips are
# told apart by their members (`probe.zip_names`): a zip format goes before torch-zip, the last zip format tried, whose message says what a foreign zip holds.
FORMATS: list[Format] = [
    Format("gguf", "GGUF files (llama.cpp)", _is_gguf, "ckptview.readers.gguf_file:read_gguf", (
        ("GGUF (llama.cpp, `.gguf`)",
         "header walked by hand: metadata as a table with large arrays (the tokenizer vocabulary) skipped and decoded "
         "only when asked; F32/F16/BF16 read in place, block quants (Q4_0 … Q6_K) dequantized by `gguf.quants`"),
    )),
    Format("npy", "NumPy .npy arrays", _is_npy, "ckptview.readers.numpy_file:read_npy", (
        ("NumPy `.npy`", "header parsed by `numpy.lib.format`; data read in place; object arrays' pickles scanned, never loaded"),
    )),
    Format("npz", "NumPy .npz archives", _is_npz, "ckptview.readers.numpy_file:read_npz", (
        ("NumPy `.npz` (`savez`, `savez_compressed`)",
         "each member's header read; stored members read in place, deflated ones inflated in bounded chunks"),
    )),
    Format("keras-h5", "Keras HDF5 models and weights (.h5, .weights.h5)", _is_hdf5,
           "ckptview.readers.keras_file:read_keras_h5", (
               ("Keras HDF5: `model.save(\"m.h5\")`, `save_weights(\"w.h5\")`, Keras 3 `.weights.h5`",
                "read with `h5py`, never Keras: weights in place, names as Keras shows them (`dense_1.kernel`), layer "
                "kinds and BatchNorm statistics recognised, optimizer weights as the training section, model and "
                "training config in `details`; `Lambda` layers and custom objects named as code; external links, "
                "external storage and virtual datasets refused"),
           )),
    Format("tflite", "TFLite models (.tflite)", _is_tflite, "ckptview.readers.tflite_file:read_tflite", (
        ("TFLite (`.tflite`)",
         "FlatBuffer walked with the `tflite` bindings over a memory map, never TensorFlow: constant tensors read in "
         "place (also buffers stored after the flatbuffer), int8/uint8/int16/int32 with per-tensor or per-channel "
         "scale and zero point dequantized on load as TFLite does; subgraphs, inputs/outputs and op counts in "
         "`details`, layers from the operators; Flex ops that touch files (`FlexWriteFile`, …) named as code"),
    )),
    Format("tf-checkpoint", "TensorFlow checkpoints (<prefix>.index with its .data-* shards)", _is_tf_index,
           "ckptview.readers.tf_checkpoint:read_tf_index", (
               ("TensorFlow checkpoint (`<prefix>.index` + `<prefix>.data-NNNNN-of-MMMMM`)",
                "the index's sorted string table and protobuf entries decoded by hand, never TensorFlow; data read in "
                "place from the shards, crc32c checked when a tensor is read whole; names from the object graph "
                "(`dense.kernel`, raw keys in `details`), optimizer slots as the training section (TF1 `Saver` slots too); a missing shard "
                "named"),
           )),
    Format("tf-checkpoint-state", "TensorFlow `checkpoint` state files", _is_tf_checkpoint_state,
           "ckptview.readers.tf_checkpoint:read_checkpoint_state", (
               ("TensorFlow `checkpoint` state file", "opens the latest checkpoint it names and lists the others"),
           )),
    Format("savedmodel", "TensorFlow SavedModels (saved_model.pb, or its folder)", _is_saved_model,
           "ckptview.readers.savedmodel:read_saved_model", (
               ("TensorFlow SavedModel (folder with `saved_model.pb` and `variables/`)",
                "`saved_model.pb` decoded statically, never loaded: serving signatures (inputs/outputs, dtypes, "
                "shapes) and op types per function in `details`; ops that read or write files or call Python "
                "(`ReadFile`, `WriteFile`, `PyFunc`, …, and checkpoint ops such as `SaveV2` outside the model's own "
                "saver) named as code, and so are a Keras 2 SavedModel's `Lambda` layers and custom objects "
                "(`keras_metadata.pb`: `tf.keras.models.load_model` runs them); the variables read as a TF checkpoint"),
           )),
    Format("keras", "Keras 3 .keras archives", _is_keras_zip, "ckptview.readers.keras_file:read_keras_zip", (
        ("Keras 3 `.keras` archive",
         "`config.json` and `metadata.json` read, `model.weights.h5` read inside the archive without extracting it "
         "(in place when stored); vars named from the config's layer classes"),
    )),
    Format("tensorrt", "TensorRT engines (recognised, to say what to open instead)", _is_tensorrt,
           "ckptview.readers.tensorrt:read_engine", (
               ("TensorRT engine (`.engine`, `.plan`, also with Ultralytics' JSON prefix)",
                "recognised and explained: compiled kernels for one GPU and TensorRT version hold no weight table; "
                "open the ONNX or checkpoint it was built from"),
           )),
    Format("pt2", "torch.export programs (.pt2)", _is_pt2, "ckptview.readers.pt2_archive:read_pt2", (
        ("torch.export program (`torch.export.save`, `.pt2`)",
         "weights listed from the archive's JSON tables and read in place, never through torch.export.load; op "
         "counts, inputs and example inputs from the graph; what loading would run named as code: symbolic sizes "
         "`sympify` evaluates, guard code, graph calls outside `torch.ops`, pickled payloads, AOTInductor libraries"),
    )),
    Format("torchscript", "TorchScript archives", _is_torchscript, "ckptview.readers.torchscript:read_torchscript", (
        ("TorchScript (`torch.jit.save`)",
         "weights listed from the archive, plain tensor attributes told apart by the code's `__parameters__`/"
         "`__buffers__`; `trust=True` loads it to show modules and `forward` code"),
    )),
    Format("torch-zip", "torch.save files (.pt/.pth/.bin/.ckpt, zip or legacy)",
           _is_zip, "ckptview.readers.torch_pickle:read_torch_zip", (
               ("`torch.save` zip (`.pt .pth .bin .ckpt .pth.tar`, torch ≥ 1.6)",
                "parses `data.pkl` with an allow-listed unpickler; tensor bytes stay in the archive until asked for; a "
                "file saved under `torch.serialization.skip_data()` (zeros where the values go) is said to hold none"),
               ("PyTorch Lightning `.ckpt`",
                "state dict, optimizer states, LR schedulers, loops, callbacks, `hyper_parameters` (Namespace/OmegaConf "
                "shown by class and content, not imported)"),
               ("whole pickled `nn.Module` (`torch.save(model)`)",
                "every module's class path and tensors, without importing the classes; `trust=True` loads it"),
               ("DTensor state dicts (FSDP2, tensor parallel) saved with `torch.save`, one file per rank",
                "each DTensor listed as the part the file holds (its local tensor), its placements and global shape "
                "beside it; torch's own DTensor classes are not counted as foreign code"),
           )),
    Format("safetensors", "safetensors files", _is_safetensors, "ckptview.readers.safetensors_file:read_safetensors", (
        ("safetensors", "JSON header only, checked (offsets in range, no overlaps, sizes match shapes, no key "
                        "repeated); every dtype the crate writes (F8 FNUZ and E8M0; F4 as torch's `float4_e2m1fn_x2`, "
                        "as safetensors loads it; F6, which torch has no dtype for, listed as encoded bytes); a file "
                        "`load_file` would refuse (a gap, bytes after the last tensor) is listed and `info` says so"),
    )),
    Format("torch-legacy", "legacy torch.save files and plain pickles", _is_pickle,
           "ckptview.readers.torch_pickle:read_pickle_stream", (
               ("legacy `torch.save` (`_use_new_zipfile_serialization=False`)",
                "every pickle in the stream scanned by the same unpickler; storage offsets from the stream"),
               ("a plain pickle of numpy arrays (Detectron2's model-zoo `.pkl`, `pickle.dump` of a dict)",
                "the same unpickler, numpy's own records checked before numpy sees them; numeric arrays are tensors "
                "(here and inside torch files), strings and objects stay values"),
           )),
    Format("sharded", "*.index.json shard sets", _is_json, "ckptview.readers.directory:read_index_file", (
        ("sharded sets: `model.safetensors.index.json`, `pytorch_model.bin.index.json`, or their folder (also a "
         "snapshot in the Hugging Face hub's cache)",
         "one checkpoint over all shards, each opened lazily and confined to the index's folder; missing/extra "
         "shards and `weight_map` entries absent from their shard are reported; a folder holding the same weights "
         "in both formats (`model.safetensors` beside `pytorch_model.bin`, sharded or not; diffusers' and PEFT's "
         "names too) opens the copy `from_pretrained` loads, the safetensors one, and says so in "
         "`details[\"chosen_from_folder\"]` (`scan` of the folder still judges every file)"),
    )),
    Format("onnx", "ONNX models (.onnx, with external data files)", _is_onnx, "ckptview.readers.onnx_file:read_onnx", (
        ("ONNX (`.onnx`, also with external data)",
         "protobuf walked by hand, no weight read at open: initializers, sparse initializers and `Constant` nodes "
         "(subgraphs too) read in place, external data confined to the model's folder, `DequantizeLinear` weights "
         "dequantized on load; opset, inputs/outputs and op counts in `details`, layers from the graph's nodes"),
    )),
]

# Folders are recognised by their listing, not probed (readers/directory.py).
DIRECTORY_ROWS: tuple[tuple[str, str], ...] = (
    ("`torch.distributed.checkpoint` folder (`.metadata` + `*.distcp`)",
     "the metadata parsed with the same safe unpickler; each item's bytes read in place; items overlapping in a "
     "data file refused (DCP writes each once); a non-tensor item's pickle scanned too (`dcp.load` reads it with "
     "`torch.load(weights_only=False)`); its `.metadata` named alone opens the folder"),
    ("Hugging Face `Trainer` checkpoint folder (`checkpoint-500/`: `trainer_state.json` beside the model)",
     "one training checkpoint: the model file (or sharded set), `optimizer.pt`, `scheduler.pt`, `scaler.pt`, "
     "`rng_state*.pth` and `training_args.bin`, each by its own reader, with epoch, step and the last logged "
     "metrics from `trainer_state.json`; its `output_dir` opens as a run"),
)


def unpickled_by_its_loader(path: str) -> bool:
    """
    Whether the file at `path`, whatever its name, is content `torch.load` or `pickle.load` unpickles:
    a pickle, a zip holding a `data.pkl` or `constants.pkl` (torch.save, TorchScript), or a tar (the
    pre-1.0 torch.save format). Checked from its first bytes (and a zip's directory); False for
    anything unreadable or not a regular file.
    A folder scan judges such files by content: a `model.torchscript` or `weights.pickle` has no
    checkpoint extension, and a gate that skipped it passed a folder holding code.
    """
    try:
        # non-blocking: a named pipe in the folder would otherwise hold the open until something wrote to it
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            return False
        head, size = os.pread(descriptor, HEAD_BYTES, 0), info.st_size
        if head.startswith(ZIP_MAGIC):
            from ckptview.readers.zip_directory import BadZip, directory_bytes

            # the names searched in the directory's bytes, no record made per member: a crafted directory of
            # millions of names costs its bytes, not a zipfile.ZipInfo each. A name that only ends so (a
            # "mydata.pkl") is opened and judged too.
            try:
                directory, _ = directory_bytes(lambda offset, count: os.pread(descriptor, count, offset), size)
            except (BadZip, struct.error):
                return True  # a zip this cannot read may still be one torch reads: opened, it gets its line
            return b"data.pkl" in directory or b"constants.pkl" in directory
    except OSError:
        return False
    finally:
        os.close(descriptor)
    # torch.load also unpickles the members of a pre-1.0 torch.save tar
    return bool(head) and (_is_pickle(Probe(path, head, size)) or head[257:262] == b"ustar")


def find_format(probe: Probe) -> Format | None:
    for fmt in FORMATS:
        if fmt.recognise(probe):
            return fmt
    return None


def supported() -> str:
    """The clause every "not a checkpoint" message ends with."""
    return ("ckptview opens " + ", ".join(fmt.label for fmt in FORMATS)
            + ", torch.distributed.checkpoint directories and Hugging Face Trainer checkpoint folders")


def format_table() -> str:
    """The README's table of formats in Markdown; a test checks the README holds exactly this."""
    rows = [row for fmt in FORMATS for row in fmt.rows] + list(DIRECTORY_ROWS)
    lines = ["| what you have | how ckptview reads it |", "|---|---|"]
    return "\n".join(lines + [f"| {what} | {how} |" for what, how in rows])

