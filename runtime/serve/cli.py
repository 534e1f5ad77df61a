"""The ``dsv4rt serve`` and ``dsv4rt loadtest`` subcommands, and :func:`build_server`, which builds the
model, KV pool, engine and chat template of a server from :class:`ServeOptions` (the CLI and the
in-process load test share it).

KV pool sizing: ``--max-seq-len`` tokens per slot (default ``min(cfg.max_seq_len, 4096)``, at least the
attention window); ``--kv-cache-gib`` bytes in all, else ``--max-seqs`` (default 8) slots; with both, the
smaller of the two.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any

from .. import env
from ..errors import Dsv4rtError
from ..presets_cli import PresetAction

__all__ = ["ServeOptions", "Served", "build_server", "add_serve", "add_loadtest", "ServeConfigError"]


class ServeConfigError(Dsv4rtError):
    """A server option that cannot be honoured (bad size, pool holds no sequence)."""


@dataclass
class ServeOptions:
    """What ``dsv4rt serve`` builds (see the module docstring for the pool sizing)."""

    checkpoint: str | None = None
    preset: str | None = None
    backend: str = "auto"
    dtype: str = "bf16"
    precision: str = "release"
    seed: int = 0
    kv_cache_gib: float | None = None
    max_seqs: int | None = None
    max_seq_len: int | None = None
    max_queue: int = 256
    prefill_chunk: int = 512
    model_name: str | None = None
    tokenizer: str | None = None
    batch_invariant: bool | None = None   # None: DSV4RT_BATCH_INVARIANT (see dsv4rt.invariant)


@dataclass
class Served:
    """A built (not yet started) server: the engine, chat template and names for the startup line."""

    engine: Any
    template: Any
    model_name: str
    origin: str
    backend: str

    def describe(self, url: str) -> str:
        """The one startup line."""
        pool, e = self.engine.pool, self.engine
        gib = pool.n_slots * pool.slot_bytes / 2 ** 30
        return (f"dsv4rt serve: model {self.model_name} ({self.origin}), backend {self.backend} on "
                f"{e.model.device}, KV pool {pool.n_slots} slots x {pool.slot_bytes / 2 ** 20:.2f} MiB "
                f"({pool.max_seq_len} tokens each) = {gib:.3g} GiB, batch-invariant "
                f"{'on' if e.batch_invariant_on() else 'off'}, chat template {self.template.kind}, "
                f"listening on {url}")


def build_server(o: ServeOptions) -> Served:
    """Model, KV pool, engine (not started) and chat template for ``o``."""
    from ..model.kvpool import KVPool, device_memory, slot_bytes
    from ..model.runner import RunOptions, _cpu_threads, build_model, resolve_device
    from .chat import ChatTemplate
    from .engine import Engine

    for name, v in (("--max-seqs", o.max_seqs), ("--max-seq-len", o.max_seq_len), ("--prefill-chunk", o.prefill_chunk)):
        if v is not None and v < 1:
            raise ServeConfigError(f"{name} must be >= 1, got {v}")
    if o.max_queue < 0:
        raise ServeConfigError(f"--max-queue must be >= 0, got {o.max_queue}")
    if o.kv_cache_gib is not None and not (math.isfinite(o.kv_cache_gib) and o.kv_cache_gib > 0):
        raise ServeConfigError(f"--kv-cache-gib must be a finite number > 0, got {o.kv_cache_gib}")
    device, choice = resolve_device(o.backend)
    from .. import invariant

    # built in the mode it will serve in, so layers keep only the weight form that mode reads
    with _cpu_threads(device), invariant.mode(o.batch_invariant):
        model, tok, origin = build_model(RunOptions(checkpoint=o.checkpoint, preset=o.preset, backend=o.backend,
                                                    seed=o.seed, dtype=o.dtype, precision=o.precision,
                                                    progress=False, tokenizer=o.tokenizer), device, quiet=True)
    window = model.cfg.window_size
    max_seq_len = o.max_seq_len or max(min(model.cfg.max_seq_len, 4096), window)
    if max_seq_len < window:
        raise ServeConfigError(f"--max-seq-len {max_seq_len} is below the attention window ({window} tokens)")
    per = slot_bytes(model, max_seq_len)
    if o.kv_cache_gib is not None:
        budget = int(o.kv_cache_gib * 2 ** 30)
        budget = min(budget, o.max_seqs * per) if o.max_seqs else budget
        memory = device_memory(device)
        if memory is not None and budget // per * per > memory:
            raise ServeConfigError(f"--kv-cache-gib {o.kv_cache_gib:g} asks for a pool larger than the memory of "
                                   f"{device} ({memory / 2 ** 30:.3g} GiB); lower it or cap it with --max-seqs")
    else:
        budget = (o.max_seqs or 8) * per
    try:
        pool = KVPool(model, budget, max_seq_len)
    except ValueError as exc:
        raise ServeConfigError(f"{exc}; raise --kv-cache-gib or lower --max-seq-len") from None
    engine = Engine(model, tok, pool, max_queue=o.max_queue, prefill_chunk=o.prefill_chunk, backend=choice,
                    batch_invariant=o.batch_invariant)
    name = o.model_name or (os.path.basename(os.path.normpath(o.checkpoint)) if o.checkpoint
                            else f"dsv4-{o.preset or 'tiny'}")
    label = o.backend if choice is None or o.backend != "auto" else choice
    chat = ChatTemplate.from_checkpoint(o.checkpoint, tok, o.tokenizer, model_type=model.cfg.arch)
    return Served(engine, chat, name, origin, label)


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory (config.json + safetensors)")
    src.add_argument("--preset", action=PresetAction,
                     help="synthetic model: tiny (default), flash-slice, tiny-v41 or flash41-slice (default tiny; tiny-v41 / flash41-slice: DeepSeek-V4.1)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "ascend"),
                   help="where the ops run (default auto)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, or a folder holding one (and maybe a "
                   "tokenizer_config.json with a chat template); default: the checkpoint's, the presets: bytes")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="activation dtype (default bf16)")
    p.add_argument("--precision", default="release", choices=("release", "fp32"),
                   help="bf16 precision points of the release (default) or fp32")
    p.add_argument("--seed", type=int, default=0, help="synthetic-weight seed (default 0)")
    p.add_argument("--kv-cache-gib", type=float, metavar="G", help="KV pool size in GiB (default: --max-seqs slots)")
    p.add_argument("--max-seqs", type=int, metavar="N", help="sequences decoded together (default 8)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="tokens per sequence, prompt + completion "
                   "(default min(the model's max_seq_len, 4096), at least the attention window)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting for a slot before new ones get 503 (default 256)")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="prompt tokens prefilled per engine step (default 512)")
    from ..cli import add_batch_invariant

    add_batch_invariant(p)


def _options(args: argparse.Namespace, **over: Any) -> ServeOptions:
    fields = ServeOptions.__dataclass_fields__
    kw = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    kw.update(over)
    return ServeOptions(**kw)


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Declare ``dsv4rt serve``."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                   "/metrics; requests share the KV pool and are decoded together.")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $DSV4RT_API_KEY, else none)")
    p.add_argument("--model-name", metavar="NAME", help="model id served (default: the checkpoint dir's name, "
                   "or dsv4-tiny / dsv4-flash-slice)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .app import bind_socket, build_app, serve_forever
    except ImportError as exc:
        raise ServeConfigError(f"dsv4rt serve needs starlette and uvicorn (pip install 'dsv4rt[serve]'): {exc}")
    try:                                # before the model loads, so a busy port fails at once
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        raise ServeConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    try:
        served = build_server(_options(args))
    except BaseException:
        sock.close()
        raise
    key = args.api_key if args.api_key is not None else (env.get("DSV4RT_API_KEY") or None)
    app = build_app(served.engine, served.model_name, key, served.template)
    host, port = sock.getsockname()[:2]
    print(served.describe(f"http://{f'[{host}]' if ':' in host else host}:{port}"), flush=True)
    served.engine.start()
    try:
        serve_forever(app, sock, args.log_level)
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it
        pass
    finally:
        served.engine.stop()
        sock.close()
    return 0


def add_loadtest(sub: argparse._SubParsersAction) -> None:
    """Declare ``dsv4rt loadtest``."""
    p = sub.add_parser("loadtest", help="concurrent streaming clients against a dsv4rt (or OpenAI) server",
                       description="Send --requests streaming completions from --concurrency clients and report "
                                   "requests/s, output tokens/s, time to first token and inter-token latency. "
                                   "With --preset (no --url) it starts the server in-process and also runs "
                                   "the same requests one at a time, to compare batched with sequential decode.")
    p.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    _model_args(p)
    p.add_argument("--api-key", metavar="KEY", default=None, help="bearer key for --url (default $DSV4RT_API_KEY)")
    p.add_argument("--model", metavar="NAME", help="model id to ask for (default: the first of /v1/models)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, metavar="R", help="requests in all (default 4 x --concurrency)")
    p.add_argument("--max-tokens", type=int, default=32, metavar="M", help="tokens per completion (default 32)")
    p.add_argument("--prompt-len", type=int, default=32, metavar="L", help="prompt length in characters (default 32)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    p.set_defaults(func=_cmd_loadtest)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from . import loadtest

    if min(args.concurrency, args.max_tokens, args.prompt_len, args.requests or 1) < 1:
        raise ServeConfigError("--concurrency, --requests, --max-tokens and --prompt-len must be >= 1")
    if args.url and (args.checkpoint or args.preset):
        raise ServeConfigError("--url and --checkpoint / --preset exclude each other: test a running server, or "
                               "one started in-process")
    requests = args.requests or 4 * args.concurrency
    if args.url:
        key = args.api_key if args.api_key is not None else (env.get("DSV4RT_API_KEY") or None)
        report = loadtest.run_remote(args.url, args.concurrency, requests, args.max_tokens, args.prompt_len,
                                     key, args.model)
    else:
        opts = _options(args, max_seqs=args.max_seqs or args.concurrency)
        report = loadtest.run_inprocess(opts, args.concurrency, requests, args.max_tokens, args.prompt_len)
    print(loadtest.format_report(report))
    if args.json:
        loadtest.write_json(report, args.json)
    return 0 if report["errors"] == 0 else 1
