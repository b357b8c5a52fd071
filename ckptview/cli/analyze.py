"""`ckptview stats`, `ckptview bn`, `ckptview tree`: per-tensor statistics, BatchNorm checks, the module tree."""

from __future__ import annotations

import argparse
import sys
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import ckptview
from ckptview.cli import add_path_command, print_json
from ckptview.errors import printable
from ckptview.present.text import human_bytes, human_count, text_table
from ckptview.readers.model import gc_paused

if TYPE_CHECKING:
    from ckptview.analyzers.batchnorm import BatchNormReport
    from ckptview.analyzers.stats import StatsResult
    from ckptview.analyzers.tree import ModuleTree


# Rows of the text table unless --all: every model's tensors (a 70B Llama has 723), not a million
# rows nobody reads, whose text took 5 s of the command's 30 (--json lists every tensor).
STATS_ROWS = 1000


def add_commands(subparsers: Any) -> None:
    command = add_path_command(subparsers, "stats", "per-tensor statistics: min, max, mean, std, zeros, NaN/Inf")
    command.add_argument("--filter", metavar="REGEX", help="only tensors whose name matches this regular expression")
    command.add_argument("--all", action="store_true",
                         help=f"print every tensor's row (default: the first {STATS_ROWS:,}; outliers are always all listed)")
    command.set_defaults(func=stats_command)
    add_path_command(subparsers, "bn", "check BatchNorm layers: running statistics, counts, dead layers").set_defaults(func=bn_command)
    add_path_command(subparsers, "tree", "the module tree with parameters per module; repeated blocks folded").set_defaults(func=tree_command)


def stats_command(args: argparse.Namespace) -> int:
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        result = ckptview.stats(ckpt, filter=args.filter, progress=sys.stderr.isatty())
    # the rows and cells of a million tensors are none of them garbage: collections triggered by
    # making them walked every object of the result again and again (a third of the command's time)
    with gc_paused():
        if args.json:
            from ckptview.analyzers.stats import stats_row

            flags: dict[str, list[str]] = {}
            for outlier in result.outliers:
                flags.setdefault(outlier.name, []).append(outlier.check)
            print_json([stats_row(item) | {"outliers": flags.get(item.name, []), "skipped": item.skipped}
                        for item in result.tensors])
        else:
            print(render_stats(result, rows=None if args.all else STATS_ROWS))
    return 0


def render_stats(result: StatsResult, *, rows: int | None = None) -> str:
    """The statistics as an aligned text table (the first `rows` tensors, all when None) followed by the
    outliers, one line each."""
    # Column by column: each number column is formatted by one `map` of a bound format method, and
    # its NaN cells replaced after, instead of a Python call per cell (five million for a million
    # tensors, and a tuple per row, took 7 of the command's 40 s).
    tensors = result.tensors[:rows]
    column = lambda field: list(map(attrgetter(field), tensors))  # noqa: E731
    columns = [column("name"), column("dtype")]
    columns += [_numbers(column(field)) for field in ("min", "max", "mean", "std", "abs_max")]
    columns += [_percentages(column("zero_fraction")), column("nan_count"), column("inf_count")]
    lines = [text_table(list(zip(*columns)), ("name", "dtype", "min", "max", "mean", "std", "abs max", "zeros", "NaN", "Inf"),
                        align_right=(2, 3, 4, 5, 6, 7, 8, 9))]
    if len(result.tensors) > len(tensors):
        lines.append(f"... and {len(result.tensors) - len(tensors):,} more tensors (--all prints every row, --json "
                     "lists them, --filter picks some)")
    reasons = result.skipped_reasons()
    if reasons:  # the "-" cells of a skipped tensor said nothing of why
        lines.append("")
        lines.extend(printable(f"{count:,} without statistics: {reason}") for reason, count in reasons)
    if result.outliers:
        lines.append(f"\n{len(result.outliers)} outlier(s):")
        lines.extend(printable(f"  {o.name}: {o.check}: {o.message}") for o in result.outliers)
    return "\n".join(lines)


def _numbers(values: list[float]) -> list[str]:
    """Four significant digits; NaN (a statistic of no values) as "-", infinities as "inf"/"-inf"."""
    cells = list(map("{:.4g}".format, values))
    return [cell if cell != "nan" else "-" for cell in cells] if "nan" in cells else cells


def _percentages(values: list[float]) -> list[str]:
    """One decimal of a percent; "-" for the zero fraction of an empty tensor (NaN)."""
    cells = list(map("{:.1%}".format, values))
    return [cell if cell != "nan%" else "-" for cell in cells] if "nan%" in cells else cells


def bn_command(args: argparse.Namespace) -> int:
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        report = ckptview.batchnorm_checks(ckpt)
    if args.json:
        print_json([{"check": f.check, "severity": f.severity, "module": f.module, "tensors": list(f.tensors),
                     "message": f.message} for f in report.findings])
        return 0
    print(render_batchnorm(report))
    return 0


def render_batchnorm(report: BatchNormReport) -> str:
    """Findings grouped by severity, worst first, one paragraph each; layers with the same finding in the
    same words share one paragraph (an untrained ResNet's 53 layers all say their statistics were never
    updated), their names folded as key lists are."""
    from ckptview.analyzers.keydiff import compress_keys

    lines = [f"{len(report.layers)} BatchNorm layer(s), {len(report.problems)} problem(s)"]
    for severity in ("error", "warning", "info", "ok"):
        alike: dict[tuple[str, str], list[str]] = {}
        for finding in (f for f in report.findings if f.severity == severity):
            alike.setdefault((finding.check, finding.message), []).append(finding.module)
        for (check, message), modules in alike.items():
            named = [module for module in modules if module]
            where = (f" in {len(named)} layers ({', '.join(compress_keys(named))})" if len(named) > 1
                     else f" {named[0]}" if named else "")
            lines.append(printable(f"[{severity}] {check}{where}: {message}"))
    return "\n".join(lines)


def tree_command(args: argparse.Namespace) -> int:
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        tree = ckptview.module_tree(ckpt)
    if args.json:
        print_json(tree.to_records())
        return 0
    print(render_tree(tree))
    return 0


def render_tree(tree: ModuleTree) -> str:
    """One line per node, indented by depth: name (×repeat), parameters, bytes, share, layer kinds."""
    rows = []
    for depth, node in tree.walk():
        name = "  " * depth + node.name + (f" ×{node.repeat}" if node.repeat > 1 else "")
        rows.append((name, human_count(node.parameter_count), human_bytes(node.nbytes), f"{node.share:.1%}",
                     ", ".join(node.layer_kinds[:3])))
    root = tree.root
    table = text_table(rows, ("module", "params", "size", "share", "layers"), align_right=(1, 2, 3))
    return f"{table}\n\n{root.tensor_count:,} tensors, {root.parameter_count:,} elements, {human_bytes(root.nbytes)}"
