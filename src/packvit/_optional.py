"""Optional dependencies: one guard that imports a module or names the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, purpose: str, package: str | None = None) -> ModuleType:
    """``module`` imported, or an ``ImportError`` saying that ``purpose`` needs it and how to install it.

    ``extra`` is packvit's extra that brings it (``pip install 'packvit[extra]'``); ``package`` the
    pip name where it differs from the module's first component.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        name = package or module.split(".")[0]
        raise ImportError(f"{purpose} needs {name}: pip install 'packvit[{extra}]' (or pip install {name})") from None
