"""
How quickly the notebook explorer becomes usable, measured in-process (widget construction and
each tab's worker-thread computation; the browser's rendering is not included):

  * `explore()` on the ~2 GB LLM-shaped file and on a 20,000-tensor file: time until the app
    object exists with its header filled in (what the cell shows at once), and until the first
    tab (Overview) has computed;
  * the Tensors tab of the 20,000-tensor file: first open, a regex filter, a page flip; its Statistics tab;
  * the Statistics tab of the 2 GB file: time until its plot and outliers are shown, with the
    file in the page cache (warm) and, where the OS allows dropping it, cold.

    python bench/explore_bench.py [--dir DIR]     # files are written to a temp dir unless DIR holds them
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_fixture import drop_page_cache, make_llm_checkpoint, make_many_tensors  # noqa: E402


def timed(label: str, action, results: dict[str, float]):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    value = action()
    results[label] = time.perf_counter() - start
    print(f"  {label:<52} {results[label]:8.3f} s", flush=True)
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="folder to keep the generated files in (reused when present)")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="ckptview-explore-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    llm, many = folder / "llm.pt", folder / "many.pt"
    if not llm.exists():
        print(f"writing {llm} …", flush=True)
        make_llm_checkpoint(llm)
    if not many.exists():
        print(f"writing {many} …", flush=True)
        make_many_tensors(many)
    print(f"llm.pt {llm.stat().st_size / 2**30:.2f} GiB, many.pt {many.stat().st_size / 2**20:.1f} MiB")

    results: dict[str, float] = {}
    print("explorer:")
    timed("import ckptview.ui (once per kernel)", lambda: __import__("ckptview.ui"), results)
    from ckptview.ui import explore

    for name, path in (("2 GB", llm), ("20k tensors", many)):
        app = timed(f"explore() {name}: app with header", lambda path=path: explore(path), results)
        timed(f"explore() {name}: Overview tab computed", lambda app=app: app.panels["Overview"].wait(), results)
        assert not app.panels["Overview"].banner.value, app.panels["Overview"].banner.value
        if name == "20k tensors":
            tensors = timed("20k tensors: Tensors tab first open", lambda app=app: _open(app, "Tensors"), results)
            timed("20k tensors: regex filter", lambda tensors=tensors: setattr(tensors.name_filter, "value", r"layer\.1\d\d\."), results)
            assert tensors.count_label.value.startswith("1,000 of"), tensors.count_label.value
            timed("20k tensors: filter cleared (all rows to the grid)",
                  lambda tensors=tensors: setattr(tensors.name_filter, "value", ""), results)
            timed("20k tensors: Statistics tab shown", lambda app=app: _open(app, "Statistics"), results)
        app.close()

    for cache in ("warm", "cold"):
        if cache == "cold" and not drop_page_cache(llm):
            print("  (cannot drop the page cache here: no cold figure)")
            continue
        if cache == "warm":
            # Read just before: this VM reclaims page cache left idle for seconds (DAMON), so the
            # file read by the steps above may be partly cold again.
            with open(llm, "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass
        app = explore(llm)
        panel = timed(f"2 GB: Statistics tab shown ({cache} cache)", lambda app=app: _open(app, "Statistics"), results)
        assert "<b>327</b> tensors" in panel.summary.value, panel.summary.value + panel.banner.value
        app.close()
    return 0


def _open(app, title: str):  # noqa: ANN001, ANN202
    panel = app.select(title)
    panel.wait(timeout=600)
    return panel


if __name__ == "__main__":
    sys.exit(main())
