"""
Modules imported on first use. Header-only work (listing, scanning) must not pay for torch,
numpy or pandas; code that reads tensor data touches `torch.<name>` and imports it then.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self.__name__)
        return getattr(self._module, attribute)


torch: Any = LazyModule("torch")
