"""Lower every recorded Triton kernel launch of backends/cuda/kernels through triton-ascend's front end to MLIR.

Runs in a Python environment with triton-ascend (not community Triton); ``tools/ascend_lower.sh`` makes
one and records the launches first (``tools/compile_check.py --capture``: the cuda backend's conformance
under the Triton interpreter, every distinct kernel / signature / constexpr combination).

Per launch and per chip family (``a2a3``: the A2 / A3 pipeline; ``950``: ``compile_on_910_95=True``) it
runs triton-ascend's own stages up to the last one that needs no CANN:

1. ``ttir``: the Triton front end (Python AST -> Triton IR) and triton-ascend's TTIR passes;
2. ``ttadapter``: ``triton-adapter-opt`` (Triton IR -> linalg / HIVM / HFusion MLIR), the tool bundled in
   the wheel;

and stops before ``npubin`` (``bishengir-compile``, part of CANN). A kernel "lowers" when stage 2 succeeds
for every recorded launch. This says the kernel source is accepted by triton-ascend's front end and
adapter; it does not say the kernel compiles to an NPU binary, fits the on-chip buffers, or runs.

    python tools/ascend_lower.py LAUNCHES.json [MORE.json ...] [--chips a2a3,950] [--json OUT]

Needs no torch: the kernel modules import only triton and are loaded from their files.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import importlib
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "backends" / "cuda" / "kernels"
_PKG = "dsv4rt_kernels_npu"
_LAST: dict[str, str] = {}
CHIPS = {"a2a3": {"compile_on_910_95": False}, "950": {"compile_on_910_95": True}}
NPU_BUILD = {"INTERP": False, "DOT_PREC": "hf32", "MASKED_GATHER": True}
"""Constexprs an NPU launch sets, replacing the recorded (interpreter / NVIDIA) values where a kernel has them:
the device build, not the interpreter variant, Ascend's float32 dot precision and the V4.1 rows' masked
gather (the launchers' choices for NPU tensors: backends/cuda/_launch on_interpreter, dot_precision, on_ascend)."""


def npu_build(consts: dict) -> dict:
    """A recorded launch's constexprs as an NPU launch sets them (:data:`NPU_BUILD`)."""
    return dict(consts, **{k: v for k, v in NPU_BUILD.items() if k in consts})


class _Stop(Exception):
    """Raised after the last stage that needs no CANN, carrying that stage's MLIR."""

    def __init__(self, mlir: str) -> None:
        super().__init__("stopped before npubin")
        self.mlir = mlir


def _kernel_package() -> None:
    if _PKG in sys.modules:
        return
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [str(KERNELS)]
    sys.modules[_PKG] = pkg


def _kernel(module: str, name: str):
    _kernel_package()
    short = module.rsplit(".", 1)[-1]
    return getattr(importlib.import_module(f"{_PKG}.{short}"), name)


def _patch_stages() -> None:
    from triton.backends import backends

    AscendBackend = backends["ascend"].compiler    # the class triton.compile instantiates

    if getattr(AscendBackend, "_dsv4rt_patched", False):
        return
    original = AscendBackend.add_stages

    def add_stages(self, stages, options):
        original(self, stages, options)
        adapter = stages["ttadapter"]

        def stop_after_adapter(src, metadata):
            _LAST["mlir"] = str(adapter(src, metadata))
            raise _Stop(_LAST["mlir"])      # triton.compile wraps it: lower() reads _LAST
        stages["ttadapter"] = stop_after_adapter
        stages.pop("npubin", None)
    AscendBackend.add_stages = add_stages
    AscendBackend._dsv4rt_patched = True


def _dialects(mlir: str) -> str:
    counts = collections.Counter(re.findall(r"\b(linalg|hivm|hfusion|annotation|tensor|memref|scf)\.[a-z_]+", mlir))
    return " ".join(f"{d}:{n}" for d, n in sorted(counts.items()) if d in ("linalg", "hivm", "hfusion"))


def lower(rec: dict, chip: str) -> dict:
    """One launch for one chip family: {"stage": "ttadapter", "dialects": ...} or {"stage": ..., "error": ...}."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _patch_stages()
    _LAST.clear()
    stage = "import"
    try:
        fn = _kernel(rec["module"], rec["kernel"])
        consts = {k: tl.dtype(v["tl.dtype"]) if isinstance(v, dict) else v
                  for k, v in npu_build(rec["constexprs"]).items()}
        stage = "ttir"
        triton.compile(ASTSource(fn, rec["signature"], consts), target=GPUTarget("npu", "Ascend910B3", 0),
                       options=dict(CHIPS[chip]))
        return {"stage": "npubin", "error": "unexpected: the binary stage ran (is CANN installed?)"}
    except _Stop as stop:
        return {"stage": "ttadapter", "dialects": _dialects(stop.mlir)}
    except Exception as exc:  # report, per launch, what the front end or the adapter said
        if "mlir" in _LAST:
            return {"stage": "ttadapter", "dialects": _dialects(_LAST["mlir"])}
        text = str(exc)
        if "[ERROR][Triton]" in text:      # MLIRCompilationError: its stage name and the detail lines
            m = re.search(r"\[(\w+)\] encounters error:", text)
            stage = m.group(1) if m else "ttadapter"
            text = text.split("encounters error:", 1)[-1].split("[INFO]", 1)[0]
        stderr = getattr(exc, "stderr", None)
        if stderr:
            stage, text = "ttadapter", stderr.decode(errors="replace") if isinstance(stderr, bytes) else str(stderr)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("#", "///"))]
        key = [ln for ln in lines if re.search(r"error: |Assertion|LLVM ERROR|UNREACHABLE|not supported|unexpected",
                                               ln)]
        msg = key[0] if key else (lines[-1] if lines else type(exc).__name__)
        inner = list(re.finditer(r"(\w+Error)\(", text))       # a front-end error nested in CompilationError
        assertion = re.search(r"Assertion `(.+?)' failed", text)
        if inner and inner[-1].group(1) != "CompilationError":
            tail = text[inner[-1].end():].rstrip().rstrip(")'\"").lstrip("'\"").replace("\\'", "'")
            msg = f"{inner[-1].group(1)}: {tail}"
        elif assertion:
            fn = re.search(r"(llvm::\w+|mlir::\w+)\(", text)
            msg = f"triton-adapter-opt crashed: assertion `{assertion.group(1)}' failed" + (f" in {fn.group(1)}" if fn else "")
        return {"stage": stage, "error": f"{type(exc).__name__}: {msg[:240]}", "detail": text[-4000:]}


def _job(args: tuple[dict, str]) -> tuple[str, str, dict]:
    rec, chip = args
    return f"{rec['module'].rsplit('.', 1)[-1]}.{rec['kernel']}", chip, lower(rec, chip)


def markdown(results: dict[str, dict[str, list[dict]]], chips: list[str], version: str) -> str:
    """The per-kernel table of docs/ascend.md (section 10)."""
    names = {"a2a3": "A2/A3", "950": "950"}
    rows, full = [], 0
    for name in sorted(results):
        rs = [r for c in chips for r in results[name][c]]
        full += all("error" not in r for r in rs)
        cells = " | ".join(f"{sum('error' not in r for r in results[name][c])}/{len(results[name][c])}" for c in chips)
        bad = next((r for r in rs if "error" in r), None)
        if bad:
            note = f"fails at `{bad['stage']}`: {bad['error'].split(': ', 1)[-1].replace('|', '/')}"
        else:
            ops = next((r["dialects"] for r in rs if r.get("dialects")), "")
            note = "lowers" + (f" ({ops.replace(':', ' ')} ops)" if ops else "")
        rows.append(f"| `{name}` | {cells} | {note} |")
    n = sum(len(results[k][chips[0]]) for k in results)
    head = " | ".join(names.get(c, c) for c in chips)
    return "\n".join([
        f"triton-ascend {version}: {n} distinct launches of {len(results)} kernels; **{full} of {len(results)} kernels "
        f"lower for every launch** on {' and '.join(names.get(c, c) for c in chips)}. Cells: launches that reach "
        f"linalg / HIVM MLIR, out of those recorded; the op counts are those of one launch.", "",
        f"| kernel | {head} | result |", "|---|" + "---|" * len(chips) + "---|", *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("launches", nargs="+", help="JSON files written by tools/compile_check.py --capture (merged)")
    ap.add_argument("--chips", default="a2a3,950", help="a2a3 and / or 950 (default both)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--markdown", metavar="OUT", help="also write the per-kernel table as markdown")
    a = ap.parse_args(argv)
    merged: dict[str, dict] = {}
    for path in a.launches:                     # the same launch from GPU and interpreter plans counts once
        for rec in json.loads(Path(path).read_text()):
            rec = dict(rec, constexprs=npu_build(rec["constexprs"]))
            key = json.dumps({k: v for k, v in rec.items() if k != "plans"}, sort_keys=True, default=str)
            merged.setdefault(key, rec)
    recs = list(merged.values())
    chips = a.chips.split(",")
    results: dict[str, dict[str, list[dict]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    with cf.ProcessPoolExecutor(a.jobs) as pool:
        for name, chip, res in pool.map(_job, [(r, c) for r in recs for c in chips]):
            results[name][chip].append(res)
    import triton

    print(f"triton-ascend {triton.__version__}: {len(recs)} launches of {len(results)} kernels lowered to "
          f"linalg/HIVM MLIR (stages ttir -> ttadapter; the npubin stage needs CANN and was not run)")
    head = f"{'kernel':44} " + " ".join(f"{c + ' ok/launches':>18}" for c in chips) + "  first failure / MLIR ops"
    print(head)
    failed = 0
    for name in sorted(results):
        row = f"{name:44} "
        note = ""
        for chip in chips:
            rs = results[name][chip]
            ok = sum(r["stage"] == "ttadapter" for r in rs)
            row += f"{f'{ok}/{len(rs)}':>18} "
            bad = [r for r in rs if "error" in r]
            if bad and not note:
                note = f"[{chip}] {bad[0]['stage']}: {bad[0]['error']}"
            failed += len(bad)
        if not note:
            note = next((r["dialects"] for c in chips for r in results[name][c] if r.get("dialects")), "")
        print(row + " " + note)
    lowered = sum(all("error" not in r for c in chips for r in results[n][c]) for n in results)
    print(f"{lowered} of {len(results)} kernels lower for every launch and chip family; {failed} launch failures")
    if a.json:
        Path(a.json).write_text(json.dumps({n: dict(v) for n, v in results.items()}, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(markdown(results, chips, triton.__version__) + "\n")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
