"""The registry: op specs, discovered backends, their probes and their loaded implementations."""
from __future__ import annotations

import logging
import threading
from typing import Iterable

from .backend import Backend, Implementation, Probe, Registrar
from .errors import PluginLoadError
from .plugins import PluginRecord, discover
from .spec import OpSpec

__all__ = ["Registry", "REGISTRY", "generation"]

log = logging.getLogger("dsv4rt")

_GEN = [0]


def _apply_log_level() -> None:
    """Honour DSV4RT_LOG_LEVEL on the 'dsv4rt' logger (read on first use, never at import)."""
    from . import env

    level = env.get("DSV4RT_LOG_LEVEL").upper()
    if level:
        log.setLevel(level)


def generation() -> int:
    """Bumped whenever anything a selection depends on changes (registrations, environment)."""
    return _GEN[0]


def bump_generation() -> None:
    _GEN[0] += 1


class Registry:
    """Holds the declared ops and, lazily, every backend and its implementations."""

    def __init__(self, specs: Iterable[OpSpec]) -> None:
        self.specs: dict[str, OpSpec] = {s.name: s for s in specs}
        self._lock = threading.RLock()
        self._backends: dict[str, Backend] | None = None
        self._records: list[PluginRecord] = []
        self._probes: dict[str, Probe] = {}
        self._impls: dict[str, list[Implementation]] = {}
        self._load_errors: dict[str, str] = {}

    # ---- backends -------------------------------------------------------------------------------
    def backends(self) -> dict[str, Backend]:
        """Every known backend by name (discovered on first call)."""
        if self._backends is None:
            with self._lock:
                if self._backends is None:
                    _apply_log_level()
                    self._backends, self._records = discover()
        return self._backends

    def plugin_records(self) -> list[PluginRecord]:
        self.backends()
        return list(self._records)

    def add_backend(self, backend: Backend, replace: bool = False) -> None:
        """Register a backend object directly (for code that does not ship an entry point)."""
        with self._lock:
            known = self.backends()
            if backend.name in known and not replace:
                raise PluginLoadError(f"a backend named {backend.name!r} already exists")
            known[backend.name] = backend
            for cache in (self._probes, self._impls, self._load_errors):
                cache.pop(backend.name, None)
            self._records.append(PluginRecord(backend.name, "add_backend()", "loaded"))
            bump_generation()

    def remove_backend(self, name: str) -> None:
        with self._lock:
            self.backends().pop(name, None)
            for cache in (self._probes, self._impls, self._load_errors):
                cache.pop(name, None)
            bump_generation()

    def probe(self, name: str) -> Probe:
        """The backend's probe result, cached; a probe that raises counts as unavailable."""
        probe = self._probes.get(name)
        if probe is None:
            backend = self.backends()[name]
            try:
                probe = backend.probe()
            except (Exception, SystemExit) as exc:   # a plug-in's sys.exit() must not end the process
                probe = Probe(False, f"probe() raised {type(exc).__name__}: {exc}")
            if not isinstance(probe, Probe):
                probe = Probe(False, f"probe() returned {type(probe).__name__}, not a dsv4rt.backend.Probe")
            self._probes[name] = probe
        return probe

    def forget_probes(self) -> None:
        """Probe every backend again on next use (after the environment changed). Loaded backends are
        forgotten too, so that capabilities they published at load are found again."""
        with self._lock:
            self._probes.clear()
            self._impls.clear()
            self._load_errors.clear()
            bump_generation()

    def load(self, name: str) -> list[Implementation]:
        """Load the backend's implementations once; raises PluginLoadError with the reason on failure."""
        impls = self._impls.get(name)
        if impls is not None:
            return impls
        with self._lock:
            if name in self._load_errors:
                raise PluginLoadError(self._load_errors[name])
            if name in self._impls:
                return self._impls[name]
            backend = self.backends()[name]
            registrar = Registrar(backend, self.specs)
            try:
                backend.load(registrar)
            except (Exception, SystemExit) as exc:   # a plug-in's sys.exit() must not end the process
                reason = f"backend {name!r} failed to load: {type(exc).__name__}: {exc}"
                self._load_errors[name] = reason
                log.warning("dsv4rt: %s", reason)
                raise PluginLoadError(reason) from exc
            self._impls[name] = registrar.implementations
            if registrar.capabilities:
                probe = self.probe(name)
                self._probes[name] = Probe(probe.available, probe.reason,
                                           {**probe.capabilities, **registrar.capabilities})
            bump_generation()
            return registrar.implementations

    def implementations(self, op: str, backend: str) -> list[Implementation]:
        return [i for i in self.load(backend) if i.op == op]

    def reset(self) -> None:
        """Forget discovered backends, probes and loads (tests; after installing a plug-in)."""
        with self._lock:
            self._backends = None
            self._records = []
            self._probes.clear()
            self._impls.clear()
            self._load_errors.clear()
            bump_generation()


def _all_specs() -> list[OpSpec]:
    from .ops import attention, engram, gemm, indexer, moe

    return [*gemm.SPECS, *indexer.SPECS, *attention.SPECS, *moe.SPECS, *engram.SPECS]


REGISTRY = Registry(_all_specs())
