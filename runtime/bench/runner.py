"""`dsv4rt bench`: measure the ceilings, then time every case on every variant of a backend next to
its baselines, each checked for correctness first (docs/performance.md section 5); re-measure the ceilings
and give no verdict where trust.py finds them untrustworthy (a noisy machine)."""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import BackendSelectionError, NoImplementationError
from ..prepare import prepares_for
from ..registry import REGISTRY
from .case import BenchCase
from .cases_cpu import cpu_cases
from .cases_gpu import gpu_cases
from .ceilings import matrix_peak, measure_ceilings
from .check import agree
from .reference import reference_for
from .timing import time_call
from .trust import judge_run, no_verdict_text

__all__ = ["BenchRow", "BenchReport", "run_bench"]


@dataclass
class BenchRow:
    case: str
    implementation: str
    us: float
    tbs: float
    tflops: float
    roofline_us: float | None   # None (with fraction and met): no verdict, the ceilings are not trusted
    fraction: float | None
    ratios: dict[str, float]  # baseline name -> baseline time / this time (> 1: faster than the baseline)
    target: str
    met: bool | None
    note: str = ""


@dataclass
class BenchReport:
    backend: str
    environment: dict[str, Any]
    ceilings: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    quick: bool = False
    ceilings_after: dict[str, Any] | None = None   # re-measured after the cases (None: not re-measured)
    noisy: list[str] = field(default_factory=list)  # why no verdict is given ([]: verdicts given)

    def withhold(self, problems: list[str]) -> None:
        """Give no verdict: keep the raw timings and ratios, drop every roofline fraction and "met"."""
        self.noisy = list(problems)
        if problems:
            for r in self.rows:
                r.roofline_us = r.fraction = r.met = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``verdict`` is null and ``noisy`` says why when the run gives no verdict."""
        return {"backend": self.backend, "environment": self.environment, "ceilings": self.ceilings,
                "ceilings_after": self.ceilings_after, "verdict": None if self.noisy else "given",
                "noisy": no_verdict_text(self.noisy) if self.noisy else None,
                "rows": [asdict(r) for r in self.rows], "failures": self.failures, "unsupported": self.unsupported, "quick": self.quick}


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "machine": platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _device_for(backend: str) -> torch.device:
    if backend not in REGISTRY.backends():
        raise BackendSelectionError(f"bench: no backend named {backend!r}; known: {', '.join(sorted(REGISTRY.backends()))}")
    probe = REGISTRY.probe(backend)
    if not probe.available:
        raise BackendSelectionError(f"bench: backend {backend!r} is unavailable here: {probe.reason}")
    if probe.capabilities.get("interpreter"):
        raise BackendSelectionError("bench: the cuda backend is in Triton interpreter mode (DSV4RT_TRITON_INTERPRET=1),"
                                    " which checks correctness only; timings need a GPU")
    types = {i.device_type for i in REGISTRY.load(backend)}
    return torch.device(sorted(types)[0] if types else REGISTRY.backends()[backend].device_type)


def _caller(case: BenchCase, variant: str) -> Callable[[dict[str, Any]], Callable[[], Any]]:
    """Build the timed callable: the resolved implementation called directly (no dispatch in the timing),
    or the case's pipeline with ``variant`` as the backend for every op."""
    from .. import ops

    if case.pipeline is not None:
        return lambda args: case.pipeline(args, variant)  # type: ignore[misc]
    op = getattr(ops, case.op)

    def build(args: dict[str, Any]) -> Callable[[], Any]:
        impl = op.resolve(**args, backend=variant)
        positional = op._bind((), args)
        return lambda: impl.fn(*positional)
    return build


def _variants(backend: str, case: BenchCase) -> list[str]:
    impls = REGISTRY.load(backend)
    if case.pipeline is not None:
        names = [backend] + ([f"{backend}/torch"] if any(i.variant == "torch" for i in impls) else [])
        return names
    return [i.name for i in sorted((i for i in impls if i.op == case.op), key=lambda i: -i.priority)]


def _met(case: BenchCase, t: float, fraction: float, ratios: dict[str, float]) -> bool | None:
    """The case's docs/performance.md target, or None where the case has none."""
    if case.meets is not None:
        return case.meets(fraction, ratios)
    return None if case.target_us is None else t <= case.target_us


def bench_op_names(backend: str) -> list[str]:
    """Op names that have bench cases on ``backend``'s device (all devices if the backend is unknown)."""
    backends = REGISTRY.backends()
    dev = backends[backend].device_type if backend in backends else None
    cases = (cpu_cases(True) if dev in (None, "cpu") else []) + (gpu_cases(True) if dev != "cpu" else [])
    return sorted({c.op for c in cases})


def run_bench(backend: str, ops: Sequence[str] | None = None, quick: bool = False, reps: int = 30,
              log: Callable[[str], None] = lambda s: None, reprobe: bool = True) -> BenchReport:
    """Time every case of ``backend``'s device (filtered by op names) on every variant of the backend;
    with ``reprobe``, measure the ceilings again after the cases so that trust.py can compare the two."""
    device = _device_for(backend)
    ceilings = measure_ceilings(device, quick)
    log(f"ceilings on {ceilings['device']}: " + ", ".join(f"{k} {v:.3g}" for k, v in ceilings.items()
                                                        if isinstance(v, float)))
    report = BenchReport(backend, _environment(device), ceilings, quick=quick)
    _, peak_tflops = matrix_peak(ceilings)
    cases = cpu_cases(quick) if device.type == "cpu" else gpu_cases(quick)
    for case in cases:
        if ops and case.op not in ops:
            continue
        variants = _variants(backend, case)
        if not variants:
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        released = case.make(device, gen)
        be = REGISTRY.backends()[backend]
        prepared = be.prepare_inputs(case.op, released) if case.pipeline is None else released
        args = prepared
        composite = next((v for v in variants if v.endswith("/torch")), None)
        roofline = max(case.bytes / (ceilings["read_tbs"] * 1e6), case.flops / (peak_tflops * 1e6))
        times: dict[str, float] = {}
        cold = [v for v in args.values() if isinstance(v, torch.Tensor)]
        for variant in variants:
            args = prepared if prepares_for(be, variant) else released   # e.g. cpu/numpy: the released weights
            build = _caller(case, variant)
            try:
                build(args)
            except NoImplementationError as exc:  # outside the variant's documented range
                why = [ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith(f"- {variant}:")]
                report.unsupported.append(f"{case.name}: {why[0][2:] if why else str(exc).splitlines()[0]}")
                continue
            if composite and variant != composite:
                problem = agree(case.op, args, lambda a, b=build: b(a)(), lambda a: _caller(case, composite)(a)())
                if problem:
                    report.failures.append(f"{case.name} [{variant}]: {problem}")
                    log(f"WRONG {case.name} [{variant}]: {problem}")
                    continue
            t = time_call(build(args), device, reps=reps, cold=cold)["median_us"]
            times[variant] = t
            log(f"{case.name} [{variant}]: {t:.1f} us")
        extra = {name: time_call(make(released), device, reps=reps, cold=cold)["median_us"]
                 for name, make in case.baselines.items()}
        # baselines: the torch composite, the NumPy variant where there is one, and the case's extras
        baselines = {name: t for name, t in times.items() if name == composite or name.endswith("/numpy")} | extra
        for variant, t in list(times.items()) + list(extra.items()):
            ratios = {name: b / t for name, b in baselines.items() if name != variant}
            met = _met(case, t, roofline / t, ratios) if variant not in extra else None
            report.rows.append(BenchRow(
                f"{case.name} (quick)" if quick else case.name, variant, t, case.bytes / t / 1e6, case.flops / t / 1e6, roofline, roofline / t,
                ratios, case.target if variant not in extra else "baseline", met, case.note))
        del args, prepared, released
    _judge(report, device, quick, reprobe, log)
    return report


def _judge(report: BenchReport, device: torch.device, quick: bool, reprobe: bool,
           log: Callable[[str], None]) -> None:
    """Re-measure the ceilings (``reprobe``) and withhold every verdict where trust.py finds them wrong;
    quick runs' probes are smaller than the documented ones, so only their agreement judges them."""
    if reprobe:
        report.ceilings_after = measure_ceilings(device, quick)
    reference = None if quick else reference_for(report.ceilings.get("machine"))
    if reference is not None:
        log(f"ceilings judged against the figures documented for {reference.machine} ({reference.source})")
    fractions = [(f"{r.case} [{r.implementation}]", r.fraction) for r in report.rows]
    report.withhold(judge_run(report.ceilings, fractions, reference, report.ceilings_after))
