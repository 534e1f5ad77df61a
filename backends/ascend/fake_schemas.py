"""The real torch_npu op schemas, bound with ``torch.library``, for the stand-in of ``fake_torch_npu``.

``tools/ascend_schemas.py`` reads a torch-npu wheel (without installing it) and writes its facts to a text
file (``tests/data/ascend/torch_npu-<version>.txt``): the TorchScript schema of every op the backend calls
(all overloads, as ``libtorch_npu.so`` defines them), torch_npu's dtype constants, which ``*_dtype`` values
the graph-mode (meta) registration of ``npu_grouped_matmul`` accepts, and the chips each op's docstring
lists. :func:`bind` defines those schemas in a private ``torch.library`` namespace and returns one callable
per op that goes through the dispatcher exactly as ``torch_npu.<op>`` (= ``torch.ops.npu.<op>``) does: an
unknown argument name, a keyword-only argument passed positionally, a missing required argument or a
value of the wrong type raises there, so a signature drift between the backend and a torch_npu release
fails the wiring tests. The dispatcher then calls the stand-in's plain-torch model of the op.

Like torch_npu, the op sees a ``torch.dtype`` passed to an ``int`` dtype argument as its ScalarType
number; :func:`scalar_dtype` maps it back for the stand-in's arithmetic and records. Test-only: the
backend never imports this module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["Facts", "load_facts", "bind", "scalar_dtype"]

# c10::ScalarType numbers (stable ABI) of the dtypes the backend passes to ``int`` dtype arguments.
_SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
                 5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16,
                 23: torch.float8_e5m2, 24: torch.float8_e4m3fn}


def scalar_dtype(value: Any) -> Any:
    """A torch ScalarType number (< 256) back to its torch.dtype; torch_npu's own constants (>= 285) and
    anything else unchanged."""
    if isinstance(value, int) and not isinstance(value, bool) and value in _SCALAR_TYPES:
        return _SCALAR_TYPES[value]
    return value


@dataclass(frozen=True)
class Facts:
    """One torch-npu release's facts (see the module doc)."""

    version: str
    wheel: str
    schemas: tuple[str, ...]
    dtypes: dict[str, int] = field(default_factory=dict)
    gmm_meta: dict[str, tuple[str, ...]] = field(default_factory=dict)
    doc_chips: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def ops(self) -> set[str]:
        return {s.split("(")[0].split(".")[0] for s in self.schemas}


def load_facts(path: str | Path) -> Facts:
    """Parse a facts file written by ``tools/ascend_schemas.py``."""
    path = Path(path)
    version = re.sub(r"^torch_npu-|\.txt$", "", path.name)
    wheel, schemas, dtypes, meta, chips = "", [], {}, {}, {}
    for line in path.read_text().splitlines():
        if line.startswith("# wheel "):
            wheel = line.split()[2]
        elif line.startswith("schema "):
            schemas.append(line[len("schema "):])
        elif line.startswith("dtype "):
            _, name, value = line.split()
            dtypes[name] = int(value)
        elif line.startswith("gmm_meta "):
            _, arg, *names = line.split()
            meta[arg] = tuple(names)
        elif line.startswith("doc_chips "):
            _, op, *names = line.split()
            chips[op] = tuple(names)
    if not schemas:
        raise ValueError(f"{path}: no schema lines")
    return Facts(version, wheel, tuple(schemas), dtypes, meta, chips)


_LIBS: dict[str, tuple[Any, dict[str, Callable[..., Any]]]] = {}


def _namespace(facts: Facts) -> str:
    return "dsv4rt_npu_" + re.sub(r"\W", "_", facts.version)


def bind(facts: Facts, impls: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Callables ``{op: fn}`` that call ``torch.ops.<ns>.<op>`` (the release's schemas, every overload)
    and reach ``impls[op]`` through the dispatcher. The namespace is defined once per release; the
    implementations are those of the latest :func:`bind` call (each stand-in module binds its own)."""
    ns = _namespace(facts)
    if ns not in _LIBS:
        lib = torch.library.Library(ns, "DEF")
        active: dict[str, Callable[..., Any]] = {}
        for schema in facts.schemas:
            lib.define(schema)
            name = schema.split("(")[0]
            op = name.split(".")[0]
            lib.impl(name, _trampoline(active, op), "CompositeExplicitAutograd")
        _LIBS[ns] = (lib, active)
    _, active = _LIBS[ns]
    packets = getattr(torch.ops, ns)
    out = {}
    for op, fn in impls.items():
        if op not in facts.ops():
            continue        # the release lacks the op: the stand-in does not offer it either
        out[op] = _caller(active, op, fn, getattr(packets, op))
    return out


def _trampoline(active: dict[str, Callable[..., Any]], op: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        kwargs = {k: scalar_dtype(v) if (k.endswith("dtype") or k == "dst_type") else v for k, v in kwargs.items()}
        return active[op](*args, **kwargs)
    return kernel


def _caller(active: dict[str, Callable[..., Any]], op: str, fn: Callable[..., Any], packet: Any) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        active[op] = fn
        return packet(*args, **kwargs)
    call.__name__ = op
    return call
