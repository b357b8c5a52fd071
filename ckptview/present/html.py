"""
HTML fragments of the analyzers' results: the explorer's panels put them in `widgets.HTML`, and the
report (`ckptview.report`) puts the same fragments in one page, so both say the same thing.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ckptview.present.frames import Summary, flat_values, optimizer_groups_frame
from ckptview.present.text import human_bytes, human_count, shape_text
from ckptview.readers.model import ROOT_NAME, dotted_name

if TYPE_CHECKING:
    import pandas as pd

    from ckptview.analyzers.batchnorm import BatchNormReport
    from ckptview.analyzers.crossformat import CrossFormatMatch
    from ckptview.analyzers.doctor import Diagnosis
    from ckptview.analyzers.keydiff import KeyDiff
    from ckptview.analyzers.stats import StatsResult
    from ckptview.analyzers.training import LrSchedule, MomentNorm, SchedulerState, TrainingState
    from ckptview.analyzers.tree import ModuleTree, TreeNode

# Colours come from JupyterLab's theme variables where the page has them (light and dark themes,
# Voila), with light fallbacks for a page that has none (the report). An HTML widget's content is a
# flex item that would never shrink below its widest table (min-width: auto); min-width 0 lets the
# table take the panel's width and scroll inside it on a narrow page.
STYLE = """
<style>
.ckptview-explorer, .ckptview-report {--ckv-muted: var(--jp-ui-font-color2, #5f6368);
  --ckv-border: var(--jp-border-color2, #e0e0e0); --ckv-code-bg: var(--jp-layout-color2, #f6f8fa)}
.ckptview-banner-error {background:#fdecea;border-left:4px solid #d93025;padding:6px 10px;margin:4px 0;color:#5f2120}
.ckptview-banner-info {background:#e8f0fe;border-left:4px solid #1a73e8;padding:6px 10px;margin:4px 0;color:#174ea6}
.ckptview-banner-warning {background:#fef7e0;border-left:4px solid #f9ab00;padding:6px 10px;margin:4px 0;color:#5c4400}
.ckptview-mono select, .ckptview-mono textarea, .ckptview-mono-line {font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace !important; font-size: 12px}
.ckptview-mono-line {white-space: pre; padding-left: 5px; font-weight: 600}
.ckptview-table {border-collapse:collapse;font-size:12px;line-height:1.4;margin:4px 0;
  display:block;max-width:100%;overflow-x:auto}
.ckptview-explorer .widget-html-content {min-width:0}
.ckptview-tree, .ckptview-explorer p, .ckptview-explorer li {line-height:1.5}
.ckptview-table th, .ckptview-table td {padding:2px 8px;border-bottom:1px solid var(--ckv-border);text-align:left;vertical-align:top}
.ckptview-table td.num {text-align:right;font-variant-numeric:tabular-nums}
.ckptview-badge {display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;margin-left:6px}
.ckptview-badge-ok {background:#e6f4ea;color:#137333}
.ckptview-badge-danger {background:#fce8e6;color:#a50e0e}
.ckptview-tree details {margin-left:14px} .ckptview-tree summary {cursor:pointer}
.ckptview-tree .meta, .ckptview-muted {color:var(--ckv-muted);font-size:11px;margin-left:6px}
.ckptview-code {background:var(--ckv-code-bg);padding:4px;white-space:pre-wrap;font-size:12px}
.ckptview-explorer .js-plotly-plot .main-svg .gtitle, .ckptview-report .js-plotly-plot .main-svg .gtitle,
.ckptview-explorer .js-plotly-plot g[class*="tick"] > text, .ckptview-report .js-plotly-plot g[class*="tick"] > text,
.ckptview-explorer .js-plotly-plot g[class*="title"] > text, .ckptview-report .js-plotly-plot g[class*="title"] > text,
.ckptview-explorer .js-plotly-plot .legendtext, .ckptview-report .js-plotly-plot .legendtext,
.ckptview-explorer .js-plotly-plot .annotation-text, .ckptview-report .js-plotly-plot .annotation-text,
.ckptview-explorer .js-plotly-plot .heatmap-label text, .ckptview-report .js-plotly-plot .heatmap-label text
  {fill: var(--jp-ui-font-color1, #2a3f5f) !important}
.ckptview-explorer .js-plotly-plot .gridlayer path, .ckptview-report .js-plotly-plot .gridlayer path
  {stroke: var(--jp-border-color2, #ebf0f8) !important}
.ckptview-explorer .js-plotly-plot .zerolinelayer path {stroke: var(--jp-border-color1, #ebf0f8) !important}
.ckptview-plot-box {width: 100%; min-width: 0; overflow: hidden}
.ckptview-plot-title {font: 13px "Open Sans", verdana, arial, sans-serif; color: var(--jp-ui-font-color1, #2a3f5f);
  padding-top: 6px; line-height: 1.35; overflow-wrap: anywhere}
.ckptview-plot-box .js-plotly-plot .svg-container {height: auto !important}
.ckptview-plot-box .js-plotly-plot .svg-container > .main-svg:first-child {position: relative; display: block}
.ckptview-explorer .widget-tab > .lm-TabBar .lm-TabBar-content {flex-wrap: wrap}
.ckptview-explorer .widget-checkbox {height: auto; min-height: var(--jp-widgets-inline-height, 28px)}
.ckptview-explorer .widget-checkbox > .widget-label-basic {white-space: normal; line-height: 1.4; padding: 5px 0}
.ckptview-explorer .widget-tab > .lm-TabBar {height: auto; min-height: var(--jp-widgets-horizontal-tab-height, 24px)}
.ckptview-explorer .widget-tab > .lm-TabBar .lm-TabBar-tab {flex: 0 0 auto; min-width: 0; max-width: none}
.ckptview-cards {container-type: inline-size}
@container (max-width: 560px) {
  .ckptview-cards .ckptview-table, .ckptview-cards tbody, .ckptview-cards tr, .ckptview-cards td {display:block}
  .ckptview-cards th {display:none}
  .ckptview-cards tr {border-bottom:1px solid var(--ckv-border); padding:3px 0}
  .ckptview-cards td {border:0; padding:1px 4px; overflow-wrap:anywhere}
  .ckptview-cards td.num {text-align:left}
  .ckptview-cards td:empty {display:none}
  .ckptview-cards td::before {content: attr(data-label) ": "; color: var(--ckv-muted); font-weight:normal}
}
.sev-error {color:#d93025;font-weight:600} .sev-warning {color:#e37400;font-weight:600}
.sev-info {color:#1a73e8} .sev-ok {color:#188038}
</style>
"""

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2, "ok": 3}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def banner_html(kind: str, message: str) -> str:
    return f'<div class="ckptview-banner-{kind}">{esc(message)}</div>'


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], *, cards_when_narrow: bool = False) -> str:
    """
    A table of already-escaped cells (each a `<td ...>...</td>`). `cards_when_narrow`: for findings whose
    last column is prose; where the table has under 560 px (a notebook beside the file browser), each row
    becomes a card of labelled lines. Scrolled sideways instead, the prose sat off the screen and
    stretched every row to a column of single words.
    """
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    if cards_when_narrow:
        rows = [[cell.replace("<td", f"<td data-label='{esc(header[i])}'", 1) if i < len(header) else cell
                 for i, cell in enumerate(row)] for row in rows]
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    table = f"<table class='ckptview-table'>{head}{body}</table>"
    return f"<div class='ckptview-cards'>{table}</div>" if cards_when_narrow else table


def header_html(facts: Summary) -> str:
    """The explorer's header line: name, format, sizes, counts, sections and the safety badge."""
    badge_class = "ckptview-badge-danger" if facts.needs_code else "ckptview-badge-ok"
    return (
        f"<div style='display:flex;align-items:baseline;gap:10px;flex-wrap:wrap'>"
        f"<b style='font-size:16px'>{esc(facts.name)}</b>"
        f"<span>{esc(facts.format)}</span><span>{human_bytes(facts.file_size)} on disk</span>"
        f"<span>{facts.tensor_count:,} tensors</span>"
        f"<span>{human_count(facts.parameter_count)} parameters ({human_bytes(facts.total_bytes)})</span>"
        f"<span>sections: {esc(', '.join(facts.section_kinds) or 'none')}</span>"
        f"<span class='ckptview-badge {badge_class}' title='{esc(', '.join(facts.imports))}'>"
        f"{esc(facts.safety_text)}</span></div>"
        f"<div class='ckptview-muted' style='margin-left:0'>{esc(facts.path)}</div>"
        + (f"<div class='ckptview-muted' style='margin-left:0'>loading: {esc(facts.loader_obstacle)}</div>"
           if facts.loader_obstacle and not facts.needs_code else "")
        + "".join(f"<div class='ckptview-banner-warning'>{esc(problem)}</div>"
                  for problem in facts.problems)
        + _set_html(facts)
    )


def _set_html(facts: Summary) -> str:
    """A sharded set's config.json and its shards, folded under the header line."""
    if not (facts.shards or facts.config):
        return ""
    config = " · ".join(f"{esc(label)} <b>{esc(value)}</b>" for label, value in facts.config)
    line = (f"<div>config.json: {config}</div>" if config
            else "<div class='ckptview-muted' style='margin-left:0'>no config.json beside the index</div>")
    declared = ""
    if facts.declared_bytes is not None:
        same = "the same" if facts.declared_bytes == facts.total_bytes else f"the tensors take {facts.total_bytes:,}"
        declared = (f"<div class='ckptview-muted' style='margin-left:0'>the index declares {facts.declared_bytes:,} "
                    f"bytes of tensor data ({same})</div>")
    rows = [(f"<td><code>{esc(name)}</code></td>", f"<td class='num'>{esc(human_bytes(size))}</td>")
            for name, size in facts.shards]
    shards = (f"<details><summary>{len(facts.shards)} shards, {human_bytes(sum(s for _, s in facts.shards))}"
              f"</summary>{table_html(['shard', 'size on disk'], rows)}</details>" if rows else "")
    return line + shards + declared


def sections_html(frame: pd.DataFrame) -> str:
    """The Overview's sections table (`frames.sections_frame`); what a kind of section is, said once."""
    said: set[str] = set()
    rows = []
    for r in frame.to_dict("records"):
        meaning = "" if r["what it is"] in said else r["what it is"]
        said.add(r["what it is"])
        rows.append((f"<td><b>{esc(r['section'])}</b></td>", f"<td><code>{esc(r['path'])}</code></td>",
                     f"<td class='num'>{r['tensors']:,}</td>", f"<td>{_contents_html(r['contents'])}</td>",
                     f"<td class='ckptview-muted'>{esc(meaning)}</td>"))
    return table_html(["section", "path", "tensors", "contents", "what it is"], rows, cards_when_narrow=True)


def _contents_html(text: str) -> str:
    """A section's contents: a structure given line by line (a Keras model's layers) folded under its
    first line, a long list of values folded after its start."""
    first, _, rest = str(text).partition("\n")
    if rest:
        return (f"<details><summary>{esc(first)}</summary><div style='white-space:pre-line'>{esc(rest)}</div>"
                "</details>")
    if len(first) > 300:
        return f"<details><summary>{esc(first[:200])}…</summary>{esc(first)}</details>"
    return esc(first)


METADATA_ROWS = 60


def metadata_html(metadata: Mapping[str, Any]) -> str:
    """The file's own metadata (GGUF keys, safetensors `__metadata__`), large arrays already summarised."""
    items = list(metadata.items())
    if not items:
        return ""
    rows = [(f"<td><code>{esc(k)}</code></td>", f"<td>{esc(_clip(v))}</td>") for k, v in items[:METADATA_ROWS]]
    more = (f"<div class='ckptview-muted'>… and {len(items) - METADATA_ROWS:,} more keys</div>"
            if len(items) > METADATA_ROWS else "")
    return table_html(["metadata", "value"], rows) + more


def _clip(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 160 else text[:157] + "…"


def tensors_html(frame: pd.DataFrame, *, max_rows: int) -> str:
    """The tensor table (`TensorTable.to_frame()`, with `label` shown for a name when it has one), file
    order, at most `max_rows` rows."""
    shown = frame.head(max_rows)
    rows = [(f"<td><code title='{esc(r['name'])}'>{esc(r.get('label', r['name']))}</code></td>", f"<td>{esc(shape_text(r['shape']))}</td>",
             f"<td>{esc(r['encoding'] or r['dtype'])}</td>", f"<td>{esc(r['layer_kind'])}</td>",
             f"<td>{esc(r['role'])}</td>", f"<td class='num'>{r['numel']:,}</td>",
             f"<td class='num'>{esc(human_bytes(r['nbytes']))}</td>") for r in shown.to_dict("records")]
    more = f"<p>… and {len(frame) - len(shown):,} more tensors.</p>" if len(frame) > len(shown) else ""
    return table_html(["name", "shape", "dtype", "layer kind", "role", "elements", "size"], rows) + more


def tree_html(tree: ModuleTree, *, open_depth: int, max_nodes: int) -> str:
    """Modules as nested `<details>`: elements, bytes, share and layer kinds; at most `max_nodes` drawn."""
    budget = [max_nodes]
    body = "".join(_node_html(child, 0, open_depth, budget) for child in tree.root.children)
    note = "" if budget[0] > 0 else f"<p>Only the first {max_nodes:,} modules are drawn; use the Tensors tab for the rest.</p>"
    total = tree.root
    return (f"<div class='ckptview-tree'><b>{human_count(total.parameter_count)}</b> elements, "
            f"{human_bytes(total.nbytes)}, {total.tensor_count:,} tensors{body}{note}</div>")


def _node_html(node: TreeNode, depth: int, open_depth: int, budget: list[int]) -> str:
    if budget[0] <= 0:
        return ""
    budget[0] -= 1
    repeat = f" <b>×{node.repeat}</b>" if node.repeat > 1 else ""
    kinds = " · " + esc(", ".join(node.layer_kinds[:3])) if node.layer_kinds else ""
    meta = (f"<span class='meta'>{human_count(node.parameter_count)} · {human_bytes(node.nbytes)} · "
            f"{node.share:.1%} of {node.share_of} · {node.tensor_count:,} tensors{kinds}</span>")
    label = f"<code>{esc(node.name)}</code>{repeat}{meta}"
    leaves = ", ".join(node.tensors)
    if not node.children:
        return f"<details><summary>{label}</summary><div class='meta' style='margin-left:18px'>{esc(leaves)}</div></details>"
    inner = "".join(_node_html(child, depth + 1, open_depth, budget) for child in node.children)
    own = f"<div class='meta' style='margin-left:18px'>{esc(leaves)}</div>" if leaves else ""
    return f"<details{' open' if depth < open_depth else ''}><summary>{label}</summary>{own}{inner}</details>"


def stats_summary_html(result: StatsResult, frame: pd.DataFrame) -> str:
    flagged = {o.name for o in result.outliers}
    nonfinite = int(((frame["nan_count"] > 0) | (frame["inf_count"] > 0)).sum()) if len(frame) else 0
    # otherwise a file whose every tensor was skipped (values never saved, all complex) showed an empty
    # plot, NaN cells and "no outliers", with the why in a column scrolled out of sight
    skipped = "".join(f" {count:,} without statistics: {esc(reason)}."
                      for reason, count in result.skipped_reasons()[:3])
    return (f"<b>{len(frame):,}</b> tensors; <b>{len(result.outliers)}</b> findings on "
            f"{len(flagged)} tensors; {nonfinite} tensors hold NaN or Inf.{skipped}")


def stats_findings_html(result: StatsResult, labels: Mapping[str, str] | None = None, *, max_names: int = 12) -> str:
    """
    The statistics findings grouped by check: one row per check with its meaning once and the
    tensors it found (a check that fires on 13 tensors is one row naming 13 tensors, not 13 rows).
    """
    groups: dict[str, list[Any]] = {}
    for outlier in result.outliers:
        groups.setdefault(outlier.check, []).append(outlier)
    if not groups:
        return "<p>No outliers: no NaN/Inf, no all-zero or collapsed tensors.</p>"
    rows = []
    for check, members in groups.items():
        names = ", ".join(f"<code title='{esc(o.message)}'>{esc((labels or {}).get(o.name, o.name))}</code>"
                          for o in members[:max_names])
        more = f" and {len(members) - max_names:,} more" if len(members) > max_names else ""
        meaning = _shared_meaning(members)
        rows.append((f"<td class='sev-warning'>{esc(check)}</td>", f"<td class='num'>{len(members):,}</td>",
                     f"<td>{names}{more}</td>", f"<td>{esc(meaning)}</td>"))
    return table_html(["finding", "tensors", "which", "what it means"], rows, cards_when_narrow=True)


def _shared_meaning(members: Sequence[Any]) -> str:
    """The message they all give; else the explanation after the tensors' own figures when they share it; else the first."""
    messages = {m.message for m in members}
    if len(messages) == 1:
        return messages.pop()
    tails = {m.split(": ", 1)[-1] for m in messages}
    return tails.pop() if len(tails) == 1 else members[0].message


def batchnorm_findings_html(report: BatchNormReport, *, max_modules: int = 12) -> str:
    """BatchNorm findings by severity, one row per check and severity naming the layers it concerns."""
    if not report.layers:
        from ckptview.analyzers.batchnorm import NO_LAYERS  # loaded already: it made the report

        # the summary says why there are none where it can tell (an export folded them into convolutions)
        summary = next((f.message for f in report.findings if f.check == "summary"), NO_LAYERS)
        return f"<p>{esc(summary[:1].upper() + summary[1:])}.</p>"
    findings = sorted(report.findings, key=lambda f: _SEVERITY_ORDER.get(f.severity, 9))
    groups: dict[tuple[str, str], list[Any]] = {}
    for finding in findings:
        groups.setdefault((finding.severity, finding.check), []).append(finding)
    rows = []
    for (severity, check), members in groups.items():
        modules = ", ".join(f"<code title='{esc(f.message)}'>{esc(f.module or '—')}</code>" for f in members[:max_modules])
        more = f" and {len(members) - max_modules:,} more" if len(members) > max_modules else ""
        messages = list(dict.fromkeys(f.message for f in members))
        meaning = messages[0] if len(messages) == 1 else f"{messages[0]} (first of {len(members)}; the others alike)"
        rows.append((f"<td class='sev-{esc(severity)}'>{esc(severity)}</td>", f"<td>{esc(check)}</td>",
                     f"<td>{modules}{more}</td>", f"<td>{esc(meaning)}</td>"))
    counts = ", ".join(f"{sum(f.severity == s for f in findings)} {s}" for s in ("error", "warning", "info"))
    return (f"<p><b>{len(report.layers)}</b> BatchNorm layers; findings: {counts}.</p>"
            + table_html(["severity", "check", "module", "what it means"], rows, cards_when_narrow=True))


# Per-parameter rows drawn at most per optimizer (an LLM's optimizer has thousands).
MAX_PARAM_ROWS = 500


def training_html(training: TrainingState) -> str:
    """Progress, hyper-parameters, Lightning, scaler, schedulers and each optimizer with its per-parameter state."""
    parts = []
    for title, values in (("Progress", training.progress), ("Hyper-parameters", training.hyper_parameters),
                          ("Lightning", training.lightning), ("AMP grad scaler", training.grad_scaler)):
        if values:
            parts.append(values_table_html(title, values))
    schedules = training.lr_schedules()
    for scheduler, schedule in zip(training.scheduler_states, schedules):
        parts.append(scheduler_html(scheduler, schedule))
    for optimizer in training.optimizers:
        path = dotted_name(optimizer.path) or ROOT_NAME
        params = optimizer.to_frame()
        shown = params.head(MAX_PARAM_ROWS)
        more = f"<p>… and {len(params) - len(shown):,} more parameters.</p>" if len(params) > len(shown) else ""
        parts.append(
            f"<h4>Optimizer <code>{esc(path)}</code>: {esc(optimizer.optimizer_kind)}</h4>"
            f"<p>Parameter names: {esc(optimizer.mapping_note)}</p>"
            + optimizer_groups_frame(optimizer).to_html(index=False, classes="ckptview-table", border=0)
            + "<details><summary>per-parameter state</summary>"
            + shown.to_html(index=False, classes="ckptview-table", border=0, na_rep="—") + more + "</details>"
        )
    return "".join(parts) or ("<p>No training state: this checkpoint holds only weights (no optimizer, scheduler, "
                              "epoch or hyper-parameters).</p>")


def scheduler_html(scheduler: SchedulerState, schedule: LrSchedule | None = None) -> str:
    """
    A scheduler: its class and how it was named, the lr it last set, its fields (not its private
    bookkeeping: `_step_count`, `_get_lr_called_within_step`, ...), and how its schedule was drawn.
    """
    if scheduler.class_name is None:
        named = "class unknown (its fields match no torch scheduler)"
    elif scheduler.named_by == "recorded":
        named = f"{esc(scheduler.class_name)} <span class='ckptview-muted'>(the file records its class)</span>"
    else:
        named = (f"{esc(scheduler.class_name)} <span class='ckptview-muted'>(inferred from its fields: a scheduler's "
                 "state_dict does not store its class)</span>")
    values = dict(scheduler.fields)
    if scheduler.last_lr is not None:
        values = {"last lr set": ", ".join(f"{v:.6g}" for v in scheduler.last_lr), **values}
    rows = [(f"<th>{esc(k)}</th>", f"<td>{esc(v)}</td>") for k, v in flat_values(values).items()]
    children = "".join(scheduler_html(child) for child in scheduler.children)
    inner = f"<div style='margin-left:16px'>{children}</div>" if children else ""
    note = f"<p class='ckptview-muted' style='margin-left:0'>Schedule: {esc(schedule.note)}</p>" if schedule else ""
    tag = "h4" if schedule is not None else "h5"
    return f"<{tag}>LR scheduler {scheduler.index}: {named}</{tag}>" + table_html([], rows) + note + inner


def moment_norms_html(norms: Sequence[MomentNorm], *, max_rows: int = MAX_PARAM_ROWS) -> str:
    """The optimizer's state tensors per parameter: one row each, L2 norm and RMS per moment."""
    rows: dict[str, dict[str, MomentNorm]] = {}
    for norm in norms:
        rows.setdefault(norm.parameter, {})[norm.moment] = norm
    moments = list(dict.fromkeys(n.moment for n in norms))
    header = ["parameter", "elements"] + [f"{label} {m}" for m in moments for label in ("‖·‖", "RMS")]
    body = []
    for parameter, by_moment in list(rows.items())[:max_rows]:
        numel = next(iter(by_moment.values())).numel
        cells = [f"<td><code>{esc(parameter)}</code></td>", f"<td class='num'>{numel:,}</td>"]
        for moment in moments:
            norm = by_moment.get(moment)
            cells += ([f"<td class='num'>{norm.l2_norm:.4g}</td>", f"<td class='num'>{norm.rms:.4g}</td>"]
                      if norm else ["<td></td>", "<td></td>"])
        body.append(cells)
    more = f"<p>… and {len(rows) - max_rows:,} more parameters.</p>" if len(rows) > max_rows else ""
    return table_html(header, body) + more


def values_table_html(title: str, values: Mapping[str, Any]) -> str:
    rows = [(f"<th>{esc(k)}</th>", f"<td>{esc(v)}</td>") for k, v in flat_values(values).items()]
    return f"<h4>{esc(title)}</h4>" + table_html([], rows)


def key_diff_html(diff: KeyDiff, left: str, right: str) -> str:
    """The key diff in `load_state_dict`'s words: loading `left` into `right`."""
    if diff.ok:
        return banner_html("info", f"Keys and shapes match: {diff.matched:,} tensors in both." +
                           (f" {len(diff.dtype_mismatches)} differ in dtype (load_state_dict casts them)."
                            if diff.dtype_mismatches else ""))
    return (f"<p>Loading {left} into {right}: {diff.matched:,} tensors match; {len(diff.missing):,} only in {right} "
            f"(missing), {len(diff.unexpected):,} only in {left} (unexpected), {len(diff.shape_mismatches):,} shape "
            "mismatches.</p>"
            f"<pre style='white-space:pre-wrap;font-size:12px;background:#fdecea;color:#5f2120;padding:6px'>"
            f"{esc(diff.message())}</pre>")


def counters_html(counters: Sequence[tuple[str, str, str]]) -> str:
    """Integer buffers that moved between two checkpoints, as counts (compared exactly), apart from value drift."""
    if not counters:
        return ""
    rows = [(f"<td><code>{esc(key)}</code></td>", f"<td class='num'>{esc(left)}</td>",
             f"<td class='num'>{esc(right)}</td>") for key, left, right in counters]
    return ("<p>Integer counters that moved (compared exactly; a count such as BatchNorm's num_batches_tracked, "
            "not value drift):</p>" + table_html(["counter", "this checkpoint", "the other"], rows))


MATCHING_ROWS = 200
_UNEXPLAINED_NAMES = 50
# The verdict's counts in words ("2 by name, 4 folded"); the table keeps the `how` values themselves.
_HOW_WORDS = {"name": "by name", "content": "by content", "graph_constant": "graph constants"}


def matching_html(matching: CrossFormatMatch, left: str, right: str, *, max_rows: int = MATCHING_ROWS) -> str:
    """
    What each tensor of `left` became in `right` (two files of different formats): a one-line verdict,
    one row per match (left key(s), right key, how, max |diff|, detail), then the keys nothing explains.
    """
    counts = ", ".join(f"{n:,} {_HOW_WORDS.get(how, how)}" for how, n in matching.counts().items())
    sides = f"{left} ({matching.left_format}) → {right} ({matching.right_format})"
    if matching.complete:
        verdict = banner_html("info", f"{sides}: every tensor paired or explained ({counts}).")
    else:
        unexplained = len(matching.unexplained_left) + len(matching.unexplained_right)
        verdict = banner_html("warning", f"{sides}: {unexplained:,} unexplained ({len(matching.unexplained_left):,} "
                              f"in {left}, {len(matching.unexplained_right):,} in {right}); "
                              f"the rest: {counts or 'nothing'}.")
    shown = matching.matches[:max_rows]
    rows = [("<td>" + "<br>".join(f"<code>{esc(k)}</code>" for k in m.left_keys) + "</td>",
             f"<td><code>{esc(m.right)}</code></td>" if m.right is not None else "<td></td>", f"<td>{esc(m.how)}</td>",
             f"<td class='num'>{'' if m.max_abs_diff is None else f'{m.max_abs_diff:.3g}'}</td>",
             f"<td class='ckptview-muted'>{esc(m.detail)}</td>") for m in shown]
    more = (f"<div class='ckptview-muted'>… and {len(matching.matches) - len(shown):,} more matches</div>"
            if len(matching.matches) > len(shown) else "")
    table = table_html([left, right, "how", "max |diff|", "detail"], rows) + more if rows else ""
    return (verdict + table + _unexplained_html(left, matching.unexplained_left)
            + _unexplained_html(right, matching.unexplained_right))


def _unexplained_html(side: str, keys: Sequence[str]) -> str:
    if not keys:
        return ""
    names = ", ".join(f"<code>{esc(k)}</code>" for k in keys[:_UNEXPLAINED_NAMES])
    more = f" … and {len(keys) - _UNEXPLAINED_NAMES:,} more" if len(keys) > _UNEXPLAINED_NAMES else ""
    return f"<p>Unexplained in {esc(side)} (nothing in the other file matches them): {names}{more}</p>"


def fixes_html(diagnosis: Diagnosis, goal: str) -> str:
    """The load doctor's verdict and its fixes, each with the code that applies it."""
    items = "".join(f"<li><b>{esc(f.kind)}</b>: {esc(f.description)}"
                    + ("" if f.applicable else " <i>(advice: cannot be applied to this file)</i>")
                    + f"<pre class='ckptview-code'>{esc(f.code)}</pre></li>" for f in diagnosis.fixes)
    if diagnosis.ok:
        verdict = banner_html("info", f"{goal} as it is (strict=True).")
    elif diagnosis.loads_after_fix:
        how = "strict=True" if diagnosis.strict else f"strict=False, {len(diagnosis.leaves_missing)} key(s) left as initialised"
        verdict = banner_html("info", f"{goal} after the fix below ({how}). Copy the code:")
    else:
        verdict = banner_html("warning", "The proposed fixes do not make it load: "
                              + (diagnosis.load_error or diagnosis.after.message()))
    return f"{verdict}<ol>{items}</ol>" if items else verdict
