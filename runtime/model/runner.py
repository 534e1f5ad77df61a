"""``dsv4rt run``: load a model (a checkpoint, the tiny preset, or the synthetic V4-Flash slice), generate,
print the text, prefill / decode tokens/s and the implementation every op used; ``--check`` verifies the
run on its own tokens against the float64 reference ops (:mod:`dsv4rt.model.verdict`)."""
from __future__ import annotations

import contextlib
import io
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, TextIO

import torch

from .. import env, invariant
from ..errors import BackendSelectionError
from .config import ModelConfig, preset
from .cores import glue_on_one_thread
from .generate import GenerationResult, generate
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from .transformer import Transformer

__all__ = ["RunOptions", "run", "resolve_device", "build_model", "slice_ratios", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "DeepSeek-V4 on dsv4rt:"
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class RunOptions:
    checkpoint: str | None = None
    preset: str | None = None
    backend: str = "auto"
    prompt: str | list[str] | None = None   # several prompts run as one batch
    prompt_len: int | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    check: bool = False
    dtype: str = "bf16"
    precision: str = "release"     # the bf16 precision points of the release, or "fp32" (see OpCaller)
    prefill_chunk: int | None = None
    warmup: bool = False          # one untimed prefill + 1 token before the timed run (--warmup)
    layers: int | None = None     # --preset flash-slice only (default 4)
    experts: int | None = None
    convert_fp8: bool = False
    progress: bool = True
    tp: int | None = None          # tensor-parallel size of attention (None: the largest the config allows)
    ep: int | None = None          # expert-parallel size of the MoE (None: the largest the config allows)
    tokenizer: str | None = None   # --tokenizer: a tokenizer.json, or a folder holding one
    batch_invariant: bool | None = None   # --[no-]batch-invariant (None: DSV4RT_BATCH_INVARIANT, see dsv4rt.invariant)


def resolve_device(backend: str) -> tuple[torch.device, str | None]:
    """(device holding the weights, ``use_backend`` choice or None for automatic) for ``--backend``."""
    if backend == "cpu":
        return torch.device("cpu"), "cpu"
    if backend == "cuda":
        if env.flag("DSV4RT_TRITON_INTERPRET"):
            return torch.device("cpu"), "cuda"  # Triton interpreter: the cuda kernels run on CPU tensors
        if not torch.cuda.is_available():
            raise BackendSelectionError("--backend cuda: no CUDA device is visible (set DSV4RT_TRITON_INTERPRET=1 "
                                        "to run the Triton kernels on the CPU); see `dsv4rt info`")
        return torch.device("cuda"), "cuda"
    if backend == "ascend":
        if not _npu_available():
            raise BackendSelectionError("--backend ascend: torch_npu is not installed or sees no NPU; "
                                        "see `dsv4rt info`")
        return torch.device("npu"), "ascend"
    if backend == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        if _npu_available():
            return torch.device("npu"), None
        return torch.device("cpu"), None
    raise BackendSelectionError(f"--backend {backend!r}: expected auto, cpu, cuda or ascend")


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401 (registers the npu device)
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())  # type: ignore[attr-defined]


@contextlib.contextmanager
def _cpu_threads(device: torch.device) -> Iterator[None]:
    """On the CPU the torch glue runs on one thread (torch's OpenMP workers spinning next to the kernels'
    threads slowed decode ~5x on 2 cores; the batch-invariant mode needs it) and the native kernels on every
    core (:mod:`dsv4rt.model.cores`: torch and the kernels share one OpenMP thread count)."""
    with glue_on_one_thread(device):
        yield


def build_model(opts: RunOptions, device: torch.device, quiet: bool = False,
                gen_device: torch.device | None = None,
                distributed: bool = False) -> tuple[Transformer, Tokenizer, str]:
    """(model on ``device``, tokenizer, where the weights came from). Synthetic weights are drawn on
    ``gen_device`` (default ``device``), so a CPU copy of a GPU run's model gets the very same values.
    ``distributed``: this rank's part of the ``opts.tp`` x ``opts.ep`` layout (process group initialised)."""
    from .checkpoint import Checkpoint
    from .synthetic import SyntheticSource, tiny_checkpoint

    dtype = _DTYPES[opts.dtype]

    def layout(cfg: ModelConfig) -> Any:
        if not distributed:
            return None
        from ..distributed import Parallel

        try:
            return Parallel.create(cfg, opts.tp, opts.ep, device)
        except ValueError as exc:
            raise BackendSelectionError(str(exc)) from None

    if opts.checkpoint or (opts.preset or "tiny") in ("tiny", "tiny-v41"):
        # safe when ranks race: the first rename wins
        path = opts.checkpoint or tiny_checkpoint(opts.seed, name=opts.preset or "tiny")
        ck = Checkpoint(path, progress=opts.progress and not quiet and not distributed)
        # checked before the weights load; a preset's checkpoint speaks bytes (tiny-v41's tokenizer.json, the
        # same byte tokenizer, is there for the Engram token classes and other implementations)
        tok = load_tokenizer(ck.cfg, opts.checkpoint, opts.tokenizer)
        names = Transformer.load_order(ck.cfg)
        ck.start_progress(names)
        model = Transformer(ck.cfg, ck, device, dtype, convert_fp4=opts.convert_fp8, par=layout(ck.cfg),
                            precision=opts.precision)
        ck.finish_progress()
        origin = path if opts.checkpoint else (f"{path} ({opts.preset or 'tiny'} preset: random weights, so the text "
                                               f"is noise)")
        return model, tok, origin
    if opts.preset in ("flash-slice", "flash41-slice"):
        cfg = slice_config(opts.preset, opts.layers, opts.experts)
        from .progress import ProgressSource

        tok = load_tokenizer(cfg, None, opts.tokenizer) if opts.tokenizer else ByteTokenizer(cfg.bos_token_id,
                                                                                            cfg.eos_token_id)
        src = ProgressSource(SyntheticSource(cfg, opts.seed, gen_device or device, fast=True, mtp=False),
                             "drawing synthetic weights", enabled=opts.progress and not quiet and not distributed)
        model = Transformer(cfg, src, device, dtype, convert_fp4=opts.convert_fp8, par=layout(cfg),
                            precision=opts.precision)
        src.progress.close()
        return model, tok, (
            f"synthetic random weights (seed {opts.seed}, in memory; the text is noise)")
    raise BackendSelectionError(f"--preset {opts.preset}: the full {opts.preset} model needs its checkpoint "
                                f"(--checkpoint DIR); runnable presets: tiny, flash-slice, tiny-v41, flash41-slice")


def _v41_slice(layers: int) -> ModelConfig:
    from .config_v41 import _flash41_slice
    try:
        return _flash41_slice(layers)
    except ValueError as exc:
        raise BackendSelectionError(str(exc)) from None


def slice_config(name: str, layers: int | None = None, experts: int | None = None) -> ModelConfig:
    """A slice preset (``flash-slice`` / ``flash41-slice``) with ``layers`` layers and ``experts`` routed experts
    (None: the preset's); a V4 slice keeps every layer kind and at most ``layers`` hash-routed layers."""
    cfg = preset(name)
    if name == "flash41-slice":
        if layers is not None:
            cfg = _v41_slice(layers)
    elif layers is not None and layers != cfg.n_layers:
        cfg = cfg.replace(n_layers=layers, n_hash_layers=min(cfg.n_hash_layers, layers),
                          compress_ratios=slice_ratios(preset("flash").compress_ratios[:-1], layers) + (0,))
    if experts:
        cfg = cfg.replace(n_routed_experts=experts, n_activated_experts=min(cfg.n_activated_experts, experts))
    return cfg


def slice_ratios(schedule: tuple[int, ...], n: int) -> tuple[int, ...]:
    """The first ``n`` layers' compression ratios of a V4 layer schedule, keeping every layer kind: the
    schedule's own prefix when it already holds each kind, else the first layer of each kind (CSA, HCA,
    then SWA), so the indexer and the compressors run even in a 1-3 layer slice."""
    kinds = list(dict.fromkeys(schedule))
    if set(schedule[:n]) == set(kinds):
        return tuple(schedule[:n])
    order = sorted(kinds, key=lambda r: (r == 0, schedule.index(r)))[:n]
    return tuple(sorted(order, key=schedule.index))


def _describe(cfg: ModelConfig) -> str:
    kinds = ", ".join(cfg.layer_kinds())
    return (f"{cfg.name}: dim {cfg.dim}, {cfg.n_layers} layers ({kinds}), {cfg.n_heads} heads, "
            f"{cfg.n_routed_experts} experts ({cfg.expert_dtype}), vocab {cfg.vocab_size}")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)


def _prompts(opts: RunOptions, tok: Tokenizer, cfg: ModelConfig) -> list[list[int]]:
    """Token ids of every prompt of the batch (one, unless several --prompt were given)."""
    texts = opts.prompt if isinstance(opts.prompt, list) else [opts.prompt]
    return [_prompt_ids(opts, tok, cfg, t) for t in texts]


def _prompt_ids(opts: RunOptions, tok: Tokenizer, cfg: ModelConfig, text: str | None) -> list[int]:
    if opts.prompt_len:
        g = torch.Generator().manual_seed(opts.seed)
        lo = 3 if isinstance(tok, ByteTokenizer) else 0
        return [cfg.bos_token_id] + torch.randint(lo, min(cfg.vocab_size, 259) if lo else cfg.vocab_size,
                                                  (opts.prompt_len - 1,), generator=g).tolist()
    return tok.encode(DEFAULT_PROMPT if text is None else text)


def run(opts: RunOptions, out: TextIO | None = None) -> int:
    """Run generation as the CLI does; returns the exit code. Under ``torchrun`` (WORLD_SIZE > 1) every
    rank runs it on its part of the layout and rank 0 prints."""
    from ..distributed.launch import world_from_env

    world, rank, _ = world_from_env()
    if world == 1 and max(opts.tp or 1, opts.ep or 1) > 1:
        n = max(opts.tp or 1, opts.ep or 1)
        flags = " ".join(f"--{k} {v}" for k, v in (("tp", opts.tp), ("ep", opts.ep)) if v)
        raise BackendSelectionError(f"{flags} needs at least {n} processes: torchrun --nproc-per-node {n} -m dsv4rt "
                                    f"run {flags} ...")
    if world == 1:
        return _run(opts, out or sys.stdout, False)
    from ..distributed.launch import shutdown

    try:
        return _run(opts, (out or sys.stdout) if rank == 0 else io.StringIO(), True)
    finally:
        shutdown()


def _run(opts: RunOptions, out: TextIO, distributed: bool) -> int:
    from ..distributed.launch import describe, init_from_env

    device, choice = resolve_device(opts.backend)
    if distributed:
        device = init_from_env(device)
    t0 = time.perf_counter()
    with _cpu_threads(device), invariant.mode(opts.batch_invariant):
        model, tok, origin = build_model(opts, device, distributed=distributed)
        load_s = time.perf_counter() - t0
        prompts = _prompts(opts, tok, model.cfg)
        with contextlib.nullcontext() if choice is None else _use(choice):
            if opts.warmup:
                generate(model, prompts, 1, opts.temperature, opts.seed, prefill_chunk=opts.prefill_chunk)
            res = generate(model, prompts, opts.max_new_tokens, opts.temperature, opts.seed,
                           prefill_chunk=opts.prefill_chunk)
        label = opts.backend + (" (Triton interpreter)" if choice == "cuda" and device.type == "cpu" else "")
        print(f"model    {_describe(model.cfg)}", file=out)
        conv = ", FP4 experts converted to FP8 at load" if opts.convert_fp8 else ""
        print(f"weights  {origin} (loaded in {load_s:.2f} s{conv})", file=out)
        print(f"backend  {label}, weights on {device}, activations {opts.dtype}", file=out)
        for line in describe(model.par, model.cfg):
            print(line, file=out)
        for i, prompt in enumerate(prompts):
            tag = f" {i + 1}" if len(prompts) > 1 else ""
            shown = "" if opts.prompt_len else f" {_printable(tok.decode(prompt))!r}"
            print(f"{'prompt' + tag:<8}{shown} ({len(prompt)} tokens)", file=out)
            print(f"{'text' + tag:<8} " + _printable(tok.decode(res.tokens[i])), file=out)
            ids = res.tokens[i]
            print(f"{'ids' + tag:<8} {ids[:16]}{' ...' if len(ids) > 16 else ''}", file=out)
        _timings(res, prompts, out)
        _ops(model, out)
        if opts.check:
            return 0 if _check(opts, model, device, choice, prompts, res, out) else 1
    return 0


@contextlib.contextmanager
def _use(choice: str) -> Iterator[None]:
    from ..select import use_backend

    with use_backend(choice):
        yield


def _timings(res: GenerationResult, prompts: list[list[int]], out: TextIO) -> None:
    """Prefill / decode figures: one sequence as before; a batch per sequence and in total, saying which
    prompt tokens were prefilled together (the shortest prompt's length) and which went through decode steps."""
    b = len(prompts)
    if b == 1:
        print(f"prefill  {res.prompt_tokens} tokens in {res.prefill_s:.3f} s = {res.prefill_tok_s:.1f} tok/s", file=out)
        if res.decode_steps:
            print(f"decode   {res.decode_steps} tokens in {res.decode_s:.3f} s = {res.decode_tok_s:.1f} tok/s",
                  file=out)
        else:
            print("decode   0 tokens (stopped after the first generated token)", file=out)
        return
    common = min(len(p) for p in prompts)
    fed = res.prompt_tokens - common * b
    pre_rate = common * b / res.prefill_s if res.prefill_s > 0 else float("inf")
    print(f"prefill  {common * b} tokens ({b} sequences x {common}, one batch) in {res.prefill_s:.3f} s = "
          f"{pre_rate:.1f} tok/s in total" + (f"; {fed} more prompt tokens (the longer prompts' rest) went through "
                                             "the decode steps" if fed else ""), file=out)
    rows = res.decode_steps * b
    if res.decode_steps:
        print(f"decode   {res.decode_steps} steps x {b} sequences = {rows} tokens in {res.decode_s:.3f} s = "
              f"{res.decode_tok_s:.1f} tok/s in total, {res.decode_tok_s / b:.1f} tok/s per sequence", file=out)
    else:
        print("decode   0 steps (every sequence stopped after its first generated token)", file=out)
    for i, (p, t) in enumerate(zip(prompts, res.tokens)):
        print(f"  sequence {i + 1}: prompt {len(p)} tokens ({common} prefilled, {len(p) - common} in decode steps), "
              f"{len(t)} generated", file=out)
    print(f"  total: prompts {res.prompt_tokens} tokens, {sum(len(t) for t in res.tokens)} generated", file=out)


def _ops(model: Transformer, out: TextIO) -> None:
    print("ops      implementation used (calls)", file=out)
    for name, impls in model.ops.used().items():
        used = ", ".join(f"{impl} ({n})" for impl, n in impls.items())
        print(f"  {name:<18} {used}", file=out)


def _check(opts: RunOptions, model: Transformer, device: torch.device, choice: str | None,
           prompts: list[list[int]], res: GenerationResult, out: TextIO) -> bool:
    """Teacher-forced check of the run's tokens against the float64 reference ops (verdict.check_run)."""
    from .verdict import check_run

    distributed = model.par is not None

    def build(dtype: str, one_process: bool) -> Transformer:
        if dtype == opts.dtype and (not one_process or (not distributed and device.type == "cpu")):
            return model
        if not one_process:
            return build_model(replace(opts, dtype=dtype), device, True, distributed=distributed)[0]
        return build_model(replace(opts, dtype=dtype), torch.device("cpu"), True, gen_device=device)[0]

    seqs = [p + t for p, t in zip(prompts, res.tokens)]
    tested = (lambda: contextlib.nullcontext()) if choice is None else (lambda: _use(choice))
    return check_run(model, seqs, [len(p) for p in prompts], opts.dtype, opts.precision, opts.prefill_chunk,
                     tested, build, out)


def options_from_args(args: Any) -> RunOptions:
    """RunOptions from the argparse namespace of ``dsv4rt run``."""
    return RunOptions(checkpoint=args.checkpoint, preset=args.preset, backend=args.backend, prompt=args.prompt,
                      prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      seed=args.seed, check=args.check, dtype=args.dtype, precision=args.precision,
                      prefill_chunk=args.prefill_chunk, warmup=args.warmup,
                      layers=args.layers, experts=args.experts, convert_fp8=args.convert_fp8,
                      progress=not args.quiet, tp=args.tp, ep=args.ep, tokenizer=args.tokenizer,
                      batch_invariant=args.batch_invariant)
