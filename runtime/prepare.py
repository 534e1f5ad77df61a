"""Handing a model's GEMM weights, once at load, to the backend that will run them (``Backend.prepare_weight``).

A backend whose fast GEMMs need the released weights in another layout (the Ascend fused GEMMs: a BF16 or
FRACTAL_NZ copy; cpu/native: MXFP4 experts permuted in place, backends/cpu/packed.py) overrides
:meth:`dsv4rt.backend.Backend.prepare_weight`; the model's loader calls :func:`weight_preparer` once per op
and passes every FP8 / FP4 weight through what it returns. Backends that keep the default (cuda,
composite) are never asked: on their devices :func:`weight_preparer` returns None without probing
anything, and the loader keeps the very tensors it read (no copy, no call).

Which backend is asked follows the selection rules (design.md section 4) without a call's tensors: an
explicit choice for the op active at load (``use_backend`` around the model's construction,
``DSV4RT_OP_BACKEND``) names it; else the ``DSV4RT_BACKEND`` order decides among the device's available
backends (the first one listed is asked, and none when it keeps the default); else the first available
backend of the device that prepares weights. A prepared weight still passes the op contract and gives every
other implementation the released values, so an automatic selection that picks another backend for a
call only loses the preparation, never a result.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from .backend import Backend

__all__ = ["weight_preparer", "preparing_backend", "prepares_weights", "prepares_for"]

Preparer = Callable[[Any, Any, int], Any]
"""``prep(w, w_scale, block_size) -> w'`` for one op."""


def prepares_weights(backend: Backend) -> bool:
    """True when the backend overrides :meth:`Backend.prepare_weight` (the default is the identity)."""
    return type(backend).prepare_weight is not Backend.prepare_weight


def prepares_for(backend: Backend, impl_name: str) -> bool:
    """Whether ``impl_name`` (``backend/variant``) takes ``backend``'s prepared inputs: conformance and bench hand
    the other variants the released tensors (:attr:`dsv4rt.backend.Backend.prepared_variants`)."""
    variant = impl_name.partition("/")[2]
    return backend.prepared_variants is None or variant in backend.prepared_variants


def preparing_backend(op: str, device_type: str) -> Backend | None:
    """The backend whose ``prepare_weight`` the weights of ``op`` on ``device_type`` go through (module doc),
    or None when the weights stay as they are."""
    from .registry import REGISTRY
    from .select import _preference, context_frames, explicit_choice, parse_choice

    backends = REGISTRY.backends()
    explicit = explicit_choice(op, None, context_frames())
    if explicit is not None:
        name, variant = parse_choice(explicit[0], explicit[1])[:2]
        b = backends.get(name)
        ok = b is not None and prepares_weights(b) and REGISTRY.probe(name).available
        if ok and variant is not None and b.prepared_variants is not None:
            ok = variant in b.prepared_variants      # e.g. cpu/numpy chosen: cpu/native's layout would only cost
        return b if ok else None
    prefs = _preference()
    for name in (prefs if prefs is not None else list(backends)):
        b = backends.get(name)
        if b is None or b.device_type != device_type:
            continue
        if prefs is None and not prepares_weights(b):
            continue
        if not REGISTRY.probe(name).available:
            continue
        return b if prepares_weights(b) else None
    return None


def weight_preparer(op: str, device_type: str) -> Preparer | None:
    """``prep(w, w_scale, block_size)`` of the backend that prepares ``op``'s weights on ``device_type``, or
    None (keep the released tensors: the loader makes no call at all)."""
    b = preparing_backend(op, device_type)
    return None if b is None else functools.partial(b.prepare_weight, op)
