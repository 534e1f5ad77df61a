"""Op callers for ``--check``: the model's ops run on the float64 reference, or audited against it.

Both are :class:`OpCaller` s, so a model switches to them by assigning ``model.ops`` and nothing else in
the model changes (the glue stays the same torch code on the same device):

* :class:`ReferenceCaller` runs every registry op on the float64 golden implementation
  (``dsv4rt.reference``) on CPU copies of its inputs, and hands back the outputs rounded to the dtypes the
  op's contract gives (``OpSpec.outputs``) on the inputs' device: a second, independent implementation of
  the whole network, for per-position logit comparisons.
* :class:`AuditCaller` runs every op on the selected implementation, as the model normally does, and also
  on the reference with the very same inputs, judging each output with the op's own conformance tolerance
  (``OpSpec.tolerance``, ``dsv4rt.conformance.tolerance``). The model continues on the implementation's
  output, so every op is checked on the inputs the real run feeds it (op-level teacher forcing): no
  difference upstream can move an FP8 rounding or a top-k choice downstream, and a wrong kernel fails on
  its first wrong call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..conformance.tolerance import Check
from ..registry import REGISTRY
from ..spec import REQUIRED, OpSpec, load_ref
from .opcall import OpCaller

__all__ = ["ReferenceCaller", "AuditCaller", "OpAudit"]


def _spec(name: str) -> OpSpec:
    return REGISTRY.specs[name]


def _named(spec: OpSpec, args: tuple) -> dict[str, Any]:
    """The positional call as the contract's named arguments, defaults filled in, tensors on the CPU."""
    named = dict(zip(spec.param_names, args))
    for p in spec.params[len(args):]:
        if p.default is not REQUIRED:
            named[p.name] = p.default
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in named.items()}


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _reference(spec: OpSpec, named: Mapping[str, Any]) -> tuple:
    return _as_tuple(load_ref(spec.reference)(**named))


class ReferenceCaller(OpCaller):
    """Every op on the float64 reference; outputs in the contract's dtypes, on the inputs' device."""

    def call(self, name: str, *args: Any) -> Any:
        spec = _spec(name)
        named = _named(spec, args)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        refs = _reference(spec, named)
        outs = tuple(r.to(o.dtype).to(device) for r, o in zip(refs, spec.outputs(named)))
        self.calls[(name, "reference (float64)")] += 1
        return outs if len(outs) > 1 else outs[0]


@dataclass
class OpAudit:
    """What :class:`AuditCaller` saw for one op: calls, the worst error as a fraction of the tolerance
    (1.0 = at the limit), and the first failure."""

    calls: int = 0
    failed: int = 0
    budget: float = 0.0
    first_failure: str = ""
    tolerance: str = ""
    impls: set[str] = field(default_factory=set)

    @property
    def passed(self) -> bool:
        return self.failed == 0


class AuditCaller(OpCaller):
    """Every op on the selected implementation, checked call by call against the reference on the same
    inputs with the op's conformance tolerance; ``result()`` gives the audit per op."""

    def __init__(self, quant: bool = True, precision: str = "release") -> None:
        super().__init__(quant, precision)
        self.audit: dict[str, OpAudit] = {}
        self._n = 0

    def call(self, name: str, *args: Any) -> Any:
        out = super().call(name, *args)
        spec = _spec(name)
        named = _named(spec, args)
        outs = tuple(o.cpu() for o in _as_tuple(out))
        check: Check = load_ref(spec.tolerance)(name, named, outs, _reference(spec, named))
        self._n += 1
        rec = self.audit.setdefault(name, OpAudit())
        rec.calls += 1
        if check.budget >= rec.budget:
            rec.budget, rec.tolerance = check.budget, check.tolerance
        if not check.passed:
            rec.failed += 1
            if not rec.first_failure:
                shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in named.items() if isinstance(v, torch.Tensor))
                rec.first_failure = f"call {self._n} of the run ({shapes}): {check.message}"
        return out

    def result(self) -> dict[str, OpAudit]:
        """``audit`` with the implementations that ran each op (from the call record, ``used()``)."""
        for name, impls in self.used().items():
            if name in self.audit:
                self.audit[name].impls = set(impls)
        return self.audit
