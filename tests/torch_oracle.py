"""
What `torch.load(weights_only=False)` (or DCP's metadata reader, or for .npy/.npz files
`numpy.load(allow_pickle=True)`) would import from a file, observed
by running it: in a throwaway process, with a `pickle_module` whose `find_class` records every
lookup and hands back an inert stand-in instead of the real global (torch's own weights-only
globals excepted, so the load goes as far as it would). Nothing the file names is imported.

`scan` must name a superset of these lookups (less ckptview's allow-list): that is the
differential test of tests/test_hostile_round2.py and of the fuzzer.

Run as `python tests/torch_oracle.py PATH`; prints JSON: {"lookups": [...], "torchscript": bool}.
"""

from __future__ import annotations

import _compat_pickle
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

_LOOKUPS: list[str] = []


class _Inert:
    """Whatever a stand-in is asked, it answers with another stand-in, so unpickling goes on."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> "_Inert":
        return _Inert()

    def __getattr__(self, name: str) -> "_Inert":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


def _normalise(module: str, name: str) -> str:
    # as ckptview's unpickler names a global (Python 2 names mapped as pickle's fix_imports does)
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _recording_module() -> types.ModuleType:
    import torch._weights_only_unpickler as weights_only

    safe = weights_only._get_allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            full = _normalise(module, name)
            _LOOKUPS.append(full)
            if full in safe:
                return safe[full]
            return type(name if name.isidentifier() else "Global", (_Inert,), {})

    module = types.ModuleType("recording_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    module.loads = lambda data, **kwargs: Unpickler(__import__("io").BytesIO(data), **kwargs).load()  # type: ignore[attr-defined]
    module.__name__ = "pickle"
    return module


def observe(path: str) -> dict[str, object]:
    import torch

    recording = _recording_module()
    if os.path.isdir(path):
        _dcp_load(path, recording)
        return {"lookups": _LOOKUPS, "torchscript": False}
    torchscript = False
    import zipfile

    if _is_numpy_file(path):
        _numpy_load_all(path)
        return {"lookups": _LOOKUPS, "torchscript": False}

    if zipfile.is_zipfile(path):
        try:
            reader = torch._C.PyTorchFileReader(path)
            torchscript = "constants.pkl" in reader.get_all_records()
        except BaseException:  # noqa: BLE001
            pass
    if not torchscript:
        try:
            torch.load(path, weights_only=False, pickle_module=recording, map_location="cpu")
        except BaseException:  # noqa: BLE001
            pass
    return {"lookups": _LOOKUPS, "torchscript": torchscript}


def _dcp_load(path: str, recording: types.ModuleType) -> None:
    """
    DCP's reader on the folder: `read_metadata` pickle.loads the .metadata (recorded), and where it
    looks up only DCP's own classes the metadata is read for real and `dcp.load` run on a template
    of its items, with `torch.load(weights_only=False)` (how it reads a non-tensor item) recorded.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.filesystem as filesystem
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    real_pickle = filesystem.pickle
    filesystem.pickle = recording
    try:
        filesystem.FileSystemReader(path).read_metadata()
    except BaseException:  # noqa: BLE001 - a failed load still tells which globals it looked up
        return
    finally:
        filesystem.pickle = real_pickle
    from ckptview.readers.dcp import _DCP_CLASSES

    if not set(_LOOKUPS) <= set(torch._weights_only_unpickler._get_allowed_globals()) | _DCP_CLASSES:
        return  # anything else in the metadata: recorded, and never run
    real_load = torch.load

    def recorded_load(file: object, *args: object, weights_only: object = None, **kwargs: object) -> object:
        if weights_only is False:
            kwargs["pickle_module"] = recording
        return real_load(file, *args, weights_only=weights_only, **kwargs)

    torch.load = recorded_load
    try:
        metadata = filesystem.FileSystemReader(path).read_metadata()
        template = {fqn: torch.empty(item.size, dtype=item.properties.dtype)
                    if isinstance(item, TensorStorageMetadata) else None
                    for fqn, item in metadata.state_dict_metadata.items()}
        dcp.load(template, checkpoint_id=path, no_dist=True)
    except BaseException:  # noqa: BLE001
        pass
    finally:
        torch.load = real_load


def _is_numpy_file(path: str) -> bool:
    """A .npy file, or a zip that is no torch archive (numpy.load reads it as an .npz)."""
    import zipfile

    with open(path, "rb") as handle:
        if handle.read(6) == b"\x93NUMPY":
            return True
    try:
        with zipfile.ZipFile(path) as archive:
            return not any(name.endswith("data.pkl") for name in archive.namelist())
    except Exception:  # noqa: BLE001 - not a zip numpy would read either
        return False


def _numpy_load_all(path: str) -> None:
    """numpy.load(allow_pickle=True) of the file and of every .npz member, its pickle recorded: numpy's own
    globals are real (numpy is no foreign code), every other one an inert stand-in."""
    import importlib

    import numpy as np

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            full = _normalise(module, name)
            _LOOKUPS.append(full)
            if full.split(".")[0] == "numpy":
                return super().find_class(module, name)
            return type(name if name.isidentifier() else "Global", (_Inert,), {})

    recording = types.ModuleType("pickle")
    recording.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    recording.loads = lambda data, **kwargs: Unpickler(__import__("io").BytesIO(data), **kwargs).load()  # type: ignore[attr-defined]
    recording.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    for name in ("numpy.lib.format", "numpy.lib._format_impl", "numpy.lib.npyio", "numpy.lib._npyio_impl"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "pickle", None) is pickle:
            module.pickle = recording  # type: ignore[attr-defined]
    try:
        loaded = np.load(path, allow_pickle=True)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            for key in loaded.files:
                try:
                    loaded[key]
                except BaseException:  # noqa: BLE001 - a damaged member: what it looked up still counts
                    pass
    except BaseException:  # noqa: BLE001
        pass


def torch_lookups(path: str | os.PathLike[str], timeout: float = 60) -> dict[str, object]:
    """Run `observe` in a fresh process (a file must not change this one) and return its answer."""
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), os.fspath(path)], capture_output=True,
                            text=True, timeout=timeout)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"the torch oracle printed no answer for {path}: {result.stderr[-2000:]}")


if __name__ == "__main__":
    answer = observe(sys.argv[1])
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
