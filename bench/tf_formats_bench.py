"""
Keras HDF5, TFLite and TensorFlow checkpoints of the same weights (~530 MB: 180 blocks of a
3×3×256×320 float32 convolution and a 320-channel BatchNorm), side by side in one run:

- open + list every tensor (name, shape, dtype): `ckptview.open` against `h5py` walking every
  dataset's shape (Keras .h5) and the `tflite` FlatBuffer bindings listing every tensor (.tflite);
- `ckptview.stats` over the .tflite, the TF checkpoint (its crc32c checked on every full read) and
  the same weights as safetensors, page cache warm.

The TF checkpoint needs TensorFlow to be written: pass `--tf-python /tmp/tfvenv/bin/python` (a
throwaway venv with tensorflow-cpu, as for tests/fixtures/make_tf_fixtures.py); without it that
row is skipped. Rounds interleaved, median of --repeat.

    python bench/tf_formats_bench.py [--dir /tmp/somewhere] [--repeat 5] [--tf-python PATH]
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCKS = 180
KERNEL = (3, 3, 256, 320)


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for block in range(BLOCKS):
        out[f"block_{block}/conv/kernel"] = rng.standard_normal(KERNEL, dtype=np.float32)
        out[f"block_{block}/bn/gamma"] = rng.standard_normal(KERNEL[-1], dtype=np.float32)
        out[f"block_{block}/bn/beta"] = rng.standard_normal(KERNEL[-1], dtype=np.float32)
        out[f"block_{block}/bn/moving_mean"] = rng.standard_normal(KERNEL[-1], dtype=np.float32)
        out[f"block_{block}/bn/moving_variance"] = rng.random(KERNEL[-1], dtype=np.float32) + 0.5
    return out


def write_h5(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        layers = [f"block_{b}" for b in range(BLOCKS)]
        f.attrs["layer_names"] = [name.encode() for name in layers]
        for layer in layers:
            group = f.create_group(layer)
            names = [name for name in arrays if name.startswith(layer + "/")]
            group.attrs["weight_names"] = [f"{name}:0".encode() for name in names]
            for name in names:
                group.create_dataset(f"{name}:0", data=arrays[name])


def write_tflite(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import flatbuffers
    import tflite

    b = flatbuffers.Builder(1 << 20)
    items = list(arrays.items())
    buffers = []
    tflite.BufferStart(b)
    buffers.append(tflite.BufferEnd(b))
    for _, array in items:
        data = b.CreateByteVector(array.tobytes())
        tflite.BufferStart(b)
        tflite.BufferAddData(b, data)
        buffers.append(tflite.BufferEnd(b))
    tensors = []
    for index, (name, array) in enumerate(items):
        name_offset = b.CreateString(name)
        tflite.TensorStartShapeVector(b, array.ndim)
        for dim in reversed(array.shape):
            b.PrependInt32(dim)
        shape = b.EndVector()
        tflite.TensorStart(b)
        tflite.TensorAddName(b, name_offset)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(b, index + 1)
        tensors.append(tflite.TensorEnd(b))
    tflite.SubGraphStartTensorsVector(b, len(tensors))
    for tensor in reversed(tensors):
        b.PrependUOffsetTRelative(tensor)
    tensor_vector = b.EndVector()
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensor_vector)
    subgraph = tflite.SubGraphEnd(b)
    vectors = {}
    for key, offsets in (("subgraphs", [subgraph]), ("buffers", buffers)):
        b.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            b.PrependUOffsetTRelative(offset)
        vectors[key] = b.EndVector()
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddSubgraphs(b, vectors["subgraphs"])
    tflite.ModelAddBuffers(b, vectors["buffers"])
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    path.write_bytes(b.Output())


def write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({name.replace("/", "."): array for name, array in arrays.items()}, str(path))


_TF_WRITER = r"""
import sys, numpy as np, tensorflow as tf
sys.path.insert(0, sys.argv[2])
from tf_formats_bench import weights
module = tf.Module()
module.vars = [tf.Variable(array, name=name) for name, array in weights().items()]
tf.train.Checkpoint(model=module).write(sys.argv[1])
"""


def list_h5py(path: Path) -> int:
    import h5py

    shapes = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: shapes.append((name, obj.shape, obj.dtype)) if isinstance(obj, h5py.Dataset)
                     else None)
    return len(shapes)


def list_tflite(path: Path) -> int:
    import tflite

    with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = tflite.Model.GetRootAs(data, 0)
        listed = []
        for g in range(model.SubgraphsLength()):
            graph = model.Subgraphs(g)
            for t in range(graph.TensorsLength()):
                tensor = graph.Tensors(t)
                listed.append((tensor.Name(), tuple(tensor.ShapeAsNumpy().tolist()), tensor.Type(),
                               model.Buffers(tensor.Buffer()).DataLength()))
        del model, graph, tensor
        return len(listed)


def list_ckptview(path: Path) -> int:
    import ckptview

    with ckptview.open(path) as ckpt:
        return len([(e.name, e.shape, e.dtype_name) for e in ckpt.tensors()])


def stats_ckptview(path: Path) -> int:
    import ckptview

    with ckptview.open(path) as ckpt:
        return len(ckptview.stats(ckpt, progress=False).tensors)


def timed(function, path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    count = function(path)
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the files (default: a temp dir, removed afterwards)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tf-python", help="a python with tensorflow, to write the TF checkpoint")
    args = parser.parse_args()
    import ckptview  # noqa: F401  (imported before any timer)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        arrays = weights()
        total = sum(a.nbytes for a in arrays.values())
        files = {"keras .h5": folder / "model.h5", "tflite": folder / "model.tflite",
                 "safetensors": folder / "model.safetensors"}
        write_h5(files["keras .h5"], arrays)
        write_tflite(files["tflite"], arrays)
        write_safetensors(files["safetensors"], arrays)
        del arrays
        if args.tf_python:
            prefix = folder / "tf" / "ckpt"
            subprocess.run([args.tf_python, "-c", _TF_WRITER, str(prefix), str(Path(__file__).parent)], check=True,
                           capture_output=True)
            files["tf checkpoint"] = prefix.with_name("ckpt.index")
        for name, path in files.items():
            size = sum(p.stat().st_size for p in path.parent.glob(path.stem + "*")) if name == "tf checkpoint" \
                else path.stat().st_size
            print(f"{name:<14} {size / 2**20:8.1f} MiB  ({BLOCKS * 5} tensors)")
            with open(path, "rb") as stream:  # warm the page cache: this compares parsing and reading, not the disk
                while stream.read(16 << 20):
                    pass
        print()

        listing = {("keras .h5", "ckptview.open + list"): (list_ckptview, files["keras .h5"]),
                   ("keras .h5", "h5py: every dataset's shape"): (list_h5py, files["keras .h5"]),
                   ("tflite", "ckptview.open + list"): (list_ckptview, files["tflite"]),
                   ("tflite", "tflite bindings: every tensor"): (list_tflite, files["tflite"])}
        times: dict[tuple[str, str], list[float]] = {key: [] for key in listing}
        for _ in range(args.repeat):
            for key, (function, path) in listing.items():
                times[key].append(timed(function, path)[0])
        print(f"{'open + list':<14} {'method':<32} {'ms':>8}")
        for (fmt, method), values in times.items():
            print(f"{fmt:<14} {method:<32} {statistics.median(values) * 1000:8.1f}")

        stats_files = {name: path for name, path in files.items() if name != "keras .h5"} | {"keras .h5": files["keras .h5"]}
        stats_times: dict[str, list[float]] = {name: [] for name in stats_files}
        stats_ckptview(files["safetensors"])  # the statistics kernels compile (or load from their cache) once
        for _ in range(args.repeat):
            for name, path in stats_files.items():
                stats_times[name].append(timed(stats_ckptview, path)[0])
        base = statistics.median(stats_times["safetensors"])
        print(f"\n{'ckptview.stats':<14} {'seconds':>8} {'GB/s':>6} {'vs safetensors':>15}")
        for name, values in stats_times.items():
            seconds = statistics.median(values)
            print(f"{name:<14} {seconds:8.3f} {total / seconds / 1e9:6.2f} {seconds / base:14.2f}×")


if __name__ == "__main__":
    sys.exit(main())
