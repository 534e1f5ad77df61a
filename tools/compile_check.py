"""Compile every Triton kernel launch of backends/cuda/kernels ahead of time for a list of NVIDIA targets and
report registers, spills and failures per launch. Needs no GPU.

Two steps in two processes:

1. ``--capture FILE``: run the cuda backend's conformance under Triton's interpreter (CPU tensors) and record
   every distinct kernel launch (kernel, argument dtypes / scalar kinds, constexpr values, num_warps,
   num_stages) to FILE as JSON. By default the launchers plan as on a GPU (tiles, warps, stages, split-K of
   a 132-SM part) and the kernels are recorded without running: the launches a GPU would compile. The
   interpreter's own (smaller or larger) tiles never reach a GPU; they are added only for kernels the GPU
   plans do not reach on conformance shapes (``--plans interp`` / ``all`` record them all).
2. ``--compile FILE`` (the default runs both): build each recorded launch for each target with Triton's
   ``ASTSource`` / ``GPUTarget`` API (``INTERP`` forced off: the GPU build), run the bundled ``ptxas -v`` on
   the PTX and print one row per launch with registers per thread and spill stores / loads per target.

Exit status 1 when any launch fails to compile on any target (or, with ``--fail-on-spill``, spills); spills
are otherwise reported, not failed. Targets the bundled ptxas does not know are listed as skipped.

    python tools/compile_check.py [--targets sm_80,sm_90a] [--ops fp8_gemm,...] [--jobs 4] [--json OUT]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120a")
"""A100/A800, RTX 30 / A10 / A40, Ada (L40S / RTX 40), H100 / H200, B200 / GB200, RTX 50 / RTX Pro 6000."""

_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.float64": "fp64",
           "torch.int8": "i8", "torch.uint8": "u8", "torch.int16": "i16", "torch.int32": "i32", "torch.int64": "i64",
           "torch.float8_e4m3fn": "fp8e4nv", "torch.float8_e5m2": "fp8e5", "torch.bool": "i1"}
_PTX_PROBE = ".version 8.7\n.target ARCH\n.address_size 64\n.visible .entry k() { ret; }\n"


def _kind(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _plan_for_gpu(sms: int) -> None:
    """Make the launchers choose the tiles, warps and stages they choose on a GPU with ``sms`` SMs (they pick
    smaller ones under the interpreter); op selection (``supports``) is left as it is."""
    from dsv4rt.backends.cuda import attention, engram, gemm, indexer, moe

    for mod in (attention, engram, indexer, moe):
        mod.on_interpreter = lambda t: False
    attention._sm_count = gemm._sm_count = lambda *a: sms

    def gpu_view(fn):
        def wrapped(*args, **kwargs):
            saved, gemm.interpreter_requested = gemm.interpreter_requested, lambda: False
            try:
                return fn(*args, **kwargs)
            finally:
                gemm.interpreter_requested = saved
        return wrapped
    gemm.plan, gemm._quantize = gpu_view(gemm.plan), gpu_view(gemm._quantize)


def capture(path: str, ops: list[str] | None, plans: str = "gpu") -> None:
    """Record every distinct launch of the conformance run of ``ops`` (all when None) to ``path``.

    ``plans="interp"``: the launches the interpreter runs (CI's tiles; the kernels run and conformance is
    checked). ``plans="gpu"``: the launches a GPU would get (the launchers plan as on a 132-SM GPU); the
    kernels are recorded, not run, so the conformance verdict of that pass means nothing and is not shown.
    """
    os.environ["DSV4RT_TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import triton.language as tl
    from triton.runtime import interpreter

    from dsv4rt.conformance import run_conformance

    gpu = plans == "gpu"
    if gpu:
        _plan_for_gpu(132)

    seen: dict[str, dict] = {}
    original = interpreter.InterpretedFunction.__getitem__

    def record(fn, args, kwargs):
        sig, const = {}, {}
        params = inspect.signature(fn).parameters
        bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
        for name, p in params.items():
            value = bound.get(name, None if p.default is inspect.Parameter.empty else p.default)
            if "constexpr" in str(p.annotation):
                sig[name], const[name] = "constexpr", {"tl.dtype": str(value)} if isinstance(value, tl.dtype) else value
            else:
                sig[name] = _kind(value)
        if "INTERP" in const:
            const["INTERP"] = False  # the GPU build of the kernel, not its interpreter variant
        rec = {"module": fn.__module__, "kernel": fn.__name__, "signature": sig, "constexprs": const,
               "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
               "plans": plans}
        seen.setdefault(json.dumps({k: v for k, v in rec.items() if k != "plans"}, sort_keys=True, default=str), rec)

    def getitem(self, grid):
        launch = original(self, grid)

        def run(*args, **kwargs):
            record(self.fn, args, kwargs)
            return None if gpu else launch(*args, **kwargs)
        return run

    interpreter.InterpretedFunction.__getitem__ = getitem
    report = run_conformance("cuda", ops, None, 0)
    if not gpu and not report.passed:
        print(report.format_table(), file=sys.stderr)
    verdict = "not run (GPU plans)" if gpu else "passed" if report.passed else "FAILED"
    print(f"captured {len(seen)} distinct launches ({plans} plans); conformance {verdict}", file=sys.stderr)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(seen.values()), f, indent=1, default=str)


def _capability(target: str) -> int:
    return int(re.fullmatch(r"sm_(\d+)a?", target).group(1))


def _ptxas(target: str) -> str:
    """The ptxas Triton itself uses for this target (the bundled one matching its PTX version)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(_capability(target)).path


def supported(target: str) -> str | None:
    """None when the bundled ptxas assembles for ``target``, else why not."""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "p.ptx")
        with open(ptx, "w", encoding="utf-8") as f:
            f.write(_PTX_PROBE.replace("ARCH", target))
        proc = subprocess.run([_ptxas(target), "--gpu-name", target, ptx, "-o", os.path.join(d, "p.o")],
                              capture_output=True, text=True)
    return None if proc.returncode == 0 else " ".join(proc.stderr.split())[:200]


def _build(rec: dict, target: str) -> dict:
    """Compile one recorded launch for one target: {"regs", "spill_st", "spill_ld"} or {"error"}."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
        consts = {k: tl.dtype(v["tl.dtype"]) if isinstance(v, dict) else v for k, v in rec["constexprs"].items()}
        if "INTERP" in consts:
            consts["INTERP"] = False  # the GPU build of the kernel (captures before this tool recorded True)
        k = triton.compile(ASTSource(fn, rec["signature"], consts),
                           target=GPUTarget("cuda", _capability(target), 32),
                           options={"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]})
        with tempfile.TemporaryDirectory() as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w", encoding="utf-8") as f:
                f.write(k.asm["ptx"])
            proc = subprocess.run([_ptxas(target), "-v", "--gpu-name", target, ptx, "-o", os.path.join(d, "k.o")],
                                  capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ptxas: {proc.stderr.strip()[:300]}")
        regs = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
        st, ld = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr).groups())
        return {"regs": regs, "spill_st": st, "spill_ld": ld}
    except Exception as exc:  # report and continue: one broken kernel must not hide the others
        return {"error": f"{type(exc).__name__}: {' | '.join(str(exc).splitlines())[:400]}"}


def _cell(r: dict) -> str:
    if "error" in r:
        return "FAIL"
    return f"{r['regs']}" + (f" S{r['spill_st']}/{r['spill_ld']}" if r["spill_st"] or r["spill_ld"] else "")


def compile_all(path: str, targets: list[str], jobs: int, json_out: str | None, fail_on_spill: bool,
                kernels: list[str] | None = None) -> int:
    """Compile every launch of ``path`` (of ``kernels`` only, when given) for every supported target; print
    the table; return the exit status."""
    import triton

    launches = [r for r in json.load(open(path, encoding="utf-8")) if not kernels or r["kernel"] in kernels]
    skipped = {t: why for t in targets if (why := supported(t))}
    live = [t for t in targets if t not in skipped]
    tasks = [(i, t) for i in range(len(launches)) for t in live]
    with cf.ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip(tasks, pool.map(_build, [launches[i] for i, _ in tasks], [t for _, t in tasks])))
    print(f"Triton {triton.__version__}; {len(launches)} launches; targets {', '.join(live)}"
          + "".join(f"; {t} skipped (bundled ptxas: {why})" for t, why in skipped.items()))
    print("cells: registers per thread, 'S<stores>/<loads>' = spilled bytes, FAIL = no binary (see below)")
    print(f"{'kernel':<28} {'plans':<6} {'w':>2} {'st':>2} " + " ".join(f"{t:>12}" for t in live) + "  constexprs")
    rows = []
    for i, rec in enumerate(launches):
        consts = ", ".join(f"{k}={v['tl.dtype'] if isinstance(v, dict) else v}" for k, v in rec["constexprs"].items()
                           if k != "INTERP")
        print(f"{rec['kernel']:<28} {rec.get('plans', '-'):<6} {rec['num_warps']:>2} {rec['num_stages']:>2} "
              + " ".join(f"{_cell(done[i, t]):>12}" for t in live) + f"  {consts}")
        rows.append({"kernel": rec["kernel"], "plans": rec.get("plans"), "num_warps": rec["num_warps"], "num_stages": rec["num_stages"],
                     "constexprs": consts, "results": {t: done[i, t] for t in live}})
    status = 0
    for t in live:
        fails = [(launches[i]["kernel"], done[i, t]["error"]) for i in range(len(launches)) if "error" in done[i, t]]
        spills = [done[i, t] for i in range(len(launches)) if done[i, t].get("spill_st") or done[i, t].get("spill_ld")]
        worst = max((s["spill_st"] for s in spills), default=0)
        print(f"{t}: {len(launches) - len(fails)}/{len(launches)} compile, {len(fails)} fail, {len(spills)} spill"
              + (f" (largest {worst} B stored)" if spills else ""))
        for name, err in fails:
            print(f"  FAIL {name}: {err}")
        status |= int(bool(fails) or (fail_on_spill and bool(spills)))
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump({"triton": triton.__version__, "targets": live, "skipped": skipped, "launches": rows}, f,
                      indent=1)
    return status


def main(argv: list[str] | None = None, default_targets: tuple[str, ...] = TARGETS) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture", metavar="FILE", help="only record the launches to FILE")
    ap.add_argument("--compile", metavar="FILE", help="only compile the launches recorded in FILE")
    ap.add_argument("--ops", help="comma-separated ops (default: all)")
    ap.add_argument("--kernels", help="comma-separated kernels to compile (default: every recorded one)")
    ap.add_argument("--targets", default=",".join(default_targets), help=f"default: {','.join(default_targets)}")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--plans", default="gpu", choices=("gpu", "interp", "all"),
                    help="gpu (default): the launches a GPU gets (the launchers plan as on a GPU), plus the "
                         "interpreter's launches of kernels those never reach (small conformance shapes); "
                         "interp: the interpreter's launches only (what CI runs); all: both")
    ap.add_argument("--fail-on-spill", action="store_true", help="exit 1 on spills too, not only on failures")
    a = ap.parse_args(argv)
    ops = a.ops.split(",") if a.ops else None
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    kernels = a.kernels.split(",") if a.kernels else None
    if a.capture:
        capture(a.capture, ops, "interp" if a.plans == "interp" else "gpu")
        return 0
    if a.compile:
        return compile_all(a.compile, targets, a.jobs, a.json, a.fail_on_spill, kernels)
    d = tempfile.mkdtemp()
    launches: dict[str, dict] = {}
    for plans in ("gpu", "interp") if a.plans in ("gpu", "all") else ("interp",):
        path = os.path.join(d, f"{plans}.json")   # one process each: the GPU-plan patches must not leak
        subprocess.run([sys.executable, os.path.abspath(__file__), "--capture", path, "--plans", plans]
                       + (["--ops", a.ops] if a.ops else []), check=True)
        gpu_kernels = {r["kernel"] for r in launches.values()}
        for rec in json.load(open(path, encoding="utf-8")):
            if a.plans == "gpu" and plans == "interp" and rec["kernel"] in gpu_kernels:
                continue   # interpreter tiles never reach a GPU; kept only for kernels the GPU plans miss
            key = json.dumps({k: v for k, v in rec.items() if k != "plans"}, sort_keys=True, default=str)
            launches.setdefault(key, rec)
    path = os.path.join(d, "launches.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(launches.values()), f, indent=1)
    return compile_all(path, targets, a.jobs, a.json, a.fail_on_spill, kernels)


if __name__ == "__main__":
    sys.exit(main())
