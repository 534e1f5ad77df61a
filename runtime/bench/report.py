"""Bench output: a Markdown table (pasted into docs/measured-cpu.md), JSON, and an optional roofline plot."""
from __future__ import annotations

from .ceilings import fmt_ceiling, matrix_peak, roofline_keys
from .runner import BenchReport, BenchRow
from .trust import no_verdict_text

__all__ = ["format_report", "plot_roofline", "require_matplotlib"]


def require_matplotlib() -> None:
    """Raise OSError (the CLI's exit 2 with a message) when matplotlib is missing; checked before a run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise OSError("--plot needs matplotlib (pip install matplotlib)") from exc


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def _after(report: BenchReport) -> list[str]:
    """The line with the roofline's ceilings re-measured after the cases, where they were."""
    after = report.ceilings_after
    if not after:
        return []
    read, peak = roofline_keys(after)
    return [f"re-measured after the cases: read {fmt_ceiling(read, after[read])}, "
            f"{matrix_peak(after)[0]} {fmt_ceiling(peak, after[peak])}"]


def _verdict_cells(r: BenchRow, noisy: bool) -> tuple[str, str, str]:
    """roofline us, of roofline, met: the verdicts, or 'no verdict' where the run gives none."""
    if noisy:
        return "—", "no verdict", "no verdict" if r.target not in ("", "baseline") else "—"
    met = "—" if r.met is None else ("yes" if r.met else "no")
    return _fmt(r.roofline_us or 0.0), f"{r.fraction or 0.0:.0%}", met


def format_report(report: BenchReport) -> str:
    """The report as text: a header with the ceilings (and, on a noisy machine, why no verdict is given)
    and one Markdown table row per timed implementation."""
    c = report.ceilings
    env = report.environment
    peak_name, peak = matrix_peak(c)
    lines = [
        *([no_verdict_text(report.noisy)] if report.noisy else []),
        f"backend {report.backend} on {c['device']} ({', '.join(f'{k} {v}' for k, v in env.items())})",
        f"measured ceilings: read {c['read_tbs'] * 1e3:.3g} GB/s"
        + (f" (torch sum {c['torch_read_tbs'] * 1e3:.3g} GB/s)" if c.get("torch_read_tbs") else "")
        + f", copy {c['copy_tbs'] * 1e3:.3g} GB/s, "
        f"{peak_name} {peak * 1e3:.3g} GFLOP/s" + "".join(
            f", {name} {c[key] * 1e3:.3g} GFLOP/s" for key, name in
            (("fp32_tflops", "FP32 FMA"), ("sgemm_tflops", "torch sgemm")) if c.get(key) and name != peak_name),
        *_after(report),
        *([f"cache flush before every timed call: {c['flush']}"] if c.get("flush") else []),
        *(["quick run: small shapes (the '(quick)' cases), not comparable with the tables of docs/measured-cpu.md"]
          if report.quick else []),
        "",
        "| case | implementation | us | GB/s | GFLOP/s | roofline us | of roofline | vs baselines | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        ratios = ", ".join(f"{v:.2g}x {k}" for k, v in r.ratios.items()) or "—"
        roof, fraction, met = _verdict_cells(r, bool(report.noisy))
        lines.append(f"| {r.case} | {r.implementation} | {_fmt(r.us)} | {_fmt(r.tbs * 1e3)} | {_fmt(r.tflops * 1e3)} | "
                     f"{roof} | {fraction} | {ratios} | {r.target or '—'} | {met} |")
    for f in report.failures:
        lines.append(f"WRONG (not timed): {f}")
    for u in report.unsupported:
        lines.append(f"unsupported (not timed): {u}")
    return "\n".join(lines)


def plot_roofline(report: BenchReport, path: str) -> None:
    """Log-log roofline (attainable TFLOP/s vs arithmetic intensity) with every timed row as a point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OSError("--plot needs matplotlib (pip install matplotlib)") from exc
    c = report.ceilings
    bw = c["read_tbs"]
    _, peak = matrix_peak(c)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [10 ** (i / 20) for i in range(-60, 101)]
    ax.plot(xs, [min(peak, bw * x) for x in xs], color="black", label=f"roofline ({bw:.3g} TB/s, {peak:.3g} TFLOP/s)")
    for r in report.rows:
        intensity = (r.tflops / r.tbs) if r.tbs > 0 else None
        if intensity and r.tflops > 0:
            ax.scatter([intensity], [r.tflops], s=18)
            ax.annotate(f"{r.case} {r.implementation}", (intensity, r.tflops), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"dsv4rt bench --backend {report.backend} on {c['device']}"
                 + (" (no verdict: machine too noisy)" if report.noisy else ""))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
