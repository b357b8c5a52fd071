"""
The shareable report: one self-contained HTML file with what the explorer's tabs show (overview,
tensors, module tree, statistics, BatchNorm, training state and, given a second checkpoint, the key
and value diff with the load doctor's fixes). plotly's JavaScript is embedded once, so the page
opens offline, without a server or a kernel: a file to attach to a bug report or a pull request.

The sections are rendered by the same functions as the explorer's panels (`present.views` computes,
`present.html` and `present.figures` render); a section that fails shows its error, like a tab.
"""

from __future__ import annotations

import datetime
import os
import secrets
from collections.abc import Callable

import plotly.graph_objects as go

import ckptview
from ckptview.analyzers.stats import stats
from ckptview.analyzers.table import tensor_table
from ckptview.analyzers.training import moment_norms, training_state
from ckptview.analyzers.tree import module_tree
from ckptview.errors import CkptviewError
from ckptview.present import figures
from ckptview.present.frames import sections_frame, stats_frame, summary, tensor_labels
from ckptview.present.html import (
    STYLE,
    banner_html,
    batchnorm_findings_html,
    counters_html,
    esc,
    fixes_html,
    header_html,
    key_diff_html,
    matching_html,
    metadata_html,
    moment_norms_html,
    sections_html,
    stats_findings_html,
    stats_summary_html,
    table_html,
    tensors_html,
    training_html,
    tree_html,
)
from ckptview.present.training_figures import lr_schedule_figure, moment_norms_figure
from ckptview.present.text import not_compared_text
from ckptview.present.views import (
    batchnorm_view,
    compare_keys,
    compare_values,
    match_formats,
    model_treemap,
    module_changes_frame,
)
from ckptview.readers.model import ROOT_NAME, Checkpoint, dotted_name

# Rows and nodes written at most: the page stays a few MB for a 20,000-tensor file (the CLI's
# `ckptview tensors --json` has every row).
MAX_TENSOR_ROWS = 5000
MAX_TREE_NODES = 3000
MAX_CHANGED_ROWS = 50

_PAGE_STYLE = """
<style>
body {font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; padding: 12px 20px;
      max-width: 1400px; color: #202124; background: #fff}
nav {position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid #e0e0e0; z-index: 10}
nav a {margin-right: 14px; font-size: 13px}
section {margin: 18px 0} h2 {font-size: 18px; border-bottom: 1px solid #e0e0e0; padding-bottom: 4px}
.ckptview-plot {width: 100%; overflow: hidden}
.ckptview-scroll {max-height: 640px; overflow: auto}
footer {color: #5f6368; font-size: 11px; margin-top: 24px}
</style>
"""


class ReportExistsError(CkptviewError, FileExistsError):
    """The report's path exists and `force` was not given."""


def write_report(path: str | os.PathLike[str] | Checkpoint, out: str | os.PathLike[str], *,
                 compare: str | os.PathLike[str] | None = None, force: bool = False, trust: bool = False) -> str:
    """
    Write a self-contained HTML report of a checkpoint (see `ckptview.report`).

    Returns:
        The path written.

    Raises:
        ReportExistsError: `out` exists and `force` is False (nothing is read or written).
        CkptviewError: the checkpoint (or the one to compare with) cannot be opened.
    """
    out = os.fspath(out)
    if os.path.exists(out) and not force:
        raise ReportExistsError(out, "exists; ckptview does not overwrite files unless asked: pass force=True "
                                     "(--force) or choose another path")
    owned = not isinstance(path, Checkpoint)
    ckpt = ckptview.open(path, trust=trust) if owned else path
    try:
        other = ckptview.open(compare, trust=trust) if compare is not None else None
        try:
            page = render(ckpt, other)
        finally:
            if other is not None:
                other.close()
    finally:
        if owned:
            ckpt.close()
    _write_atomically(out, page)
    return out


def render(ckpt: Checkpoint, other: Checkpoint | None = None) -> str:
    """The report's HTML for an open checkpoint (and one to compare it with)."""
    from plotly.offline import get_plotlyjs

    facts = summary(ckpt)
    parts: list[tuple[str, str, Callable[[], str]]] = [
        ("overview", "Overview", lambda: _overview(ckpt)),
        ("tensors", "Tensors", lambda: _tensors(ckpt)),
        ("tree", "Module tree", lambda: tree_html(module_tree(ckpt), open_depth=1, max_nodes=MAX_TREE_NODES)),
        ("statistics", "Statistics", lambda: _statistics(ckpt)),
        ("batchnorm", "BatchNorm", lambda: _batchnorm(ckpt)),
        ("training", "Training state", lambda: _training(ckpt)),
    ]
    if other is not None:
        parts.append(("compare", f"Compare with {summary(other).name}", lambda: _compare(ckpt, other)))
    nav = "".join(f"<a href='#{anchor}'>{esc(title)}</a>" for anchor, title, _ in parts)
    body = "".join(f"<section id='{anchor}'><h2>{esc(title)}</h2>{_guarded(build)}</section>"
                   for anchor, title, build in parts)
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(facts.name)}: ckptview report</title>{STYLE}{_PAGE_STYLE}"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body class='ckptview-report'>{header_html(facts)}<nav>{nav}</nav>{body}"
        f"<footer>Written by ckptview {esc(ckptview.__version__)} on {made}; the checkpoint's code was not run."
        "</footer></body></html>"
    )


def _guarded(build: Callable[[], str]) -> str:
    try:
        return build()
    except CkptviewError as exc:
        return banner_html("error", f"ckptview: error: {exc}")


def figure_html(figure: go.Figure) -> str:
    """A figure as a `<div>` that draws itself with the page's one copy of plotly, as wide as its container."""
    return ("<div class='ckptview-plot'>"
            + figure.to_html(full_html=False, include_plotlyjs=False, default_width="100%",
                             config={"responsive": True, "displaylogo": False})
            + "</div>")


def _overview(ckpt: Checkpoint) -> str:
    return sections_html(sections_frame(ckpt)) + metadata_html(ckpt.metadata) + figure_html(model_treemap(ckpt))


def _tensors(ckpt: Checkpoint) -> str:
    frame = tensor_table(ckpt).to_frame()
    labels = tensor_labels(ckpt)
    frame["label"] = [labels.get(name, name) for name in frame["name"]]
    return f"<div class='ckptview-scroll'>{tensors_html(frame, max_rows=MAX_TENSOR_ROWS)}</div>"


def _statistics(ckpt: Checkpoint) -> str:
    result = stats(ckpt, progress=False)
    frame = stats_frame(ckpt, result)
    plot = figure_html(figures.stats_by_depth(frame, {o.name for o in result.outliers})) if len(frame) else ""
    return f"<p>{stats_summary_html(result, frame)}</p>{plot}{stats_findings_html(result, tensor_labels(ckpt))}"


def _batchnorm(ckpt: Checkpoint) -> str:
    report, figure = batchnorm_view(ckpt)
    return batchnorm_findings_html(report) + (figure_html(figure) if figure is not None else "")


def _training(ckpt: Checkpoint) -> str:
    training = training_state(ckpt)
    parts = [training_html(training)]
    drawn = [(f"scheduler {s.index} ({s.class_name})", schedule)
             for s, schedule in zip(training.scheduler_states, training.lr_schedules()) if schedule.steps]
    if drawn:
        parts.append(figure_html(lr_schedule_figure(drawn, "learning-rate schedule")))
    for optimizer in training.optimizers:
        norms = moment_norms(ckpt, optimizer)
        if norms:
            where = dotted_name(optimizer.path) or ROOT_NAME
            parts.append(figure_html(moment_norms_figure(norms, f"optimizer moments per parameter ({where})"))
                         + "<details><summary>optimizer state norms per parameter (table)</summary>"
                         + moment_norms_html(norms) + "</details>")
    return "".join(parts)


def _compare(ckpt: Checkpoint, other: Checkpoint) -> str:
    keys, diagnosis = compare_keys(ckpt, other)
    parts = [key_diff_html(keys, "the other checkpoint", "this one")]
    if diagnosis is not None:
        parts.append(fixes_html(diagnosis, "To load the other checkpoint where this one's keys are expected"))
    comparison = compare_values(ckpt, other, diagnosis)
    changes = comparison.values
    frame = module_changes_frame(changes)
    # two formats (a .pt and its ONNX export): what each tensor became in the other file, as the explorer shows it
    matched = match_formats(ckpt, other)
    pairing = ""
    if matched is not None:
        pairing = ("<h4>What each tensor became across formats</h4>"
                   + matching_html(matched.matching, summary(matched.left).name, summary(matched.right).name))
    if frame.empty:
        parts.append(banner_html("info", "no tensors with the same name and shape on both sides: no values compared"))
        return "".join(parts) + pairing
    parts.append(f"<p>{len(changes.tensors):,} tensors compared, {len(changes.changed()):,} differ"
                 f"{esc(not_compared_text(changes.unreadable))}.</p>")
    parts.append(figure_html(figures.value_diff_by_module(frame)))
    parts.append(counters_html(comparison.counters))
    drifted = [t for t in changes.changed() if not t.is_counter]
    rows = [(f"<td><code>{esc(t.key)}</code></td>", f"<td class='num'>{t.rel_change:.3g}</td>",
             f"<td class='num'>{t.max_abs_diff:.3g}</td>", f"<td class='num'>{t.cosine:.6f}</td>",
             f"<td class='num'>{t.fraction_changed:.1%}</td>")
            for t in sorted(drifted, key=lambda t: -t.rel_change)[:MAX_CHANGED_ROWS]]
    if rows:
        parts.append(f"<h4>Tensors that changed most (of {len(drifted):,})</h4>"
                     + table_html(["tensor", "relative change", "max abs diff", "cosine", "elements changed"], rows))
    return "".join(parts) + pairing


def _write_atomically(out: str, text: str) -> None:
    # A temporary file in the same folder renamed into place: a reader never sees half a report,
    # and an interrupted write leaves the old one (if any) as it was. Opened with "x" (not mkstemp)
    # so it gets the usual permissions, not mkstemp's owner-only ones.
    directory = os.path.dirname(os.path.abspath(out))
    temp = os.path.join(directory, f".{os.path.basename(out)}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp, "x", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temp, out)
    except OSError as exc:
        _remove(temp)
        raise CkptviewError(out, f"cannot write the report here ({exc.strerror or exc}); choose another path") from exc
    except BaseException:
        _remove(temp)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
