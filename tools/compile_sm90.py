"""Compile every Triton kernel of backends/cuda/kernels ahead of time for sm_90 and report registers and spills.

Needs no GPU. Two steps in two processes:

1. ``--capture FILE``: run the cuda backend's conformance under Triton's interpreter (CPU tensors) and record
   every distinct kernel launch (kernel, argument dtypes / scalar kinds, constexpr values, num_warps,
   num_stages) to FILE as JSON.
2. ``--compile FILE`` (the default runs both): build each recorded launch with Triton's
   ``ASTSource`` / ``GPUTarget("cuda", 90, 32)`` API, run the bundled ``ptxas -v`` on the PTX for sm_90a and
   print registers per thread and spill stores / loads per launch; exit 1 if any kernel spills or fails.

    python tools/compile_sm90.py [--ops fp4_gemm,...]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.float64": "fp64",
           "torch.int8": "i8", "torch.uint8": "u8", "torch.int16": "i16", "torch.int32": "i32", "torch.int64": "i64",
           "torch.float8_e4m3fn": "fp8e4nv", "torch.float8_e5m2": "fp8e5", "torch.bool": "i1"}


def _kind(value):
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


def capture(path: str, ops: list[str] | None) -> None:
    os.environ["DSV4RT_TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import triton.language as tl
    from triton.runtime import interpreter

    from dsv4rt.conformance import run_conformance

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
        rec = {"module": fn.__module__, "kernel": fn.__name__, "signature": sig, "constexprs": const,
               "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
        seen.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)

    def getitem(self, grid):
        launch = original(self, grid)

        def run(*args, **kwargs):
            record(self.fn, args, kwargs)
            return launch(*args, **kwargs)
        return run

    interpreter.InterpretedFunction.__getitem__ = getitem
    report = run_conformance("cuda", ops, None, 0)
    if not report.passed:
        print(report.format_table(), file=sys.stderr)
    print(f"captured {len(seen)} distinct launches; conformance {'passed' if report.passed else 'FAILED'}",
          file=sys.stderr)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(seen.values()), f, indent=1, default=str)


def _ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (the bundled one matching its PTX version)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def compile_all(path: str) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = json.load(open(path, encoding="utf-8"))
    target = GPUTarget("cuda", 90, 32)
    bad = 0
    print(f"Triton {triton.__version__}, target sm_90a, {len(launches)} launches")
    print(f"{'kernel':<34} {'warps':>5} {'stages':>6} {'regs':>5} {'spill st':>8} {'spill ld':>8}  constexprs")
    for rec in launches:
        fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
        try:
            consts = {k: tl.dtype(v["tl.dtype"]) if isinstance(v, dict) else v for k, v in rec["constexprs"].items()}
            if "INTERP" in consts:
                consts["INTERP"] = False  # the GPU build of the kernel, not its interpreter variant
            src = ASTSource(fn, rec["signature"], consts)
            k = triton.compile(src, target=target, options={"num_warps": rec["num_warps"],
                                                            "num_stages": rec["num_stages"]})
            with tempfile.TemporaryDirectory() as d:
                ptx = os.path.join(d, "k.ptx")
                open(ptx, "w").write(k.asm["ptx"])
                proc = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(d, "k.o")],
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"ptxas: {proc.stderr.strip()[:300]}")
                out = proc.stderr
            regs = int(re.search(r"Used (\d+) registers", out).group(1))
            st, ld = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
        except Exception as exc:  # report and continue: one broken kernel must not hide the others
            bad += 1
            print(f"{rec['kernel']:<34} FAILED: {type(exc).__name__}: {' | '.join(str(exc).splitlines())[:400]}")
            continue
        bad += int(st > 0 or ld > 0)
        consts = ", ".join(f"{k}={v}" for k, v in consts.items())
        print(f"{rec['kernel']:<34} {rec['num_warps']:>5} {rec['num_stages']:>6} {regs:>5} {st:>8} {ld:>8}  {consts}")
    print(f"{'all compile without spills' if not bad else f'{bad} launch(es) spill or fail'}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture", metavar="FILE", help="only record the launches to FILE")
    ap.add_argument("--compile", metavar="FILE", help="only compile the launches recorded in FILE")
    ap.add_argument("--ops", help="comma-separated ops (default: all)")
    a = ap.parse_args()
    ops = a.ops.split(",") if a.ops else None
    if a.capture:
        capture(a.capture, ops)
        return 0
    if a.compile:
        return compile_all(a.compile)
    path = os.path.join(tempfile.mkdtemp(), "launches.json")
    subprocess.run([sys.executable, __file__, "--capture", path] + (["--ops", a.ops] if a.ops else []), check=True)
    return subprocess.run([sys.executable, __file__, "--compile", path]).returncode


if __name__ == "__main__":
    sys.exit(main())
