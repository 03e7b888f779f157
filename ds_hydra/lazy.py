"""Package attributes imported on first use, so that importing a package (and composing configs)
does not import torch."""
from __future__ import annotations

from importlib import import_module
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a module path, or a
    submodule's name relative to ``package``) and returns its ``name``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(module if module.startswith("ds_hydra") else f"{package}.{module}"), name)

    return __getattr__
