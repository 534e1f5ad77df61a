"""Lazy package exports: names imported from a submodule on first access (keeps `import` cheap)."""
from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps an exported name to the submodule
    defining it; the first access imports it and caches it in ``namespace`` (the package's globals)."""
    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        obj = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = obj
        return obj

    def __dir__() -> list[str]:
        return sorted(exports)
    return __getattr__, __dir__
