"""Choosing an implementation for one call (design.md section 4).

First rule that applies wins: the call's ``backend=``; ``use_backend(...)``; ``DSV4RT_OP_BACKEND``;
automatic selection (device -> probe -> requirements -> supports(args) -> priority, in the
``DSV4RT_BACKEND`` preference order when set). An explicit choice that cannot run raises; it is never
replaced. Every failure lists each candidate with its reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from . import env
from .backend import Implementation
from .errors import BackendSelectionError, NoImplementationError, PluginLoadError
from .registry import Registry, bump_generation

__all__ = ["Choice", "use_backend", "context_frames", "parse_choice", "explicit_choice", "choose"]

log = logging.getLogger("dsv4rt")
_HINT = "Run `dsv4rt info` to see every backend, its probe result and what it implements."

_FRAMES: contextvars.ContextVar[tuple] = contextvars.ContextVar("dsv4rt_use_backend", default=())


def context_frames() -> tuple:
    return _FRAMES.get()


def parse_choice(text: str, where: str) -> tuple[str, str | None]:
    """'backend' or 'backend/variant' -> (backend, variant or None)."""
    if not isinstance(text, str) or not text.strip() or text.count("/") > 1:
        raise BackendSelectionError(f"{where}: expected 'backend' or 'backend/variant', got {text!r}")
    backend, _, variant = text.strip().partition("/")
    return backend, (variant or None)


@contextlib.contextmanager
def use_backend(choice: str | Mapping[str, str]) -> Iterator[None]:
    """Prefer a backend within a block: ``use_backend("cuda")`` for every op, or
    ``use_backend({"fp4_gemm": "cpu/numpy"})`` per op ('*' = every op). Nests; the innermost wins."""
    mapping = {"*": choice} if isinstance(choice, str) else dict(choice)
    for op, text in mapping.items():
        parse_choice(text, f"use_backend({op!r})")
    token = _FRAMES.set(_FRAMES.get() + (tuple(sorted(mapping.items())),))
    try:
        yield
    finally:
        _FRAMES.reset(token)


def _env_op_backend() -> dict[str, str]:
    text = env.get("DSV4RT_OP_BACKEND")
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(";"))):
        op, eq, choice = item.partition("=")
        if not eq:
            raise BackendSelectionError(f"DSV4RT_OP_BACKEND: expected 'op=backend[/variant]', got {item!r}")
        parse_choice(choice, f"DSV4RT_OP_BACKEND entry {item!r}")
        out[op.strip()] = choice.strip()
    return out


def explicit_choice(op: str, backend_arg: str | None, frames: tuple) -> tuple[str, str] | None:
    """(choice text, where it came from) of the first explicit rule that applies, else None."""
    if backend_arg is not None:
        return backend_arg, "the backend= argument"
    for frame in reversed(frames):
        d = dict(frame)
        for key in (op, "*"):
            if key in d:
                return d[key], f"use_backend({d[key]!r})"
    per_op = _env_op_backend()
    for key in (op, "*"):
        if key in per_op:
            return per_op[key], f"DSV4RT_OP_BACKEND ({key}={per_op[key]})"
    return None


@dataclass
class Choice:
    """The implementation chosen for a call, and why the others were not."""

    impl: Implementation
    fallback_device: str | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)


def _screen(reg: Registry, impls: list[Implementation], device_type: str, args: Mapping[str, Any],
            rejected: list[tuple[str, str]]) -> list[Implementation]:
    """Candidates that can run this call; the others go to ``rejected`` with their reason."""
    ok = []
    for impl in impls:
        if impl.device_type != device_type:
            rejected.append((impl.name, f"runs on {impl.device_type} tensors, the inputs are on {device_type}"))
            continue
        caps = reg.probe(impl.backend).capabilities
        missing = sorted(r for r in impl.requires if not caps.get(r))
        if missing:
            rejected.append((impl.name, f"needs capabilities {', '.join(missing)} which this device lacks"))
            continue
        if impl.supports is not None:
            try:
                reason = impl.supports(args)
            except Exception as exc:   # a broken supports() rejects its own variant, not the whole op
                reason = f"supports() raised {type(exc).__name__}: {exc}"
            if reason:
                rejected.append((impl.name, str(reason)))
                continue
        ok.append(impl)
    return ok


def _backend_impls(reg: Registry, name: str, op: str, rejected: list[tuple[str, str]]) -> list[Implementation]:
    probe = reg.probe(name)
    if not probe.available:
        rejected.append((name, f"unavailable: {probe.reason}"))
        return []
    try:
        impls = reg.implementations(op, name)
    except PluginLoadError as exc:
        if env.flag("DSV4RT_PLUGINS_STRICT"):   # strict: a backend that fails to load is an error, not a skip
            raise
        rejected.append((name, str(exc)))
        return []
    if not impls:
        rejected.append((name, f"does not implement {op}"))
    return impls


def _listing(rejected: list[tuple[str, str]]) -> str:
    return "\n".join(f"  - {name}: {reason}" for name, reason in rejected) or "  (no backend is registered)"


def _choose_explicit(reg: Registry, op: str, text: str, where: str, device_type: str,
                     args: Mapping[str, Any]) -> Choice:
    name, variant = parse_choice(text, where)
    if name not in reg.backends():
        raise BackendSelectionError(f"{op}: {where} names backend {name!r}, which does not exist; known backends: "
                                    f"{', '.join(sorted(reg.backends()))}. {_HINT}")
    rejected: list[tuple[str, str]] = []
    impls = _backend_impls(reg, name, op, rejected)
    if variant is not None:
        impls = [i for i in impls if i.variant == variant]
        if not impls and not rejected:
            rejected.append((f"{name}/{variant}", f"no variant {variant!r} of {op} is registered"))
    ok = _screen(reg, impls, device_type, args, rejected)
    if not ok:
        raise NoImplementationError(f"{op}: {where} asks for {text!r}, which cannot run this call "
                                    f"(inputs on {device_type}); it is never silently replaced:\n"
                                    f"{_listing(rejected)}\n{_HINT}")
    return Choice(max(ok, key=lambda i: i.priority), None, rejected)


def _preference() -> list[str] | None:
    text = env.get("DSV4RT_BACKEND")
    return [p.strip() for p in text.split(",") if p.strip()] or None


def _choose_auto(reg: Registry, op: str, device_type: str, args: Mapping[str, Any]) -> tuple[Choice | None, list]:
    """Highest-priority runnable candidate on the inputs' device; with DSV4RT_BACKEND, the first listed
    backend that has one."""
    rejected: list[tuple[str, str]] = []
    prefs = _preference()
    for name in prefs or ():
        if name not in reg.backends():
            raise BackendSelectionError(f"DSV4RT_BACKEND names {name!r}, which does not exist; known backends: "
                                        f"{', '.join(sorted(reg.backends()))}. {_HINT}")
    if prefs is not None:
        rejected += [(n, "not listed in DSV4RT_BACKEND") for n in reg.backends() if n not in prefs]
    groups = [[n] for n in prefs] if prefs is not None else [list(reg.backends())]
    for group in groups:
        impls = [i for name in group for i in _backend_impls(reg, name, op, rejected)]
        ok = _screen(reg, impls, device_type, args, rejected)
        if not ok:
            continue
        best = max(ok, key=lambda i: i.priority)
        faster = {i.name for i in impls if i.priority > best.priority and i.device_type == device_type}
        skipped = [(n, r) for n, r in rejected if n in faster]
        if skipped and env.flag("DSV4RT_STRICT"):
            raise NoImplementationError(
                f"{op}: DSV4RT_STRICT=1 forbids falling back to {best.name} past a refused faster variant:\n"
                f"{_listing(skipped)}\n{_HINT}")
        return Choice(best, None, rejected), rejected
    return None, rejected


_warned: set[str] = set()


def choose(reg: Registry, op: str, device_type: str, args: Mapping[str, Any],
           explicit: tuple[str, str] | None) -> Choice:
    """Apply the selection rules to one call; raise with every candidate's reason when nothing fits."""
    if explicit is not None:
        return _choose_explicit(reg, op, explicit[0], explicit[1], device_type, args)
    choice, rejected = _choose_auto(reg, op, device_type, args)
    if choice is not None:
        return choice
    fallback = env.get("DSV4RT_FALLBACK")
    if fallback and fallback != device_type:
        if env.flag("DSV4RT_STRICT"):
            raise NoImplementationError(f"{op}: no implementation runs on {device_type} and DSV4RT_STRICT=1 "
                                        f"forbids the DSV4RT_FALLBACK={fallback} copy:\n{_listing(rejected)}\n{_HINT}")
        cpu_choice, cpu_rejected = _choose_auto(reg, op, fallback, args)
        if cpu_choice is not None:
            if op not in _warned:
                _warned.add(op)
                log.warning("dsv4rt: %s has no implementation on %s; falling back to %s on %s (copies the "
                            "inputs and the output)", op, device_type, cpu_choice.impl.name, fallback)
            cpu_choice.fallback_device = fallback
            cpu_choice.rejected = rejected + cpu_rejected
            return cpu_choice
        rejected += cpu_rejected
    fixes = f"install or enable a backend for {device_type}, or move the inputs to a device that has one"
    fixes += (", or set DSV4RT_FALLBACK=cpu to copy through the CPU backend" if device_type != "cpu" else
              ", or set DSV4RT_FALLBACK=<device type> to copy through a backend of another device")
    raise NoImplementationError(
        f"{op}: no implementation can run this call on {device_type}. Candidates:\n{_listing(rejected)}\n"
        f"Fixes: {fixes}. {_HINT}")


def refresh() -> None:
    """Re-read the DSV4RT_* environment, re-probe every backend and drop every cached selection.

    Backends already loaded stay loaded; ``dsv4rt.REGISTRY.reset()`` also forgets those (and re-runs
    plug-in discovery)."""
    from .registry import REGISTRY

    env.refresh()
    _warned.clear()
    REGISTRY.forget_probes()
    bump_generation()
