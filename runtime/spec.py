"""OpSpec: the backend-neutral declaration of one op (design.md section 2).

An op is declared once, contract first: a Python signature with a docstring stating exactly what the
op computes, a metadata ``check`` (shapes, dtypes, static attributes), a ``check_values`` that looks at
tensor contents (index ranges, finite scales), the output description, and lazy references to its
float64 reference, its conformance cases and its tolerance policy.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Param", "OpSpec", "OutputSpec", "REQUIRED", "declare_spec", "load_ref"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One argument of an op: a tensor, an optional tensor, or a static attribute."""

    name: str
    kind: str  # "tensor" | "optional_tensor" | "static"
    default: Any = REQUIRED


@dataclass(frozen=True)
class OutputSpec:
    """Shape and dtype one output must have for a given call."""

    name: str
    shape: tuple[int, ...]
    dtype: Any


@dataclass(frozen=True)
class OpSpec:
    """Everything backends, the dispatcher and conformance need to know about one op."""

    name: str
    family: str
    params: tuple[Param, ...]
    doc: str
    check: Callable[[Mapping[str, Any]], None]
    outputs: Callable[[Mapping[str, Any]], tuple[OutputSpec, ...]]
    check_values: Callable[[Mapping[str, Any]], None] | None = None
    reference: str = ""  # "module:function" of the float64 golden implementation
    cases: str = ""  # "module:function" yielding conformance cases
    tolerance: str = ""  # "module:function" comparing outputs to the reference
    signature: inspect.Signature = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


def declare_spec(
    fn: Callable[..., Any],
    *,
    family: str,
    check: Callable[[Mapping[str, Any]], None],
    outputs: Callable[[Mapping[str, Any]], tuple[OutputSpec, ...]],
    check_values: Callable[[Mapping[str, Any]], None] | None = None,
    reference: str = "",
    cases: str = "",
    tolerance: str = "",
) -> OpSpec:
    """Build an OpSpec from a signature function.

    ``fn`` is never called: its name is the op name, its docstring the contract, and its parameters
    the signature. Parameters annotated ``Tensor`` are tensors, ``Tensor | None`` optional tensors,
    everything else a static attribute (part of the selection cache key).
    """
    sig = inspect.signature(fn)
    params = []
    for p in sig.parameters.values():
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        ann = ann.replace(" ", "")
        if ann == "Tensor":
            kind = "tensor"
        elif ann in ("Tensor|None", "Optional[Tensor]", "None|Tensor"):
            kind = "optional_tensor"
        else:
            kind = "static"
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        params.append(Param(p.name, kind, default))
    if not fn.__doc__:
        raise TypeError(f"op {fn.__name__} has no contract docstring")
    return OpSpec(
        name=fn.__name__,
        family=family,
        params=tuple(params),
        doc=inspect.cleandoc(fn.__doc__),
        check=check,
        outputs=outputs,
        check_values=check_values,
        reference=reference,
        cases=cases,
        tolerance=tolerance,
        signature=sig,
    )


def load_ref(ref: str) -> Any:
    """Import ``"package.module:attr"`` and return the attribute."""
    import importlib

    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
