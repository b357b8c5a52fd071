"""
Clicks on the explorer's plots, sent back to the kernel: a point of the Statistics plot or a leaf
tile of the Overview treemap opens that tensor (or module) in the Tensors tab.

The plots are plotly's own notebook output (`FigureBox`), drawn by the jupyterlab-plotly renderer,
which keeps its events in the page. A tiny anywidget inside the explorer listens for `plotly_click`
on every plot the explorer holds, now and as plots are redrawn, and reports the point's
`customdata` (a tensor or module name the figure put there). Its code travels in its state, so a
saved notebook or Voila needs no installed extension.
"""

from __future__ import annotations

import anywidget
import traitlets

_ESM = """
function render({ model, el }) {
  const hooked = new WeakSet();
  const report = (event) => {
    const point = event && event.points && event.points[0];
    if (!point || typeof point.customdata !== "string" || !point.customdata) return;
    // a treemap tile with children zooms in (plotly's own click); only a leaf module opens its tensors
    if (point.data && point.data.type === "treemap" && (point.data.parents || []).includes(point.id)) return;
    model.set("target", point.customdata);
    model.set("clicks", model.get("clicks") + 1);
    model.save_changes();
  };
  const hook = (plot) => {
    if (hooked.has(plot)) return;
    if (typeof plot.on !== "function") { setTimeout(() => hook(plot), 200); return; }  // still being drawn
    hooked.add(plot);
    plot.on("plotly_click", report);
  };
  const watch = () => {
    const root = el.closest(".ckptview-explorer");
    if (!root) { setTimeout(watch, 200); return; }  // not attached to the page yet
    const scan = () => root.querySelectorAll(".js-plotly-plot").forEach(hook);
    new MutationObserver(scan).observe(root, { childList: true, subtree: true });
    scan();
  };
  watch();
}
export default { render };
"""


class PlotClicks(anywidget.AnyWidget):
    """Counts clicks on the explorer's plots that name a tensor or module (`target`, the last one named)."""

    _esm = _ESM
    target = traitlets.Unicode("").tag(sync=True)
    clicks = traitlets.Int(0).tag(sync=True)
