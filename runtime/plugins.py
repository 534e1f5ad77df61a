"""Finding backends: the built-in table and the ``dsv4rt.backends`` entry-point group (design.md section 5).

Nothing is imported until :func:`discover` runs (on first op call or ``dsv4rt info``). A plug-in is a
zero-argument callable returning a :class:`~dsv4rt.backend.Backend`; failures are recorded with their
reason (and raised only with ``DSV4RT_PLUGINS_STRICT=1``).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

from . import env
from .backend import API_VERSION, Backend
from .errors import PluginLoadError

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "PluginRecord", "discover"]

log = logging.getLogger("dsv4rt")

ENTRY_POINT_GROUP = "dsv4rt.backends"
BUILTIN: dict[str, str] = {
    "cpu": "dsv4rt.backends.cpu:backend",
    "cuda": "dsv4rt.backends.cuda:backend",
    "ascend": "dsv4rt.backends.ascend:backend",
}


@dataclass(frozen=True)
class PluginRecord:
    """How one backend source fared: status is 'loaded', 'failed' or 'skipped'."""

    name: str
    source: str
    status: str
    reason: str = ""


def _instantiate(name: str, factory: Callable[[], Any], source: str) -> Backend:
    backend = factory()
    if not isinstance(backend, Backend):
        raise PluginLoadError(f"plug-in {name!r} ({source}) returned {type(backend).__name__}, not a dsv4rt Backend")
    if backend.api_version != API_VERSION:
        raise PluginLoadError(f"plug-in {name!r} ({source}) targets backend API {backend.api_version}; "
                              f"this dsv4rt speaks API {API_VERSION}")
    if not isinstance(backend.name, str) or not backend.name or not isinstance(backend.device_type, str) \
            or not backend.device_type:
        raise PluginLoadError(f"plug-in {name!r} ({source}) has an empty or non-string name or device_type")
    return backend


def _load_builtin(path: str) -> Callable[[], Any]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def discover() -> tuple[dict[str, Backend], list[PluginRecord]]:
    """Instantiate the built-in backends and the allowed entry-point plug-ins."""
    strict = env.flag("DSV4RT_PLUGINS_STRICT")
    backends: dict[str, Backend] = {}
    records: list[PluginRecord] = []

    def fail(name: str, source: str, reason: str) -> None:
        records.append(PluginRecord(name, source, "failed", reason))
        log.warning("dsv4rt: backend %r (%s) not loaded: %s", name, source, reason)
        if strict:
            raise PluginLoadError(f"backend {name!r} ({source}): {reason}")

    def add(name: str, source: str, factory: Callable[[], Any]) -> None:
        try:
            backend = _instantiate(name, factory, source)
        except (Exception, SystemExit) as exc:  # a broken plug-in (even one calling sys.exit) must not take the runtime down
            fail(name, source, f"{type(exc).__name__}: {exc}")
            return
        if backend.name in backends:
            fail(backend.name, source, f"duplicate backend name {backend.name!r} (already provided)")
            return
        backends[backend.name] = backend
        records.append(PluginRecord(backend.name, source, "loaded"))

    for name, path in BUILTIN.items():
        add(name, "built-in", lambda path=path: _load_builtin(path)())

    allow = env.get("DSV4RT_PLUGINS")
    allowed = None if allow == "" else {a.strip() for a in allow.split(",") if a.strip()} - {"none"}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", "?")
        source = f"entry point {ep.value} ({dist})"
        if allowed is not None and ep.name not in allowed:
            records.append(PluginRecord(ep.name, source, "skipped", "not in DSV4RT_PLUGINS"))
            continue
        add(ep.name, source, lambda ep=ep: ep.load()())
    return backends, records
