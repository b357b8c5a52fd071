"""
torch.export programs (`torch.export.save`, `.pt2`): the PT2 archive, read without torch.

A `.pt2` is a zip whose one folder holds `archive_format` ("pt2"), each program's graph as JSON
(`models/<name>.json`), its weights as raw storage bytes (`data/weights/weight_<n>`) with a JSON
table saying which parameter or buffer views which bytes, at which dtype, sizes, strides and offset
(`data/weights/<name>_weights_config.json`), its constants the same way (`data/constants/`), and
its example inputs as a `torch.save` archive (`data/sample_inputs/<name>.pt`); the layout is
torch's own (torch/export/pt2_archive/_package.py). The weights are listed from the table and read
in place; the graph gives the op counts and the program's inputs.

JSON and raw bytes look harmless, but `torch.export.load` (and the module it returns) runs Python
from the file in several places, which `scan` reports:
- every symbolic size (`expr_str`) goes through `sympy.sympify`, which `eval`s it: a string that is
  not plain arithmetic on shape symbols runs at load time;
- `guards_code` strings are compiled into the guard function `ep.module()` calls on every input;
- graph nodes call their `target`, looked up by name under `torch`, `_operator` and `math`: a target
  outside `torch.ops` (`torch.serialization.os.system`) is a Python call the program makes;
- pytree specs name enum classes and `defaultdict` factories that loading imports;
- weights and constants marked `use_pickle` go through `torch.load(weights_only=False)`, opaque
  constants through `pickle.loads`, script objects through TorchScript's unpickler, and the example
  inputs (and a legacy archive's `<name>.pt` payloads) through `torch.load(weights_only=True)` and,
  when that refuses them, `weights_only=False`: each pickle is scanned by the safe unpickler;
- an AOTInductor package's compiled libraries (`data/aotinductor/`) are native code its loader runs.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ckptview.errors import CkptviewError, CorruptCheckpointError, UnsupportedFormatError, printable
from ckptview.readers.dtypes import ITEMSIZE
from ckptview.readers.model import Checkpoint, FileSource, PickleImport, Storage, TensorInfo, strided_tensor
from ckptview.readers.torch_pickle import (
    archive_prefix,
    checked_member_bytes,
    merge_imports,
    parse_torch_zip,
    unpickle,
    zip_members,
)
from ckptview.readers.zip_directory import STORED, BadZip, Member, data_offset, refuse_overlapping_members

WRITER, LOADER = "torch.export.save", "torch.export.load"
_WEIGHTS, _CONSTANTS, _AOTI = "data/weights/", "data/constants/", "data/aotinductor/"
_MAX_JSON_BYTES = 512 << 20  # a graph's JSON: an LLM's is tens of MB
_MAX_PICKLE_BYTES = 1 << 31

# torch/_export/serde/schema.py: ScalarType -> torch's dtype name
_SCALAR_TYPES = {
    1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
    9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16", 28: "uint16",
    29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz", 33: "float8_e8m0fnu",
    34: "uint32", 35: "uint64",
}
_STRIDED = 7  # schema.Layout.Strided


def is_pt2_archive(names: tuple[str, ...]) -> bool:
    """Names of a zip's members: `<folder>/archive_format` beside anything of a program."""
    return any(name.count("/") == 1 and name.endswith("/archive_format") for name in names)


def read_pt2(path: str, size: int, *, trust: bool) -> Checkpoint:
    archive = _Archive(path, size)
    imports: Counter[str] = Counter()
    roots: dict[str, dict[str, TensorInfo]] = {}
    programs: list[dict[str, Any]] = []
    for model in archive.model_names():
        weights, weight_imports = archive.payloads(model, _WEIGHTS, "weights")
        constants, constant_imports = archive.payloads(model, _CONSTANTS, "constants")
        imports.update(weight_imports)
        imports.update(constant_imports)
        program: dict[str, Any] = {"name": model, "weights": len(weights),
                                   "constants": [_brief(name, info) for name, info in constants.items()]}
        inputs = archive.sample_inputs(model, imports)
        if inputs is not None:
            program["sample_inputs"] = inputs
        graph = archive.graph(model)
        if graph is not None:
            program.update(_graph_summary(graph))
            imports.update(code_in_graph(graph))
        roots[model] = weights
        programs.append(program)
    for name in archive.members:
        if name.startswith(_AOTI) and name.endswith((".so", ".dll", ".dylib", ".pyd")):
            imports[f"{name} (an AOTInductor library: loading the package runs its native code)"] += 1
    details: dict[str, Any] = {"archive_prefix": archive.prefix.rstrip("/"), "programs": programs,
                               "archive_version": archive.text("archive_version", 64).strip()}
    if any(name.startswith(_AOTI) for name in archive.members):
        details["aotinductor"] = sorted({name[len(_AOTI):].split("/")[0] for name in archive.members
                                         if name.startswith(_AOTI)})
    extra = sorted(name[len("extra/"):] for name in archive.members if name.startswith("extra/"))
    if extra:
        details["extra_files"] = extra
    root: Any = next(iter(roots.values())) if len(roots) == 1 else roots
    metadata = {f"{key} ({program['name']})" if len(programs) > 1 else key: text
                for program in programs for key, text in _program_metadata(program).items()}
    return Checkpoint(path, "pt2", root, file_size=size, sources=[archive.source], metadata=metadata,
                      pickle_imports=[PickleImport(name, count) for name, count in sorted(imports.items())],
                      trust=trust, details=details)


class _Archive:
    """The archive's members by their names inside its folder, and how to read them."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.size = path, size
        self.source = FileSource(path)
        listed = zip_members(path, self.source.read, size, writer=WRITER)
        refuse_overlapping_members(path, listed, "the archive")
        self.prefix = archive_prefix(path, [member.name for member in listed], loader=LOADER)
        self.members: dict[str, Member] = {member.name[len(self.prefix):]: member for member in listed}
        for other in ("data.pkl", "constants.pkl"):
            if other in self.members:
                # torch.load reads data.pkl (and torch.jit.load constants.pkl) where torch.export.load reads the rest
                raise CorruptCheckpointError(path, f"the archive is a torch.export program that also holds "
                                                   f"{printable(self.prefix + other)}: torch.load and {LOADER} would "
                                                   "read different things from it, so it was crafted. Do not load it.")
        found = self.text("archive_format", 64).strip()
        if found != "pt2":
            raise UnsupportedFormatError(path, f"a zip archive whose archive_format says {printable(found)!r}, not "
                                               "'pt2': not a torch.export program ckptview reads.")

    def model_names(self) -> list[str]:
        names = {name[len("models/"):-len(".json")] for name in self.members
                 if name.startswith("models/") and name.endswith(".json") and name.count("/") == 1}
        names |= {name[len(_WEIGHTS):-len("_weights_config.json")] for name in self.members
                  if name.startswith(_WEIGHTS) and name.endswith("_weights_config.json")}
        return sorted(names)

    def bytes(self, name: str, limit: int) -> bytes:
        return checked_member_bytes(self.source.read, self.members[name], self.path, limit, writer=WRITER,
                                    loader=LOADER)

    def text(self, name: str, limit: int) -> str:
        if name not in self.members:
            raise CorruptCheckpointError(self.path, f"the archive has no {printable(self.prefix + name)}: it is "
                                                    f"incomplete. Save it again with {WRITER}.")
        return self.bytes(name, limit).decode("utf-8", "replace")

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.text(name, _MAX_JSON_BYTES))
        except (ValueError, RecursionError) as exc:
            raise CorruptCheckpointError(self.path, f"{printable(self.prefix + name)} is not valid JSON: the file is "
                                                    f"damaged. Save it again with {WRITER}.") from exc

    def graph(self, model: str) -> Any:
        name = f"models/{model}.json"
        return self.json(name) if name in self.members else None

    def data_start(self, name: str) -> int:
        """Where a stored member's bytes start in the file (its local header read)."""
        member = self.members[name]
        if member.compress_type != STORED or member.flag_bits & 0x1:
            raise UnsupportedFormatError(self.path, f"archive member {printable(self.prefix + name)} is compressed "
                                                    f"or encrypted; {WRITER} stores members as they are, so the file "
                                                    "was re-zipped. Save it again with torch.export.save.")
        try:
            start = data_offset(self.source.read, member.name, member.header_offset)
        except BadZip as exc:
            raise CorruptCheckpointError(self.path, f"archive member {printable(self.prefix + name)} has a damaged "
                                                    "local header: the file was corrupted. Copy it again.") from exc
        if start + member.file_size > self.size:
            raise CorruptCheckpointError(self.path, f"archive member {printable(self.prefix + name)} runs past the "
                                                    "end of the file: it was cut off. Copy it again.")
        return start

    def nested_torch_save(self, name: str, imports: Counter[str]) -> Any:
        """The root of a torch.save archive stored as a member; the globals its pickle names join `imports`."""
        start, member = self.data_start(name), self.members[name]
        try:
            parsed = parse_torch_zip(self.source, self.path, self.size, base_offset=start, length=member.file_size)
        except CkptviewError as exc:
            named = getattr(exc, "named_globals", [])
            raise CorruptCheckpointError(self.path, f"{printable(self.prefix + name)}, a torch.save archive inside "
                                                    f"the program, cannot be read ({exc.reason})"
                                                    + (": it names " + ", ".join(imp.name for imp in named[:5])
                                                       + f", which {LOADER} would import. Do not load it."
                                                       if named else ".")) from exc
        for imported in parsed.unpickler.pickle_imports():
            imports[imported.name] += imported.count
        return parsed.root

    def pickle(self, name: str, imports: Counter[str], what: str) -> None:
        """A plain pickle member, scanned: the globals it names join `imports`."""
        data = self.bytes(name, _MAX_PICKLE_BYTES)
        unpicklers: list[Any] = []
        try:
            unpickle(data, self.path, f"{printable(self.prefix + name)} ({what})", unpicklers=unpicklers,
                     writer=WRITER, loader=LOADER)
        except CkptviewError:
            imports[f"{self.prefix}{name} ({what}: a pickle ckptview cannot read through)"] += 1
        for imported in merge_imports(unpicklers):
            imports[imported.name] += imported.count

    def payloads(self, model: str, folder: str, kind: str) -> tuple[dict[str, TensorInfo], Counter[str]]:
        """A program's weights or constants: name -> tensor, and what loading them imports."""
        imports: Counter[str] = Counter()
        legacy = f"{folder}{model}.pt"
        if legacy in self.members:  # archives before the per-tensor layout: one torch.save of the whole dict
            root = self.nested_torch_save(legacy, imports)
            return ({str(k): v for k, v in root.items() if isinstance(v, TensorInfo)} if isinstance(root, dict)
                    else {}), imports
        config_name = f"{folder}{model}_{kind}_config.json"
        if config_name not in self.members:
            return {}, imports
        config = self.json(config_name)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise CorruptCheckpointError(self.path, f"{printable(self.prefix + config_name)} has no 'config' table: "
                                                    f"the file is damaged. Save it again with {WRITER}.")
        tensors: dict[str, TensorInfo] = {}
        storages: dict[str, Storage] = {}
        for fqn, meta in entries.items():
            file_name = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(file_name, str) or f"{folder}{file_name}" not in self.members:
                raise CorruptCheckpointError(self.path, f"{kind} entry {printable(str(fqn))!r} names no member of "
                                                        f"the archive: the file is incomplete. Save it again with "
                                                        f"{WRITER}.")
            member = f"{folder}{file_name}"
            if file_name.startswith("custom_obj_"):
                self.pickle(member, imports, "a script object TorchScript's unpickler builds")
            elif file_name.startswith("opaque_obj_"):
                self.pickle(member, imports, "an object pickle.loads builds")
            elif meta.get("use_pickle"):
                # a tensor subclass, saved with torch.save and read back with weights_only=False
                value = self.nested_torch_save(member, imports)
                if isinstance(value, TensorInfo):
                    tensors[str(fqn)] = value
            else:
                tensors[str(fqn)] = self.raw_tensor(str(fqn), meta, member, storages)
        return tensors, imports

    def raw_tensor(self, fqn: str, meta: dict[str, Any], member: str, storages: dict[str, Storage]) -> TensorInfo:
        tensor_meta = meta.get("tensor_meta")
        try:
            dtype = _SCALAR_TYPES[tensor_meta["dtype"]]
            shape = tuple(_int(size) for size in tensor_meta["sizes"])
            stride = tuple(_int(step) for step in tensor_meta["strides"])
            offset = _int(tensor_meta["storage_offset"])
            layout = tensor_meta.get("layout", _STRIDED)
            device = tensor_meta.get("device") or {}
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(self.path, f"the entry for {printable(fqn)!r} does not describe a tensor "
                                                    f"(dtype, sizes, strides, offset): the file is damaged. Save it "
                                                    f"again with {WRITER}.") from exc
        if layout != _STRIDED or len(shape) != len(stride) or min((*shape, *stride, offset), default=0) < 0:
            raise CorruptCheckpointError(self.path, f"{printable(fqn)!r} has layout {layout}, sizes {list(shape)}, "
                                                    f"strides {list(stride)} and offset {offset}, which no dense "
                                                    "tensor has: the file is damaged.")
        storage = storages.get(member)
        if storage is None:
            kind = device.get("type") if isinstance(device, dict) else None
            index = device.get("index") if isinstance(device, dict) else None
            location = "cpu" if not isinstance(kind, str) else kind if index is None else f"{kind}:{index}"
            storage = storages[member] = Storage(key=member, source=self.source, offset=self.data_start(member),
                                                 nbytes=self.members[member].file_size, location=location)
        if math.prod(shape):
            end = (offset + sum((n - 1) * step for n, step in zip(shape, stride)) + 1) * ITEMSIZE[dtype]
            if end > storage.nbytes:
                raise CorruptCheckpointError(self.path, f"{printable(fqn)!r} reaches byte {end:,} of its data "
                                                        f"{printable(self.prefix + member)}, which has "
                                                        f"{storage.nbytes:,}: the file is damaged.")
        info = strided_tensor(shape, dtype, storage, offset, stride, bool(tensor_meta.get("requires_grad")))
        if meta.get("is_param"):
            info = info.with_flags(is_parameter=True, requires_grad=info.requires_grad)
        return info

    def sample_inputs(self, model: str, imports: Counter[str]) -> list[str] | None:
        """The example inputs' shapes (as "float32[1, 3, 16, 16]"); their pickle scanned into `imports`."""
        name = f"data/sample_inputs/{model}.pt"
        if name not in self.members:
            return None
        root = self.nested_torch_save(name, imports)
        return [_brief("", info).split(" ", 1)[1] for info in _tensors_in(root)]


def _int(value: Any) -> int:
    """An `as_int` size, stride or offset; a symbolic one (`as_expr`) in a weight's table is refused."""
    if isinstance(value, dict) and type(value.get("as_int")) is int:
        return value["as_int"]
    raise ValueError(f"not a plain integer: {value!r}")


def _tensors_in(root: Any) -> Iterator[TensorInfo]:
    stack = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, TensorInfo):
            yield item
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))


def _brief(name: str, info: TensorInfo) -> str:
    return f"{name} {info.dtype}[{', '.join(map(str, info.shape))}]"


def _graph_summary(graph: dict[str, Any]) -> dict[str, Any]:
    """Op counts, the program's own inputs and outputs, and the versions that wrote it."""
    module = graph.get("graph_module") if isinstance(graph, dict) else None
    module = module if isinstance(module, dict) else {}
    ops = Counter(target for node in _nodes(module.get("graph")) for target in [node.get("target")]
                  if isinstance(target, str))
    signature = module.get("signature") if isinstance(module.get("signature"), dict) else {}
    inputs = [_spec_name(spec) for spec in signature.get("input_specs") or [] if isinstance(spec, dict)
              and "user_input" in spec]
    outputs = [_spec_name(spec) for spec in signature.get("output_specs") or [] if isinstance(spec, dict)
               and "user_output" in spec]
    summary: dict[str, Any] = {"ops": dict(ops.most_common()), "inputs": inputs, "outputs": outputs}
    for key in ("torch_version", "schema_version", "opset_version"):
        if key in graph:
            summary[key] = graph[key]
    return summary


def _program_metadata(program: dict[str, Any]) -> dict[str, str]:
    """What the Overview and `info` show of a program: its inputs (with the example inputs' shapes), its
    ops, the torch that exported it."""
    found = {}
    names, examples = program.get("inputs", []), program.get("sample_inputs") or []
    if names:
        found["inputs"] = ", ".join(f"{name}: {example}" if len(examples) == len(names) else name
                                    for name, example in zip(names, examples or names))
    ops = program.get("ops", {})
    if ops:
        shown = ", ".join(f"{op.removeprefix('torch.ops.').removeprefix('aten.').rsplit('.', 1)[0]} {n}"
                          for op, n in list(ops.items())[:6])
        found["ops"] = f"{sum(ops.values()):,} ({shown}{', …' if len(ops) > 6 else ''})"
    if isinstance(program.get("torch_version"), str):
        found["exported with"] = f"torch {program['torch_version']}"
    return found


def _spec_name(spec: dict[str, Any]) -> str:
    body = next(iter(spec.values()), {})
    arg = body.get("arg") if isinstance(body, dict) else None
    found = re.search(r'"name": "([^"]*)"', json.dumps(arg)) if arg is not None else None
    return found[1] if found else "?"


def _nodes(graph: Any) -> Iterator[dict[str, Any]]:
    """Every node of a graph and of the graphs its nodes carry (control flow's branches)."""
    stack = [graph]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("target"), str) and "inputs" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# --- what loading runs -------------------------------------------------------------------------------

# torch.utils._sympy.functions as torch's deserializer hands them to sympify, sympy's own functions its
# printer writes, and SYMPY_INTERP's names that guard code calls
_SYMPY_FUNCTIONS = frozenset({
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs", "Eq",
    "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "floor", "ceiling", "sqrt", "TrueDiv", "Integer", "Rational",
    "Float", "Symbol", "Piecewise", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "OpaqueUnaryFn_sqrt",
    "cast_symbool_to_symint_guardless", "sym_sqrt", "sym_float", "sym_int", "sym_max", "sym_min",
    "Add", "Mul", "Pow", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality",
    "Unequality",
})
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "inf", "pi", "E", "true", "false", "S", "Infinity",
                              "NegativeInfinity", "One", "Zero", "NegativeOne", "Half"})
_SYMBOL = re.compile(r"[a-z]+\d+")  # s0, u3, zuf0, ps1: the names torch gives shape symbols
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)")
_TENSOR_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_NUMBERS = (int, float, bool)
_ASSUMPTIONS = frozenset({"integer", "positive", "negative", "nonnegative", "nonpositive", "real", "finite",
                          "zero", "nonzero", "even", "odd", "rational"})
_ARITHMETIC = (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Tuple)


def plain_expression(text: str, *, guard: bool) -> bool:
    """
    Whether `text` is what a shape expression (`sympify` of `srepr` output: `Add(Symbol('s17',
    positive=True, integer=True), Integer(1))`) or a guard (`2 <= L['x'].size()[0]`) is made of:
    numbers, shape symbols, the functions torch's printers write, and for a guard the sizes, strides
    and offsets of the inputs. Anything else (a name sympify or the guard function would resolve to a
    builtin, an attribute, a string elsewhere, a comment hiding text from one of the two readings) is code.
    """
    if not isinstance(text, str) or any(c in text for c in "#\\\n\r;") or len(text) > 100_000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    try:
        return _plain(tree.body, guard)
    except RecursionError:
        return False


def _plain(node: ast.AST, guard: bool) -> bool:
    if isinstance(node, _ARITHMETIC):
        return all(_plain(child, guard) for child in ast.iter_child_nodes(node)
                   if not isinstance(child, (ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context)))
    if isinstance(node, ast.Constant):
        return isinstance(node.value, _NUMBERS) or node.value is None
    if isinstance(node, ast.Name):
        return (node.id in _SYMPY_FUNCTIONS or node.id in _SYMPY_CONSTANTS or bool(_SYMBOL.fullmatch(node.id))
                or guard and node.id in ("L", "math"))
    if isinstance(node, ast.Call):
        function, args = node.func, node.args
        if not all(isinstance(k.value, ast.Constant) and (k.arg in _ASSUMPTIONS and isinstance(k.value.value, bool)
                                                          or k.arg == "precision" and type(k.value.value) is int)
                   for k in node.keywords):
            return False
        text = args[0].value if len(args) == 1 and isinstance(args[0], ast.Constant) else None
        if isinstance(function, ast.Name) and function.id == "Symbol":  # Symbol('s17', positive=True, ...)
            return isinstance(text, str) and bool(_SYMBOL.fullmatch(text))
        if isinstance(function, ast.Name) and function.id == "Float" and isinstance(text, str):
            return bool(_NUMBER.fullmatch(text))  # Float('0.5', precision=53)
        if node.keywords:
            return False
        if isinstance(function, ast.Name) and function.id in _SYMPY_FUNCTIONS:
            return all(_plain(arg, guard) for arg in args)
        if guard and isinstance(function, ast.Attribute) and function.attr in _TENSOR_METHODS and not args:
            return _input(function.value)
        if guard and _math_function(function):
            return all(_plain(arg, guard) for arg in args)
        return False
    if guard and isinstance(node, ast.Subscript):  # L['x'].size()[0]
        return (isinstance(node.slice, ast.Constant) and type(node.slice.value) is int
                and isinstance(node.value, ast.Call) and _plain(node.value, guard))
    return guard and _math_function(node)


def _input(node: ast.AST) -> bool:
    """`L['x']`, `L['x'][0]`, `L['kwargs']['mask']`: an input of the program, as guards name them."""
    while isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
            and isinstance(node.slice.value, (str, int)):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "L"


def _math_function(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math"
            and not node.attr.startswith("_"))


# call targets a graph's nodes name: torch's operators (`torch.ops.<namespace>.<op>[.<overload>]`, names
# that may start with one underscore, and aten's dunder operators), symbolic-shape helpers, and the
# plain functions of `operator` and `math`; extension ops start with "#". A part starting "__" otherwise
# walks attributes (`torch.ops.aten.__class__...`), which the deserializer's getattr chain would follow.
_DUNDER_OPS = "|".join(f"__{name}__" for name in ("and", "or", "xor", "lshift", "rshift", "iand", "ior", "ixor",
                                                    "ilshift", "irshift"))
_SAFE_TARGET = re.compile(rf"torch\.ops\._?[A-Za-z]\w*\.(_?[A-Za-z]\w*|{_DUNDER_OPS})(\._?[A-Za-z]\w*)?"
                          r"|torch\.sym_[a-z]\w*|torch\._sym_sqrt|_operator\.[a-z]\w*|math\.[a-z]\w*|#.*", re.ASCII)
_RESOLVED_PREFIXES = ("torch", "_operator", "math")  # what the deserializer looks up by name; others stay strings
_PLAIN_FACTORIES = frozenset({"builtins.list", "builtins.dict", "builtins.int", "builtins.float", "builtins.set",
                              "builtins.tuple", "builtins.str"})


def code_in_graph(graph: Any) -> Counter[str]:
    """What `torch.export.load` and the module it returns would run from the program's JSON, by name."""
    found: Counter[str] = Counter()
    for item, key, value in _strings(graph):
        if key == "expr_str" and not plain_expression(value, guard=False):
            found[f"sympy.sympify({_quote(value)}) (a symbolic size {LOADER} evaluates as Python)"] += 1
        elif key == "guards_code" and not plain_expression(value, guard=True):
            found[f"guard {_quote(value)} (Python the program's module runs on every call)"] += 1
        elif key == "target" and "inputs" in item and value.startswith(_RESOLVED_PREFIXES) \
                and not _SAFE_TARGET.fullmatch(value):
            found[f"{printable(value)} (a graph node calls it when the program runs)"] += 1
        elif value[:1] in "[{" and ("__enum__" in value or "default_factory_module" in value):
            for name in _spec_imports(value):
                found[f"{name} (named in a pytree spec; {LOADER} imports it)"] += 1
    return found


def _strings(root: Any) -> Iterator[tuple[dict[str, Any], str, str]]:
    """Every string value of a JSON document with the object and key holding it (a list's items under its key)."""
    stack: list[tuple[Any, Any, str]] = [(root, {}, "")]
    while stack:
        item, parent, key = stack.pop()
        if isinstance(item, str):
            yield parent, key, item
        elif isinstance(item, dict):
            stack.extend((value, item, name) for name, value in item.items())
        elif isinstance(item, list):
            stack.extend((value, parent, key) for value in item)


def _spec_imports(text: str, depth: int = 0) -> list[str]:
    """The modules a pytree spec's JSON makes `treespec_loads` import: enum classes (a node's context
    is JSON again, read with an object hook that imports them) and defaultdict factories."""
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        return []
    found = []
    for item, key, value in _strings(spec):
        if key == "fqn" and "__enum__" in item:
            found.append(printable(value.replace(":", ".")))
        elif key == "default_factory_module":
            name = f"{value}.{item.get('default_factory_name')}"
            if name not in _PLAIN_FACTORIES:
                found.append(printable(name))
        elif value[:1] in "[{" and depth < 8:
            found.extend(_spec_imports(value, depth + 1))
    return found


def _quote(text: str) -> str:
    return printable(text if len(text) <= 80 else text[:77] + "...")
