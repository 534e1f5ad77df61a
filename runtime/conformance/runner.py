"""Run the conformance suite for one backend: every op it implements, every variant, every case."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import env
from ..backend import Implementation, poisoned_outputs
from ..errors import BackendSelectionError, ContractError
from ..prepare import prepares_for
from ..registry import REGISTRY, Registry
from ..spec import REQUIRED, OpSpec, load_ref
from .case import Case, noncontig_on
from .report import CaseResult, Report

__all__ = ["run_conformance", "load_xfails", "cases_for"]


def load_xfails(path: str | Path) -> dict[str, str]:
    """Expected failures: one per line, ``<case id or impl:case id> <reason>``; '#' starts a comment."""
    out: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            key, _, reason = line.partition(" ")
            out[key] = reason.strip() or "expected failure"
    return out


def cases_for(spec: OpSpec) -> list[Case]:
    return load_ref(spec.cases)()


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _prepare(spec: OpSpec, case: Case, seed: int, device: torch.device) -> tuple[dict, dict]:
    """The case's inputs on the CPU and on ``device``, with every parameter the case leaves out at its
    contract default (so references, tolerances and ``supports()`` see the whole call)."""
    cpu_args = case.inputs(seed)
    for p in spec.params:
        if p.name not in cpu_args and p.default is not REQUIRED:
            cpu_args[p.name] = p.default
    dev_args = {}
    for name, value in cpu_args.items():
        if isinstance(value, torch.Tensor):
            value = noncontig_on(value, device) if name in case.noncontig else value.to(device)
        dev_args[name] = value
    return cpu_args, dev_args


def _check_shapes(spec: OpSpec, args: Mapping[str, Any], outs: tuple) -> str:
    want = spec.outputs(args)
    if len(outs) != len(want):
        return f"returned {len(outs)} outputs, the contract has {len(want)} ({', '.join(o.name for o in want)})"
    for o, w in zip(outs, want):
        if not isinstance(o, torch.Tensor):
            return f"output {w.name} is {type(o).__name__}, not a tensor"
        if tuple(o.shape) != tuple(w.shape) or o.dtype != w.dtype:
            return f"output {w.name}: shape {tuple(o.shape)} {o.dtype}, expected {tuple(w.shape)} {w.dtype}"
    return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":  # pragma: no cover - needs torch_npu
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def _refusal(impl: Implementation, args: dict[str, Any], registry: Registry) -> str:
    caps = registry.probe(impl.backend).capabilities
    missing = sorted(r for r in impl.requires if not caps.get(r))
    if missing:
        return f"needs capabilities {', '.join(missing)}"
    return (impl.supports(args) or "") if impl.supports is not None else ""


def _run_value_case(spec: OpSpec, op: Any, case: Case, impl: Implementation, seed: int,
                    registry: Registry, refs_cache: dict[str, tuple]) -> CaseResult:
    device = torch.device(impl.device_type)
    cpu_args, dev_args = _prepare(spec, case, seed, device)
    row = CaseResult(case.id, spec.name, impl.name, "fail")
    try:
        backend = registry.backends()[impl.backend]
        if prepares_for(backend, impl.name):
            dev_args = backend.prepare_inputs(spec.name, dev_args)
        refused = _refusal(impl, dev_args, registry)
    except Exception as exc:
        row.status, row.message = "error", f"preparing the inputs raised {type(exc).__name__}: {exc}"
        return row
    if refused:  # outside this variant's documented range: selection would pass the call to another one
        row.status, row.message = "unsupported", refused
        return row
    start = time.perf_counter()
    try:
        with poisoned_outputs():
            outs = _as_tuple(op(**dev_args, backend=impl.name))
        _sync(device)
    except Exception as exc:  # any crash is a result, not an abort of the suite
        row.status, row.message = "error", f"{type(exc).__name__}: {exc}"
        return row
    row.seconds = time.perf_counter() - start
    outs = tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in outs)
    problem = _check_shapes(spec, cpu_args, outs)
    if problem:
        row.message = problem
        return row
    if case.id not in refs_cache:  # the float64 reference, once per case for all variants
        refs_cache[case.id] = _as_tuple(load_ref(spec.reference)(**cpu_args))
    refs = refs_cache[case.id]
    check = load_ref(spec.tolerance)(spec.name, cpu_args, outs, refs)
    row.status = "pass" if check.passed else "fail"
    row.max_abs, row.max_rel, row.budget = check.max_abs, check.max_rel, check.budget
    row.tolerance, row.message = check.tolerance, check.message
    return row


def _run_error_case(spec: OpSpec, op: Any, case: Case, backend: str, seed: int, device: torch.device) -> CaseResult:
    _, dev_args = _prepare(spec, case, seed, device)
    row = CaseResult(case.id, spec.name, backend, "fail", tolerance="must raise")
    try:
        with env.override("DSV4RT_CHECK_VALUES", "always"):
            op(**dev_args, backend=backend)
    except ContractError as exc:
        if exc.op == spec.name and exc.arg == case.raises:
            row.status, row.message = "pass", str(exc)
        else:
            row.message = f"raised for op {exc.op!r} argument {exc.arg!r}, expected argument {case.raises!r}: {exc}"
        return row
    except Exception as exc:
        row.status, row.message = "error", f"expected ContractError naming {case.raises!r}, got {type(exc).__name__}: {exc}"
        return row
    row.message = f"accepted bad input; expected ContractError naming argument {case.raises!r}"
    return row


def _apply_xfail(row: CaseResult, xfails: Mapping[str, str]) -> CaseResult:
    reason = xfails.get(f"{row.implementation}:{row.case}") or xfails.get(row.case)
    if reason is None:
        return row
    if row.status in ("fail", "error"):
        row.status, row.message = "xfail", f"{reason} ({row.message})"
    elif row.status == "pass":
        row.status, row.message = "xpass", f"listed as expected failure ({reason}) but passed"
    return row


def run_conformance(backend: str, ops: Sequence[str] | None = None, xfails: Mapping[str, str] | None = None,
                    seed: int = 0, registry: Registry = REGISTRY) -> Report:
    """Check every implementation ``backend`` registers against the float64 reference.

    Ops the backend does not implement are reported as not implemented (not a failure). Raises
    BackendSelectionError when the backend does not exist, is unavailable here, or fails to load.
    """
    from .. import ops as ops_module

    xfails = dict(xfails or {})
    if backend not in registry.backends():
        raise BackendSelectionError(f"conformance: no backend named {backend!r}; known: "
                                    f"{', '.join(sorted(registry.backends()))}")
    probe = registry.probe(backend)
    if not probe.available:
        raise BackendSelectionError(f"conformance: backend {backend!r} is unavailable here: {probe.reason}")
    impls = registry.load(backend)
    unknown = sorted(set(ops or ()) - set(registry.specs))
    if unknown:
        raise BackendSelectionError(f"conformance: unknown ops {unknown}; ops: {', '.join(registry.specs)}")
    device_types = sorted({i.device_type for i in impls}) or [registry.backends()[backend].device_type]
    for dt in device_types:
        try:
            torch.device(dt)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise BackendSelectionError(f"conformance: backend {backend!r} runs on device type {dt!r}, which this "
                                        f"torch does not know ({exc}); install the extension that registers it") \
                from None
    report = Report(backend, ",".join(device_types), seed)
    if probe.capabilities.get("interpreter"):
        report.notes.append("note: Triton kernels ran under the Triton interpreter on CPU tensors")
    for name in (ops or list(registry.specs)):
        spec = registry.specs[name]
        mine = sorted((i for i in impls if i.op == name), key=lambda i: -i.priority)
        if not mine:
            report.results.append(CaseResult(f"{name}[*]", name, backend, "not-implemented",
                                             message=f"{backend} does not implement {name}"))
            continue
        op = getattr(ops_module, name)
        cases = cases_for(spec)
        device = torch.device(mine[0].device_type)
        for case in (c for c in cases if c.raises is not None):
            report.results.append(_apply_xfail(_run_error_case(spec, op, case, backend, seed, device), xfails))
        refs_cache: dict[str, tuple] = {}
        for impl in mine:
            for case in (c for c in cases if c.raises is None):
                row = _run_value_case(spec, op, case, impl, seed, registry, refs_cache)
                report.results.append(_apply_xfail(row, xfails))
    return report
