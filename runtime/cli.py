"""The `dsv4rt` command (also `python -m dsv4rt`).

    dsv4rt info [--matrix] [--json]
    dsv4rt conformance --backend NAME [--ops a,b,...] [--report FILE] [--xfails FILE] [--seed N]

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


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_info, _add_conformance, _add_bench)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed why
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    _setup_logging()
    try:
        return args.func(args)
    except (_UsageError, Dsv4rtError, OSError) as exc:
        print(f"dsv4rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
