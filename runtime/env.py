"""Every DSV4RT_* environment variable, in one place.

Variables are read when first needed (never at import) and cached; call :func:`refresh` (or
``dsv4rt.refresh()``) after changing ``os.environ`` in a running process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

__all__ = ["VARIABLES", "Variable", "get", "flag", "refresh", "override", "in_effect", "unknown"]


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    doc: str
    secret: bool = False     # never printed (``in_effect`` shows it as set, not its value)


VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable("DSV4RT_BACKEND", "", "Comma-separated backend preference order for automatic selection, "
                 "e.g. 'cuda,cpu'. Backends not listed are not chosen automatically."),
        Variable("DSV4RT_OP_BACKEND", "", "Per-op choice: 'op=backend[/variant];op2=...'; '*' matches every op."),
        Variable("DSV4RT_FALLBACK", "", "Set to 'cpu' to run ops on the CPU backend (copying inputs and output) "
                 "when the inputs' device has no implementation. Warns once per op."),
        Variable("DSV4RT_STRICT", "0", "1: any fallback (to another device, or past a refused faster variant) "
                 "is an error."),
        Variable("DSV4RT_CHECK_VALUES", "auto", "Value checks (index ranges, finite scales, offsets): 'auto' runs "
                 "them when every tensor is on the CPU (no device synchronisation), 'always', or 'never'. What "
                 "'never' (and 'auto' on a device) gives up: out-of-range or repeated indices, non-monotone "
                 "offsets, and NaN/Inf scales are then undefined behaviour of the implementation (an IndexError, "
                 "garbage values or an illegal memory access), exactly as passing a bad pointer to a kernel; "
                 "shape, dtype and attribute checks always run."),
        Variable("DSV4RT_PLUGINS", "", "Comma-separated allowlist of entry-point plug-in names to load; "
                 "empty loads all, 'none' loads none."),
        Variable("DSV4RT_PLUGINS_STRICT", "0", "1: a failing plug-in raises PluginLoadError instead of being recorded."),
        Variable("DSV4RT_TRITON_INTERPRET", "0", "1: run the cuda/triton kernels under Triton's interpreter on CPU "
                 "tensors (sets TRITON_INTERPRET=1 before Triton is imported). For CI; slow."),
        Variable("DSV4RT_CACHE_DIR", "", "Where generated artefacts (the tiny preset checkpoint) are kept; "
                 "default ~/.cache/dsv4rt."),
        Variable("DSV4RT_LOG_LEVEL", "", "Level of the 'dsv4rt' logger (DEBUG, INFO, WARNING...)."),
        Variable("DSV4RT_BATCH_INVARIANT", "1", "1 (default): batch-invariant mode on the CPU backends: every "
                 "op's result for a row (a token, a sequence) depends only on that row's inputs, never on the other "
                 "rows of the batch, their number, the thread count or the rows per expert, so temperature-0 output "
                 "is the same alone or in any batch (see dsv4rt.invariant); 0: the fastest kernel for each shape. "
                 "dsv4rt run / serve --batch-invariant / --no-batch-invariant override it."),
        Variable("DSV4RT_ASCEND_BF16_EXPERTS", "0", "Ascend A2/A3 (no FP4 matmul): 1 converts every MXFP4 expert "
                 "weight to a BF16 copy at load so the fused grouped matmul runs (exact, but 5x the experts' "
                 "released bytes: ~516 GiB for V4-Flash); 0 (default) keeps the released bytes and runs the experts "
                 "through the composite path, which dequantises per call. The 950 takes MXFP4 natively either way."),
        Variable("DSV4RT_CPU_PACK_FP4", "1", "1 (default): the CPU backend permutes MXFP4 expert weights in place "
                 "at load into the layout of its AVX512-BF16 kernels (same bytes, same results, ~3x faster decode "
                 "GEMMs; other variants read them as released, from a copy); 0 keeps the released layout."),
        Variable("DSV4RT_BUILD_JOBS", "", "Install time only (setup.py): parallel compile jobs for the C++ "
                 "extension dsv4rt._C; default the number of CPUs, 1 compiles one file after another."),
        Variable("DSV4RT_API_KEY", "", "dsv4rt serve / loadtest: the bearer key every /v1 request must carry "
                 "when --api-key is not given (empty: no key).", secret=True),
    )
}

_cache: dict[str, str] = {}
_flags: dict[str, bool] = {}


def get(name: str) -> str:
    """The value of a documented DSV4RT_* variable (its default when unset), cached until refresh()."""
    try:
        return _cache[name]
    except KeyError:
        pass
    var = VARIABLES.get(name)
    if var is None:
        raise KeyError(f"{name} is not a dsv4rt variable; known: {', '.join(VARIABLES)}")
    value = os.environ.get(name, var.default).strip()
    _cache[name] = value
    return value


def flag(name: str) -> bool:
    """True when the variable is set to 1/true/yes/on (cached with the value: hot paths read it per call)."""
    try:
        return _flags[name]
    except KeyError:
        pass
    on = _flags[name] = get(name).lower() in ("1", "true", "yes", "on")
    return on


def refresh() -> None:
    """Forget cached values so the next read sees the current environment."""
    _cache.clear()
    _flags.clear()


@contextlib.contextmanager
def override(name: str, value: str) -> Iterator[None]:
    """Within the block, read ``name`` as ``value`` whatever the environment says (conformance uses it
    to force value checks on accelerators). Cached selections are invalidated on entry and exit."""
    from .registry import bump_generation

    get(name)
    saved = _cache[name]
    _cache[name] = value
    _flags.pop(name, None)
    bump_generation()
    try:
        yield
    finally:
        _cache[name] = saved
        _flags.pop(name, None)
        bump_generation()


def in_effect() -> dict[str, str]:
    """DSV4RT_* variables set in the environment, documented or not (secret ones as '<set>')."""
    return {k: ("<set>" if k in VARIABLES and VARIABLES[k].secret else v)
            for k, v in os.environ.items() if k.startswith("DSV4RT_")}


def unknown() -> list[str]:
    """DSV4RT_* variables set in the environment that dsv4rt does not know (likely typos)."""
    return sorted(k for k in in_effect() if k not in VARIABLES)
