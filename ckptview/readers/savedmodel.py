"""
TensorFlow SavedModel folders (`saved_model.pb` + `variables/`), read without TensorFlow:
`tf.saved_model.load` builds the graph and its functions, and a graph can read and write files or
call Python (`PyFunc`). Here `saved_model.pb` is decoded statically from the protobuf wire format
for what people ask of it, the serving signatures (inputs and outputs with dtypes and shapes, as
`saved_model_cli show` prints them) and the op types of the graph and each function, and the
variables are read as the TensorFlow checkpoint they are (`variables/variables.index`).

Ops that touch the file system or run Python (`ReadFile`, `WriteFile`, `PyFunc`, ...) are listed
in `Checkpoint.pickle_imports`, so `ckptview scan` exits 3 naming them. The checkpoint machinery
every SavedModel has (`SaveV2`, `RestoreV2`, `MergeV2Checkpoints` in its saver functions) is not.
So is what a Keras 2 SavedModel's layer configs would run: `tf.keras.models.load_model` rebuilds
the model from them (keras_metadata.pb), calling a `Lambda` layer's marshalled bytecode, which
`tf.saved_model.load` never reads.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

from ckptview.errors import CorruptCheckpointError, TruncatedCheckpointError
from ckptview.readers.model import Checkpoint, PickleImport
from ckptview.readers.paths import resolve_inside
from ckptview.readers.tf_ops import CHECKPOINT_OPS, CODE_OPS
from ckptview.readers.tf_checkpoint import TF_DTYPES, TF_TYPE_NAMES, TensorBundle, _fields, _signed

_MAX_PB_BYTES = 2 << 30  # protobuf's own limit for one message
KERAS_METADATA = "keras_metadata.pb"


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray, memoryview)) else ""


def _map_entries(message: bytes, field: int) -> list[tuple[str, bytes]]:
    entries = []
    for number, wire, value in _fields(message):
        if number == field and wire == 2:
            parts = {n: v for n, w, v in _fields(value) if w == 2}
            entries.append((_text(parts.get(1, b"")), parts.get(2, b"")))
    return entries


def _dtype_name(code: int) -> str:
    return TF_DTYPES.get(code) or TF_TYPE_NAMES.get(code) or f"DataType {code}"


def _tensor_info(message: bytes) -> dict[str, Any]:
    info: dict[str, Any] = {"name": "", "dtype": None, "shape": None}
    for number, wire, value in _fields(message):
        if number == 1 and wire == 2:
            info["name"] = _text(value)
        elif number == 2 and wire == 0:
            info["dtype"] = _dtype_name(value)
        elif number == 3 and wire == 2:
            dims, unknown = [], False
            for dim_number, dim_wire, dim in _fields(value):
                if dim_number == 2 and dim_wire == 2:
                    dims.append(next((_signed(v) for n, w, v in _fields(dim) if n == 1 and w == 0), 0))
                elif dim_number == 3 and dim_wire == 0:
                    unknown = bool(dim)
            info["shape"] = None if unknown else dims  # -1 for a dimension of any size, as saved_model_cli shows
    return info


def _signature(message: bytes) -> dict[str, Any]:
    method = next((_text(v) for n, w, v in _fields(message) if n == 3 and w == 2), "")
    return {"inputs": {key: _tensor_info(value) for key, value in _map_entries(message, 1)},
            "outputs": {key: _tensor_info(value) for key, value in _map_entries(message, 2)},
            "method_name": method}


class _Node(NamedTuple):
    """What a NodeDef says of what runs: its name, op, inputs and the library functions it calls."""

    name: str
    op: str
    inputs: list[str]
    calls: set[str]


def _called(attr_value: bytes) -> set[str]:
    """Every function an AttrValue names (`func`, a list's `func`s, and those in their own attrs)."""
    names: set[str] = set()
    values, functions = [attr_value], []  # AttrValues, NameAttrLists
    while values or functions:
        if functions:
            for field, wire, part in _fields(functions.pop()):
                if field == 1 and wire == 2:
                    names.add(_text(part))
                elif field == 2 and wire == 2:  # its attrs: map entries whose value (2) is an AttrValue
                    values.extend(v for n, w, v in _fields(part) if n == 2 and w == 2)
            continue
        for number, wire, value in _fields(values.pop()):
            if number == 10 and wire == 2:  # AttrValue.func
                functions.append(value)
            elif number == 1 and wire == 2:  # AttrValue.list, whose funcs are field 9
                functions.extend(v for n, w, v in _fields(value) if n == 9 and w == 2)
    return names


def _nodes(messages: list[bytes]) -> list[_Node]:
    nodes = []
    for message in messages:
        name, op, inputs, calls = "", "", [], set()
        for number, wire, value in _fields(message):
            if wire != 2:
                continue
            if number == 1:
                name = _text(value)
            elif number == 2:
                op = _text(value)
            elif number == 3:
                inputs.append(_text(value).lstrip("^").split(":")[0])
            elif number == 5:  # attr map entry: the AttrValue is field 2
                for field, field_wire, attr in _fields(value):
                    if field == 2 and field_wire == 2:
                        calls |= _called(attr)
        nodes.append(_Node(name, op, inputs, calls))
    return nodes


def _ops(nodes: list[_Node]) -> Counter[str]:
    return Counter(node.op for node in nodes)


def read_meta_graphs(path: str, data: bytes) -> list[dict[str, Any]]:
    graphs = []
    for number, wire, meta in _fields(data):
        if number != 2 or wire != 2:
            continue
        tags: list[str] = []
        version = ""
        graph_nodes: list[_Node] = []
        functions: dict[str, list[_Node]] = {}
        signatures: dict[str, Any] = {}
        keras_configs: list[bytes] = []
        saver_nodes: dict[str, list[str]] = {"save": [], "restore": []}
        object_functions: set[str] = set()
        for field, field_wire, value in _fields(meta):
            if field == 1 and field_wire == 2:  # MetaInfoDef
                for info_number, info_wire, info in _fields(value):
                    if info_number == 4 and info_wire == 2:
                        tags.append(_text(info))
                    elif info_number == 5 and info_wire == 2:
                        version = _text(info)
            elif field == 2 and field_wire == 2:  # GraphDef: nodes, and the function library
                nodes = []
                for graph_number, graph_wire, item in _fields(value):
                    if graph_number == 1 and graph_wire == 2:
                        nodes.append(item)
                    elif graph_number == 2 and graph_wire == 2:
                        for lib_number, lib_wire, function in _fields(item):
                            if lib_number != 1 or lib_wire != 2:
                                continue
                            name, body = "", []
                            for fn_number, fn_wire, part in _fields(function):
                                if fn_number == 1 and fn_wire == 2:
                                    name = next((_text(v) for n, w, v in _fields(part) if n == 1 and w == 2), "")
                                elif fn_number == 3 and fn_wire == 2:
                                    body.append(part)
                            functions.setdefault(name, []).extend(_nodes(body))
                graph_nodes += _nodes(nodes)
            elif field == 3 and field_wire == 2:  # SaverDef: the nodes that save (2) and restore (3) variables
                for n, w, v in _fields(value):
                    if n in (2, 3) and w == 2:
                        saver_nodes["save" if n == 2 else "restore"].append(_text(v).split(":")[0])
            elif field == 5 and field_wire == 2:  # signature_def map entry
                parts = {n: v for n, w, v in _fields(value) if w == 2}
                signatures[_text(parts.get(1, b""))] = _signature(parts.get(2, b""))
            elif field == 7 and field_wire == 2:  # SavedObjectGraph
                configs, called = _object_graph(value)
                keras_configs += configs
                object_functions |= called
        graphs.append({"tags": tags, "tensorflow_version": version, "signatures": signatures,
                       "graph_ops": dict(_ops(graph_nodes)),
                       "functions": {name: dict(_ops(body)) for name, body in functions.items()},
                       "keras_configs": keras_configs,
                       "checkpoint_ops": _checkpoint_ops_outside_the_saver(graph_nodes, functions, saver_nodes,
                                                                           object_functions)})
    return graphs


def _object_graph(object_graph: bytes) -> tuple[list[bytes], set[str]]:
    """
    Of a SavedObjectGraph, in one walk of its nodes: the layer configs SavedModels written before TF
    2.5 keep there (every `SavedUserObject.metadata`, which `tf.keras.models.load_model` reads when the
    folder has no keras_metadata.pb; all of them, and every copy of a repeated field: what this reads
    decides only what counts as code), and the functions its objects offer to callers (SavedFunction's
    concrete functions, bare concrete functions).
    """
    configs: list[bytes] = []
    called: set[str] = set()
    for number, wire, node in _fields(object_graph):
        if number == 1 and wire == 2:
            for kind, kind_wire, value in _fields(node):
                if kind == 4 and kind_wire == 2:
                    configs.extend(v for field, field_wire, v in _fields(value) if field == 3 and field_wire == 2)
                elif kind in (6, 8) and kind_wire == 2:
                    called |= {_text(v) for n, w, v in _fields(value) if n == 1 and w == 2}
    return configs, called


def _reached(roots: set[str], functions: dict[str, list[_Node]]) -> set[str]:
    """The library functions `roots` call, directly or through others (a node whose op is a function calls it)."""
    reached: set[str] = set()
    pending = [name for name in roots if name in functions]
    while pending:
        name = pending.pop()
        if name in reached:
            continue
        reached.add(name)
        for node in functions[name]:
            pending.extend(call for call in (*node.calls, node.op) if call in functions and call not in reached)
    return reached


def _checkpoint_ops_outside_the_saver(graph_nodes: list[_Node], functions: dict[str, list[_Node]],
                                      saver_nodes: dict[str, list[str]], object_functions: set[str]) -> Counter[str]:
    """
    The ops that write, read or delete checkpoint files (`SaveV2`, `MergeV2Checkpoints`, ...) where
    they are more than the SavedModel's own saver: every SavedModel saves and restores its variables
    with them (the SaverDef's save and restore nodes and what they call), but in a serving function
    `SaveV2` writes files wherever its prefix says (TensorFlow ran one in a tf.function that way).
    Writing ops pass only where nothing but saving reaches them, reading ops only where nothing but
    restoring does: loaders restore as they load (TF1's, TF Serving), and restoring writes nothing.
    """
    by_name = {node.name: node for node in graph_nodes}

    def needed_by(starts: Iterable[str]) -> set[str]:
        """The graph nodes running `starts` runs: they and their inputs, control inputs too."""
        needed: set[str] = set()
        pending = [name for name in starts if name in by_name]
        while pending:
            name = pending.pop()
            if name not in needed:
                needed.add(name)
                pending.extend(source for source in by_name[name].inputs if source in by_name and source not in needed)
        return needed

    parts = {role: needed_by(starts) for role, starts in saver_nodes.items()}
    in_the_saver = set().union(*parts.values())
    # what anything else runs (a serving output with a control input on the saver's SaveV2 runs it)
    needed_by_the_rest = needed_by(node.name for node in graph_nodes if node.name not in in_the_saver)
    allowed_nodes: dict[str, set[str]] = {}
    allowed_functions: dict[str, set[str]] = {}
    for role, needed in parts.items():
        only_this = needed - needed_by_the_rest
        roots = {call for name in only_this for call in (*by_name[name].calls, by_name[name].op)}
        rest = object_functions | {call for node in graph_nodes if node.name not in only_this
                                   for call in (*node.calls, node.op)}
        allowed_nodes[role] = only_this
        allowed_functions[role] = _reached(roots, functions) - _reached(rest, functions)
    found: Counter[str] = Counter()
    for node in graph_nodes:
        role = CHECKPOINT_OPS.get(node.op, ("", ""))[0]
        if role and node.name not in allowed_nodes.get(role, ()):
            found[f"tf.raw_ops.{node.op} ({CHECKPOINT_OPS[node.op][1]}, beyond the saver's own {role}; "
                  "in the graph)"] += 1
    for name, body in functions.items():
        for node in body:
            role = CHECKPOINT_OPS.get(node.op, ("", ""))[0]
            if role and name not in allowed_functions.get(role, ()):
                found[f"tf.raw_ops.{node.op} ({CHECKPOINT_OPS[node.op][1]}, beyond the saver's own {role}; "
                      f"in function {name})"] += 1
    return found


def _keras_code(path: str, folder: str, graphs: list[dict[str, Any]], details: dict[str, Any]) -> list[PickleImport]:
    """
    What `tf.keras.models.load_model` would run of a Keras 2 SavedModel: it rebuilds the model
    from the JSON config of every layer (`SavedMetadata.nodes[].metadata` of keras_metadata.pb,
    else the object graph's) and calls the layers on its inputs, Lambda layers' bytecode included.
    A keras_metadata.pb that does not decode is noted in `details`: protobuf refuses it too, and
    load_model with it, before anything runs.
    """
    from ckptview.readers.keras_file import code_in_config

    configs = [config for graph in graphs for config in graph["keras_configs"]]
    if os.path.lexists(os.path.join(folder, KERAS_METADATA)):
        metadata_path = resolve_inside(folder, KERAS_METADATA, named_by=path, what="the Keras metadata")
        details["files"] = [*details.get("files", []), KERAS_METADATA]
        if os.path.getsize(metadata_path) > _MAX_PB_BYTES:
            details["keras_metadata"] = "over 2 GB, more than protobuf reads: tf.keras.models.load_model refuses it"
        else:
            with open(metadata_path, "rb") as stream:
                data = stream.read()
            try:
                configs += [value for number, wire, node in _fields(data) if number == 1 and wire == 2
                            for field, field_wire, value in _fields(node) if field == 5 and field_wire == 2]
            except (IndexError, ValueError):
                details["keras_metadata"] = "damaged (does not decode): tf.keras.models.load_model refuses it"
    documents = []
    for config in configs:
        try:
            # as Keras reads it (json_utils.decode is json.loads), and protobuf's strings are UTF-8
            documents.append(json.loads(bytes(config).decode("utf-8")))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue  # load_model fails on it as it gets there, before it calls any layer
    # tf.saved_model.load reads no layer config: only Keras's loader runs these
    return [PickleImport(f"{found.name} (tf.keras.models.load_model runs it)", found.count)
            for found in code_in_config(documents)]


def _code_ops(graphs: list[dict[str, Any]]) -> list[PickleImport]:
    found: Counter[str] = Counter()
    for graph in graphs:
        places = [("the graph", graph["graph_ops"])] + [(f"function {name}", ops) for name, ops in graph["functions"].items()]
        for where, ops in places:
            for op, count in ops.items():
                if op in CODE_OPS:
                    found[f"tf.raw_ops.{op} ({CODE_OPS[op]}; in {where})"] += count
        found.update(graph["checkpoint_ops"])
    return [PickleImport(name, count) for name, count in found.items()]


def read_saved_model(path: str, size: int, *, trust: bool) -> Checkpoint:
    """The registry's entry point for `saved_model.pb`; its folder's `variables/` are the weights."""
    from ckptview.readers.keras_file import local_only

    local_only(path, "a SavedModel")
    if size > _MAX_PB_BYTES:
        raise CorruptCheckpointError(path, "a saved_model.pb over 2 GB, more than protobuf allows: it is damaged. Save "
                                           "the model again.")
    with open(path, "rb") as stream:
        # a view: every message is read as a slice of its parent, and a frozen graph's constants (hundreds of
        # MB) were copied at every level down to the attr holding them
        data = memoryview(stream.read())
    try:
        graphs = read_meta_graphs(path, data)
    except IndexError:
        raise TruncatedCheckpointError(path, "saved_model.pb ends inside a message: it was cut off. Copy the "
                                             "SavedModel again.") from None
    except ValueError:
        raise CorruptCheckpointError(path, "saved_model.pb does not decode as a SavedModel: it is damaged. Copy the "
                                           "SavedModel again.") from None
    if not graphs:
        raise CorruptCheckpointError(path, "saved_model.pb holds no MetaGraphDef: it is damaged. Save the model "
                                           "again.")
    op_counts: Counter[str] = Counter()
    for graph in graphs:
        op_counts.update(graph["graph_ops"])
        for ops in graph["functions"].values():
            op_counts.update(ops)
    details = {
        "meta_graphs": [{"tags": g["tags"], "tensorflow_version": g["tensorflow_version"]} for g in graphs],
        "signatures": graphs[0]["signatures"],
        "functions": {name: ops for g in graphs for name, ops in g["functions"].items()},
        "op_counts": dict(op_counts),
    }
    folder = os.path.dirname(os.path.abspath(path))
    imports = _code_ops(graphs) + _keras_code(path, folder, graphs, details)
    index = os.path.join(folder, "variables", "variables.index")
    if os.path.lexists(index):
        # `variables` (or the index) being a link out of the SavedModel's folder is refused
        index = resolve_inside(folder, "variables/variables.index", named_by=path, what="the variables index")
        # read as part of the model (its data files are sources)
        details["files"] = [*details.get("files", []), "variables/variables.index"]
        bundle = TensorBundle(index, os.path.getsize(index))
        ckpt = bundle.checkpoint(trust, format="savedmodel", details=details, pickle_imports=imports, path=path,
                                 extra_size=size)
    else:
        ckpt = Checkpoint(path, "savedmodel", {}, file_size=size, trust=trust, details=details, pickle_imports=imports)
    ckpt.metadata.update({"signatures": ", ".join(details["signatures"]) or "none",
                          "tags": "; ".join(",".join(g["tags"]) for g in graphs),
                          "tensorflow_version": graphs[0]["tensorflow_version"]})
    return ckpt
