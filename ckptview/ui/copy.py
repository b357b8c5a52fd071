"""
A button that copies a text to the clipboard in the browser (JupyterLab, Notebook 7, Voila).

`widgets.HTML` runs no scripts and an `ipywidgets.Button` click only reaches the kernel, which has no
access to the user's clipboard: the copy has to happen in the page, in the click's own event (browsers
allow clipboard writes only from a user gesture). A tiny anywidget does that; its front-end code
travels in its state, so a saved notebook re-creates it without an installed extension.
"""

from __future__ import annotations

import anywidget
import traitlets

_ESM = """
async function copy(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try { await navigator.clipboard.writeText(text); return true; } catch (error) { /* fall back below */ }
  }
  // a page served over plain http (Voila on another host) has no clipboard API: the older way
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  let done = false;
  try { done = document.execCommand("copy"); } catch (error) { done = false; }
  area.remove();
  return done;
}

function render({ model, el }) {
  const button = document.createElement("button");
  button.className = "jupyter-widgets jupyter-button widget-button ckptview-copy";
  button.type = "button";
  const show = () => {
    button.textContent = model.get("description");
    button.title = model.get("tooltip");
    button.disabled = !model.get("text");
  };
  button.addEventListener("click", async () => {
    const done = await copy(model.get("text"));
    button.textContent = done ? "Copied" : "Copy failed: select the text and press Ctrl+C";
    model.set("copies", model.get("copies") + (done ? 1 : 0));
    model.save_changes();
    setTimeout(show, 1500);
  });
  model.on("change:description", show);
  model.on("change:text", show);
  show();
  el.appendChild(button);
}
export default { render };
"""


class CopyButton(anywidget.AnyWidget):
    """
    A button copying `text` to the clipboard when clicked in the browser; `copies` counts the copies
    the page reported done (so a test or a caller can tell it worked).

    Example:
        >>> CopyButton(text="model.load_state_dict(state_dict)", description="Copy code")
    """

    _esm = _ESM
    text = traitlets.Unicode("").tag(sync=True)
    description = traitlets.Unicode("Copy").tag(sync=True)
    tooltip = traitlets.Unicode("copy to the clipboard").tag(sync=True)
    copies = traitlets.Int(0).tag(sync=True)
