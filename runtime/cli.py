"""The `dsv4rt` command (also `python -m dsv4rt`).

    dsv4rt info [--matrix] [--json]
    dsv4rt conformance --backend NAME [--ops a,b,...] [--report FILE] [--xfails FILE] [--seed N]
    dsv4rt run [--checkpoint DIR | --preset tiny|flash-slice|tiny-v41|flash41-slice] [--backend auto|cpu|cuda|ascend] [--prompt TEXT]
               [--max-new-tokens N] [--check]
    torchrun --nproc-per-node N -m dsv4rt run [--tp N] [--ep N] ...   (tensor / expert parallel)
    dsv4rt kv-cache --preset flash|pro|flash41|... --context N [--format bf16|fp8]

Exit codes: 0 success, 1 a check failed (conformance), 2 usage error or a dsv4rt error (message, no
traceback). Each subcommand is one ``_add_<name>`` function that declares its arguments and sets
``func``; ``main`` knows none of them by name.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from .errors import Dsv4rtError
from .presets_cli import ALL as PRESET_NAMES, PresetAction, PresetError

__all__ = ["main", "build_parser"]


class _UsageError(Exception):
    """Bad command-line input detected after parsing (exit code 2)."""


# ---- info ------------------------------------------------------------------------------------------

def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="backends, plug-ins, environment and the implementation chosen per op",
                       description="Show every backend with its probe result, plug-in load status, DSV4RT_* "
                                   "variables in effect and which implementation each op would use.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--matrix", action="store_true", help="print the op x backend Markdown table instead")
    g.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from . import info

    if args.matrix:
        print(info.matrix())
    elif args.json:
        print(json.dumps(info.diagnose(), indent=2, default=str))
    else:
        print(info.format_info(info.diagnose()))
    return 0


# ---- conformance -----------------------------------------------------------------------------------

def _add_conformance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conformance", help="check a backend against the float64 reference",
                       description="Run every op the backend implements (or --ops) against the golden "
                                   "reference on seeded cases; exit 1 on any failure.")
    p.add_argument("--backend", required=True, metavar="NAME", help="backend to certify (see `dsv4rt info`)")
    p.add_argument("--ops", metavar="a,b,...", help="comma-separated ops to check (default: all it implements)")
    p.add_argument("--report", metavar="FILE", help="write the report as JSON to FILE")
    p.add_argument("--xfails", metavar="FILE", help="file of expected failures (case id -> reason)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the generated cases (default 0)")
    p.set_defaults(func=_cmd_conformance)


def _cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import load_xfails, run_conformance
    from .registry import REGISTRY

    ops = None
    if args.ops is not None:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        unknown = [o for o in ops if o not in REGISTRY.specs]
        if not ops or unknown:
            raise _UsageError(f"--ops: unknown op(s) {', '.join(unknown) or '(none given)'}; "
                              f"known ops: {', '.join(REGISTRY.specs)}")
    xfails = load_xfails(args.xfails) if args.xfails else None
    report = run_conformance(args.backend, ops, xfails, args.seed)
    print(report.format_table())
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.passed else 1


# ---- later subcommands (run, bench, kv-cache) ------------------------------------------------------
# Add an ``_add_<name>(sub)`` function above and list it in _SUBCOMMANDS; keep heavy imports inside
# the command function so `dsv4rt info` stays cheap.

def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench.cli import add_bench

    add_bench(sub)


# ---- run -------------------------------------------------------------------------------------------

def add_batch_invariant(p: argparse.ArgumentParser) -> None:
    """``--batch-invariant`` / ``--no-batch-invariant`` (default: DSV4RT_BATCH_INVARIANT, itself on by default)."""
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="on the CPU, compute every row (token) so that its result never depends on the rest of the "
                   "batch: temperature-0 output is the same alone and in any batch (default on, "
                   "DSV4RT_BATCH_INVARIANT; --no-batch-invariant takes the fastest kernel per shape instead)")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text with DeepSeek-V4 on a backend (default: the tiny preset)",
                       description="Load a checkpoint in the released format (or the tiny preset's synthetic "
                                   "one, generated on first use), generate, and print the text, prefill / decode "
                                   "tokens/s and the implementation each op used.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory (config.json + safetensors)")
    src.add_argument("--preset", action=PresetAction,
                     help="synthetic model: tiny (default), flash-slice (V4-Flash widths, --layers layers, weights "
                     "drawn in memory; for GPUs), tiny-v41 (DeepSeek-V4.1, every layer kind at toy sizes) or "
                     "flash41-slice (V4.1-Flash widths, --layers >= 6)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "ascend"),
                   help="where the ops run (default auto: the best available device)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, or a folder holding one (default: the "
                   "checkpoint's; the presets: bytes); its ids must fit the model's vocabulary")
    p.add_argument("--prompt", metavar="TEXT", action="append", help="prompt text; repeat it to run several "
                   "prompts as one batch")
    p.add_argument("--prompt-len", type=int, metavar="N", help="use N synthetic prompt tokens instead (benchmarks)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples (Gumbel-max)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and synthetic-weight seed (default 0)")
    p.add_argument("--check", action="store_true", help="verify the run: teacher-forced on its tokens, every op "
                   "call against the float64 reference (fp32, release quantisation) and every position's logits "
                   "against a reference forward pass (fp32, quantisation off); exit 1 on FAIL. bf16 agreement is "
                   "printed, not judged (docs/verification.md)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="activation dtype (default bf16)")
    p.add_argument("--precision", default="release", choices=("release", "fp32"),
                   help="release (default): round where the released code computes in bf16 (per-head q norm, "
                   "attention P before P.V, indexer scores); fp32: keep those in fp32")
    p.add_argument("--prefill-chunk", type=int, metavar="N", help="prefill in chunks of N tokens")
    p.add_argument("--warmup", action="store_true", help="benchmarks: run the prompts once (prefill and one "
                   "generated token, untimed) before the timed run, as llama-bench does, so the timings leave out "
                   "first-call costs (page faults, thread start-up, caches)")
    add_batch_invariant(p)
    p.add_argument("--layers", type=int, metavar="N", help="layers of --preset flash-slice (default 4; the first "
                   "layers of each kind, so a short slice still runs the indexer and compressors)")
    p.add_argument("--experts", type=int, metavar="N", help="routed experts of --preset flash-slice (default 256; "
                   "fewer for small machines)")
    p.add_argument("--convert-fp8", action="store_true", help="convert FP4 experts losslessly to FP8 at load")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tp", type=int, metavar="N", help="under torchrun: tensor-parallel size of attention (query / "
                   "indexer heads, wo_a groups, vocabulary); default the largest divisor of the world size the model "
                   "allows (normally the world size)")
    p.add_argument("--ep", type=int, metavar="N", help="under torchrun: expert-parallel size of the MoE (routed "
                   "experts split, tokens exchanged all-to-all); default the largest divisor of the world size the "
                   "model allows (normally the world size)")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from .model.runner import options_from_args, run

    if args.max_new_tokens < 1 or (args.prompt_len is not None and args.prompt_len < 1):
        raise _UsageError("--max-new-tokens and --prompt-len must be >= 1")
    if (args.layers is not None and args.layers < 1) or (args.experts is not None and args.experts < 1):
        raise _UsageError("--layers and --experts must be >= 1")
    slice_only = [f for f, v in (("--layers", args.layers), ("--experts", args.experts)) if v is not None]
    if slice_only and args.preset not in ("flash-slice", "flash41-slice"):
        raise _UsageError(f"{' and '.join(slice_only)} only shape --preset flash-slice; the "
                          f"{'checkpoint' if args.checkpoint else 'tiny preset'} has its own layers and experts")
    if args.prompt is not None and args.prompt_len is not None:
        raise _UsageError("--prompt and --prompt-len exclude each other: --prompt-len N replaces the prompt with N "
                          "synthetic tokens")
    if (args.tp is not None and args.tp < 1) or (args.ep is not None and args.ep < 1):
        raise _UsageError("--tp and --ep must be >= 1")
    return run(options_from_args(args))


# ---- kv-cache --------------------------------------------------------------------------------------

def _context(text: str) -> int:
    t = text.strip().upper().replace("_", "").replace(",", "")
    mult = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 1048576, 128K or 1M, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("the context must be >= 0")
    return n


def _add_kv_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv-cache", help="KV cache bytes per sequence from a model's layer schedule",
                       description="KV cache bytes per sequence (docs/deepseek-v4.md section 8): windows, compressed entries "
                                   "and indexer keys of every layer at a context length.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", action=PresetAction, allowed=PRESET_NAMES,
                     help=f"released or synthetic config: {', '.join(PRESET_NAMES)}")
    src.add_argument("--config", metavar="PATH", help="a config.json / inference config.json, or a checkpoint dir")
    p.add_argument("--context", type=_context, required=True, metavar="N", help="tokens per sequence (e.g. 1M)")
    p.add_argument("--format", choices=("bf16", "fp8"),
                   help="V4 only: bf16: reference layout (1024 B entries); fp8: 584 B entries (default bf16); "
                   "V4.1's formats are fixed (FP8 window, FP4 global, MXFP4 index keys)")
    p.add_argument("--indexer", choices=("bf16", "fp8", "fp4"), help="indexer key format (default: as --format)")
    p.set_defaults(func=_cmd_kv_cache)


def _cmd_kv_cache(args: argparse.Namespace) -> int:
    from .model.config import load_config, preset
    from .model.kvsize import format_report

    cfg = preset(args.preset) if args.preset else load_config(args.config)
    if cfg.is_v41:
        if args.format or args.indexer:
            raise _UsageError("--format / --indexer choose V4's cache layout; V4.1's formats are fixed by the release")
        from .model.kvsize_v41 import format_report_v41
        print(format_report_v41(cfg, args.context))
        return 0
    print(format_report(cfg, args.context, args.format or "bf16", args.indexer))
    return 0


# ---- synth -----------------------------------------------------------------------------------------

def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a preset's synthetic checkpoint in the released format",
                       description="Draw a preset's seeded random weights and write them as a checkpoint in the "
                                   "released format (config.json, sharded safetensors with the index, and for V4.1 a "
                                   "byte-level tokenizer.json): what other loaders and tools can read.")
    p.add_argument("--preset", required=True, action=PresetAction, help="tiny, flash-slice, tiny-v41 or flash41-slice")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to create (must not exist)")
    p.add_argument("--layers", type=int, metavar="N", help="layers of a slice preset")
    p.add_argument("--experts", type=int, metavar="N", help="routed experts of a slice preset")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    import os

    from .model.checkpoint import write_checkpoint
    from .model.config import preset
    from .model.progress import ProgressSource
    from .model.runner import slice_config
    from .model.synthetic import SyntheticSource

    if os.path.exists(args.out):
        raise _UsageError(f"--out {args.out} exists; give a new directory")
    if (args.layers is not None or args.experts is not None) and "slice" not in args.preset:
        raise _UsageError("--layers / --experts shape the slice presets only")
    cfg = slice_config(args.preset, args.layers, args.experts) if "slice" in args.preset else preset(args.preset)
    # the slices draw FP8 / FP4 codes directly (as ``run`` does), so memory stays near one shard
    src = ProgressSource(SyntheticSource(cfg, args.seed, fast="slice" in args.preset), "drawing synthetic weights")
    extras = None
    if cfg.is_v41:
        from .model.engram_map import write_byte_tokenizer_json
        extras = write_byte_tokenizer_json
    out = write_checkpoint(args.out, cfg, ((n, src.get(n)) for n in src.names()), max_shard_bytes=1 << 30,
                           extras=extras)
    src.progress.close()
    print(f"wrote {cfg.name} ({len(src.names()):,} tensors) to {out}")
    return 0


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_info, _add_conformance, _add_bench,
                                                                          _add_run, _add_kv_cache, _add_synth, *(  # serve, loadtest
    lambda s, n=n: getattr(__import__("dsv4rt.serve.cli", fromlist=[n]), n)(s) for n in ("add_serve", "add_loadtest")))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dsv4rt", description="DeepSeek-V4 runtime: one op registry, "
                                     "backends for NVIDIA (Triton), Ascend (torch_npu) and CPU.")
    parser.add_argument("--version", action="version", version=f"dsv4rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _setup_logging() -> None:
    from . import env

    level = env.get("DSV4RT_LOG_LEVEL").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING) if level else logging.WARNING,
                        format="%(levelname)s %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None, shadow_checked: bool = False) -> int:
    """Entry point of the console script and of ``python -m dsv4rt`` (which warns about a shadowing folder
    itself, then passes ``shadow_checked``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed why
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    except PresetError as exc:  # a --preset name the command cannot use: one line saying what to do instead
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    _setup_logging()
    from .shadow import shadowing_warning

    warning = None if shadow_checked else shadowing_warning(path=())  # the script's sys.path is not the user's: the cwd
    if warning:
        print(f"dsv4rt: {warning}", file=sys.stderr)
    try:
        return args.func(args)
    except (_UsageError, Dsv4rtError, OSError) as exc:
        print(f"dsv4rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
