"""Lazy imports of heavy or optional packages (polygraphy's `mod.lazy_import` idea).

`ort = lazy_import("onnxruntime", extra="onnxruntime")` returns a stand-in; the real module
is imported on first attribute access, and a missing package raises MissingDependencyError
with the command that installs it.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from runtime.errors import MissingDependencyError

_INSTALL_HINTS = {
    "tensorrt": "pip install 'kiln[tensorrt]' --extra-index-url https://pypi.nvidia.com",
    "onnxruntime": "pip install onnxruntime  (or onnxruntime-gpu for CUDA)",
}


class LazyModule:
    """Stand-in for a module that is imported when first used."""

    def __init__(self, name: str, install: str | None = None):
        self._name = name
        self._install = install or _INSTALL_HINTS.get(name.split(".")[0], f"pip install {name.split('.')[0]}")
        self._module: ModuleType | None = None

    def load(self) -> ModuleType:
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ImportError as exc:
                raise MissingDependencyError(
                    f"this operation needs the Python package '{self._name}', which is not importable "
                    f"({exc}). Install it with: {self._install}"
                ) from exc
        return self._module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_") and attr not in ("__version__", "__file__"):
            raise AttributeError(attr)
        return getattr(self.load(), attr)


def lazy_import(name: str, install: str | None = None) -> LazyModule:
    """Return a LazyModule for `name`; nothing is imported until an attribute is used."""
    return LazyModule(name, install)
