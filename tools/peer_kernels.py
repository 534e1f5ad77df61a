"""The kernel table of tools/peer_kernels.sh: ggml's matmul next to dsv4rt's native GEMMs, interleaved.

``python tools/peer_kernels.py --ggml BIN --threads 2 --rounds 3 --reps 20 [--cold-mb 96] [--ms 1,8,64,512]``

Rows: FP4 (ggml MXFP4 in the layout llama.cpp's CPU backend gives it, f32 activations quantised to Q8_0
inside the call, vs ``dsv4rt._C.fp4_gemm`` on E2M1 + E8M0 as the model loads them (permuted in place into the CPU kernels' packed
layout where the CPU backend does that, backends/cpu/packed.py) with the model's activation path: bf16
activations, act_quant fp8 per 1 x 128 inside the call, bf16 output) and FP8 vs Q8_0 (ggml Q8_0 vs
``dsv4rt._C.fp8_gemm``, E4M3 with 128 x 128 E8M0 scales, act_quant fp8), each on the shapes N x K 4096 x 4096,
2048 x 4096, 4096 x 2048; columns M rows of activations. dsv4rt runs in its default batch-invariant mode
(``row_invariant`` with the few-rows kernel up to FEW_MAX_M rows, as backends/cpu/native.py calls it) and
in the plain mode (GEMV up to GEMV_MAX_M / FP8_GEMV_MAX_M rows). Each round runs, per shape, the ggml
program (tools/peer_kernels.cpp, a separate process: WARMUP then REPS timed calls per M) and then dsv4rt in
this process (the same), both at THREADS threads; a cell is the range over rounds and shapes of
ggml median / dsv4rt median (> 1: dsv4rt faster). Weights are seeded normal data quantised by each side's
own quantiser; each side's row 0 is checked against the unquantised product (a wrong kernel stops the run).
Timings are reported, never judged.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

SHAPES = ((4096, 4096), (2048, 4096), (4096, 2048))   # N x K
KINDS = (("FP4", "mxfp4"), ("FP8 vs Q8_0", "q8_0"))
MAX_REL_ERR = {"mxfp4": 0.2, "q8_0": 0.05}   # row 0 vs the unquantised product: E2M1 ~12%, E4M3 / Q8_0 ~3% / 1%


def _uptime() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    m = re.search(r"load average: (.*)$", out.strip())
    return m.group(1) if m else out.strip()


def ggml(bin_: str, kind: str, n: int, k: int, ms: list[int], threads: int, warmup: int, reps: int,
         cold_mb: int) -> tuple[dict[int, tuple[float, float, int]], str]:
    """({M: (median us, min us, weight bytes)}, weight buffer type) of one run of the ggml program."""
    p = subprocess.run([bin_, kind, str(n), str(k), ",".join(map(str, ms)), str(threads), str(warmup), str(reps),
                        str(cold_mb)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"peer_kernels ({kind} {n}x{k}) failed ({p.returncode}):\n{p.stderr[-2000:]}")
    got, buft = {}, "?"
    for line in p.stdout.splitlines():
        f = line.split()
        row = dict(zip(f[::2], f[1::2]))
        if float(row["rel_err"]) > MAX_REL_ERR[kind]:
            raise SystemExit(f"ggml {kind} {n}x{k} M={row['M']}: row 0 off the product by {row['rel_err']}")
        got[int(row["M"])] = (float(row["median_us"]), float(row["min_us"]), int(row["weight_bytes"]))
        buft = row["buffer"]
    return got, buft


class Dsv4rt:
    """dsv4rt's weights of one shape and its timed native calls (the arguments backends/cpu/native.py passes)."""

    def __init__(self, kind: str, n: int, k: int, seed: int) -> None:
        import numpy as np
        from dsv4rt import formats
        rng = np.random.default_rng(seed)
        self.wf = rng.standard_normal((n, k), dtype=np.float32)
        if kind == "mxfp4":
            self.w, self.s = formats.quant_mxfp4(self.wf)
            # as the model loads them: packed in place for the native kernels where the CPU backend would pack
            from dsv4rt import _C, env
            self.packed = bool(_C.fp4_packed_fast() and _C.fp4_packable(n, k) and env.get("DSV4RT_CPU_PACK_FP4") != "0")
            if self.packed:
                self.w = np.ascontiguousarray(self.w)
                _C.fp4_pack(self.w.reshape(-1), k)
        else:
            self.w, self.s = formats.quant_fp8_block(self.wf, 128)
        self.kind, self.n, self.k, self.rng = kind, n, k, rng
        self.bytes = self.w.nbytes + self.s.nbytes

    def time(self, m: int, invariant: bool, warmup: int, reps: int, cold_mb: int) -> tuple[float, float]:
        """(median, min) us of REPS calls on bf16 activations [m, K] (act_quant fp8 in the call, bf16 output)."""
        import numpy as np
        import torch
        from dsv4rt import _C
        from dsv4rt.backends.cpu import native
        x = torch.from_numpy(self.rng.standard_normal((m, self.k), dtype=np.float32)).to(torch.bfloat16)
        xb = x.view(torch.int16).numpy()
        out = np.empty((m, self.n), np.int16)
        if self.kind == "mxfp4":
            gemv = native.FEW_MAX_M if invariant else native.GEMV_MAX_M
            call = lambda: _C.fp4_gemm(xb, self.w, self.s, out, gemv, True, invariant, packed=self.packed)  # noqa: E731
        else:
            gemv = native.FEW_MAX_M if invariant else native.FP8_GEMV_MAX_M
            call = lambda: _C.fp8_gemm(xb, self.w, self.s, out, True, gemv, invariant)  # noqa: E731
        flush = np.empty(cold_mb << 20, np.uint8) if cold_mb else None
        for _ in range(warmup):
            call()
        us = []
        for i in range(reps):
            if flush is not None:
                flush.fill(i & 0xFF)
            t0 = time.perf_counter()
            call()
            us.append((time.perf_counter() - t0) * 1e6)
        y0 = torch.from_numpy(out[:1].copy()).view(torch.bfloat16).double().numpy()[0]
        ref = self.wf.astype(np.float64) @ x[0].double().numpy()
        err = float(np.linalg.norm(y0 - ref) / np.linalg.norm(ref))
        if err > MAX_REL_ERR[self.kind]:
            raise SystemExit(f"dsv4rt {self.kind} {self.n}x{self.k} M={m}: row 0 off the product by {err:.4f}")
        us.sort()
        return us[len(us) // 2], us[0]


def _rng(v: list[float]) -> str:
    return f"{min(v):.2f}-{max(v):.2f}" if len(v) > 1 and f"{min(v):.2f}" != f"{max(v):.2f}" else f"{v[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ggml", required=True, help="the compiled tools/peer_kernels.cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ms", default="1,8,64,512")
    ap.add_argument("--cold-mb", type=int, default=0, help="also time M=1 with a buffer this large written first")
    ap.add_argument("--llama-cpp", default="?", help="the llama.cpp version, for the header")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch
    torch.set_num_threads(a.threads)   # torch and dsv4rt._C share one OpenMP runtime: the kernels' threads
    from dsv4rt import _C, invariant  # noqa: F401  (an extension that does not load fails here, before any run)
    ms = [int(v) for v in a.ms.split(",")]
    modes = (True, False)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    print(f"date      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    flags = sorted({f for ln in open("/proc/cpuinfo") if ln.startswith("flags") for f in ln.split()
                    if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512vbmi", "amx_tile")})
    print(f"machine   {cpu}, {os.cpu_count()} cores visible, {platform.machine()}, {' '.join(flags)}")
    print(f"versions  llama.cpp {a.llama_cpp}, dsv4rt {git}, torch {torch.__version__}; "
          f"DSV4RT_BATCH_INVARIANT default mode: {'on' if invariant.enabled() else 'off'}")
    print(f"threads {a.threads}, {a.rounds} interleaved rounds, warm-up {a.warmup}, median of {a.reps} calls")
    from dsv4rt import env
    packs = bool(getattr(_C, "fp4_packed_fast", lambda: False)()) and env.get("DSV4RT_CPU_PACK_FP4") != "0"
    print(f"dsv4rt FP4 weights: {'packed in place as the model loads them' if packs else 'the released layout'}")
    print(f"load      {_uptime()} (before)")
    # ratio[(kind label, mode, M, 0 median / 1 min)] -> list over shapes and rounds
    ratio: dict[tuple[str, bool, object, int], list[float]] = {}
    rows: list[str] = []
    bufts: dict[str, str] = {}
    for label, kind in KINDS:
        for n, k in SHAPES:
            d = Dsv4rt(kind, n, k, seed=n * 7 + k)
            for r in range(a.rounds):
                load = _uptime()
                g, bufts[kind] = ggml(a.ggml, kind, n, k, ms, a.threads, a.warmup, a.reps, 0)
                t = {(mode, m): d.time(m, mode, a.warmup, a.reps, 0) for mode in modes for m in ms}
                cold = {}
                if a.cold_mb:
                    gc, _ = ggml(a.ggml, kind, n, k, [1], a.threads, a.warmup, a.reps, a.cold_mb)
                    cold = {"g": gc[1], **{mode: d.time(1, mode, a.warmup, a.reps, a.cold_mb) for mode in modes}}
                for mode in modes:
                    for i in (0, 1):   # medians, minima
                        for m in ms:
                            ratio.setdefault((label, mode, m, i), []).append(g[m][i] / t[(mode, m)][i])
                        if cold:
                            ratio.setdefault((label, mode, "cold", i), []).append(cold["g"][i] / cold[mode][i])
                gbs = (f"{g[1][2] / g[1][0] / 1e3:.1f} / {d.bytes / t[(True, 1)][0] / 1e3:.1f} / "
                       f"{d.bytes / t[(False, 1)][0] / 1e3:.1f}" if 1 in g else "-")
                rows.append(f"| {label} | {n}x{k} | {r + 1} | {load} | "
                            + " | ".join(f"{g[m][0]:.0f} / {t[(True, m)][0]:.0f} / {t[(False, m)][0]:.0f}" for m in ms)
                            + (f" | {cold['g'][0]:.0f} / {cold[True][0]:.0f} / {cold[False][0]:.0f}" if cold else "")
                            + f" | {gbs} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"load      {_uptime()} (after)")
    print("ggml weight buffer types (as llama.cpp's loader picks them): "
          + ", ".join(f"{k} {v}" for k, v in bufts.items()))
    cols = [f"M={m}" for m in ms] + (["M=1 cold"] if a.cold_mb else [])
    keys: list[object] = list(ms) + (["cold"] if a.cold_mb else [])
    print("\nus per call, ggml / dsv4rt batch-invariant / dsv4rt plain (medians); "
          "GB/s of weight bytes at M=1 (hot), same order:")
    print("| kind | N x K | round | load | " + " | ".join(cols) + " | GB/s M=1 |")
    print("|---" * (len(cols) + 5) + "|")
    print("\n".join(rows))
    for i, what in enumerate(("medians", "minima (best call; less hit by other load)")):
        print(f"\nggml time / dsv4rt time (> 1: dsv4rt faster), {what}, range over shapes and rounds:")
        print("| | dsv4rt mode | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 2) + "|")
        for label, _ in KINDS:
            for mode in modes:
                print(f"| {label}, 3 shapes | {'batch-invariant (default)' if mode else 'plain'} | "
                      + " | ".join(_rng(ratio[(label, mode, c, i)]) for c in keys) + " |")


if __name__ == "__main__":
    main()
