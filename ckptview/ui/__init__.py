"""
The notebook explorer (`ckptview.explore`). The only package of ckptview that imports ipywidgets,
IPython or plotly widgets; `import ckptview` never imports it.
"""

from ckptview.ui.app import Explorer, explore
from ckptview.ui.base import ExplorerState

__all__ = ["Explorer", "ExplorerState", "explore"]
