"""Package attributes resolved on first use (PEP 562), so importing a package loads only
what its caller touches."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Mapping


def lazy_attributes(package: str, exports: Mapping[str, str]
                    ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the
    module (relative to ``package``) that defines it; the first access imports that
    module and caches the value in the package's namespace."""
    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
