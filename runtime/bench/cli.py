"""The `dsv4rt bench` subcommand."""
from __future__ import annotations

import argparse
import json
import sys

from ..presets_cli import PresetAction

__all__ = ["add_bench"]


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the ops against the measured roofline and their baselines",
                       description="Measure the device's ceilings, then time every case (docs/performance.md "
                                   "on accelerators, the native-kernel cases on CPUs) on every "
                                   "variant of the backend, each checked for correctness first.")
    p.add_argument("--backend", default="cpu", metavar="NAME", help="backend to time (default cpu)")
    p.add_argument("--ops", metavar="a,b,...", help="only cases of these ops (a routed-MoE case is 'moe_layer')")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the roofline with every case (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions: a smoke run whose "
                   "case names carry the small shapes (not comparable with the tables of docs/measured-cpu.md)")
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per case (default 30)")
    p.add_argument("--no-reprobe", action="store_true", help="skip re-measuring the ceilings after the cases "
                   "(then only the probes' agreement and the documented figures decide whether the machine "
                   "was too noisy for a verdict)")
    p.add_argument("--dispatch", action="store_true", help="only measure the registry's per-call overhead on CPU")
    p.add_argument("--model", action=PresetAction, allowed=("tiny", "flash-slice"), append=True,
                   help="tiny or flash-slice, repeatable; instead of the kernels: whole-model CPU prefill / decode "
                        "tokens/s, with fp8_gemm, kv_compress and moe_route on cpu/numpy and then chosen automatically")
    p.add_argument("--layers", type=int, default=2, help="--model flash-slice: layers (default 2)")
    p.add_argument("--prompt-len", type=int, default=128, help="--model: prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="--model: generated tokens (default 32)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.dispatch:
        from .dispatch import format_rows, measure_dispatch_overhead

        print(format_rows(measure_dispatch_overhead(number=2000 if args.quick else 20000)))
        return 0
    if args.model:
        return _cmd_model(args)
    from .report import format_report, plot_roofline, require_matplotlib
    from .runner import bench_op_names, run_bench

    if args.plot:
        require_matplotlib()  # before the run, not after minutes of timing
    ops = None
    if args.ops is not None:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        valid = bench_op_names(args.backend)
        unknown = [o for o in ops if o not in valid]
        if not ops or unknown:
            print(f"dsv4rt bench: error: --ops: unknown op(s) {', '.join(unknown) or '(none given)'}; "
                  f"ops with bench cases on {args.backend}: {', '.join(valid)}", file=sys.stderr)
            return 2
    report = run_bench(args.backend, ops, quick=args.quick, reps=3 if args.quick else args.reps,
                       log=lambda s: print(s, file=sys.stderr, flush=True), reprobe=not args.no_reprobe)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    if args.plot:
        plot_roofline(report, args.plot)
    return 1 if report.failures else 0


def _cmd_model(args: argparse.Namespace) -> int:
    from .model import format_model_rows, run_model_bench

    if args.backend != "cpu":
        print("dsv4rt bench: error: --model times the CPU backend only (use dsv4rt run --backend B on a device)",
              file=sys.stderr)
        return 2
    rows = []
    for preset in args.model:
        rows += run_model_bench(preset, args.layers if preset == "flash-slice" else None, args.prompt_len,
                                args.new_tokens, repeats=1 if args.quick else 3,
                                log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_model_rows(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in rows], f, indent=2)
    return 0
