"""Whole-model CPU figures, ``dsv4rt bench --model tiny|flash-slice``: prefill and decode tokens/s of
``dsv4rt run``'s generation, in one process, once per op configuration:

* ``numpy for fp8_gemm, kv_compress, moe_route``: those three ops pinned to ``cpu/numpy`` (how the
  model ran before they had native variants), the others automatic;
* ``automatic, no AVX512-BF16``: the registry's own choice with the native kernels capped at AVX-512
  (``_C.set_isa("avx512")``: the prefill GEMMs on their FP32 path), only on CPUs that have AVX512-BF16;
* ``automatic``: the registry's own choice (``cpu/native`` wherever it implements the op).

Each configuration is run after a warm-up generation; the best of ``repeats`` runs is reported (the
spread of a 2-core machine is large). The generated tokens of every configuration are compared: the
runs use the same weights, prompt and greedy decoding; kernels that sum in another order may flip a
near-tie of the random weights' logits, after which the texts part, so a difference is reported, not
asserted (the conformance suite is what checks the ops).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..backends.cpu import native_isa, native_isa_cap

__all__ = ["ModelRow", "CONFIGS", "run_model_bench", "format_model_rows"]

NO_BF16 = "automatic, no AVX512-BF16"
# configuration -> (op -> implementation pins, or None; native ISA cap, or None)
CONFIGS: dict[str, tuple[dict[str, str] | None, str | None]] = {
    "numpy for fp8_gemm, kv_compress, moe_route": ({"fp8_gemm": "cpu/numpy", "kv_compress": "cpu/numpy",
                                                     "moe_route": "cpu/numpy"}, None),
    NO_BF16: (None, "avx512"),
    "automatic": (None, None),
}


def _configs() -> dict[str, tuple[dict[str, str] | None, str | None]]:
    """CONFIGS this machine can tell apart: the no-BF16 row only where the native kernels use AVX512-BF16."""
    bf16 = native_isa() == "avx512_bf16"
    return {k: v for k, v in CONFIGS.items() if bf16 or k != NO_BF16}


@dataclass
class ModelRow:
    model: str
    config: str
    prompt_tokens: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    ops: dict[str, dict[str, int]]
    same_tokens: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_model_bench(preset: str = "tiny", layers: int | None = None, prompt_len: int = 128,
                    new_tokens: int = 32, repeats: int = 3, log: Callable[[str], None] = lambda s: None
                    ) -> list[ModelRow]:
    """Build the preset once on the CPU and time generation under every configuration of CONFIGS."""
    from dsv4rt import use_backend

    from ..model.generate import generate
    from ..model.runner import RunOptions, _cpu_threads, build_model

    opts = RunOptions(preset=preset, layers=layers, backend="cpu", progress=False)
    device = torch.device("cpu")
    model, _, _ = build_model(opts, device, quiet=True)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.cfg.vocab_size, (prompt_len,), generator=g).tolist()
    name = preset if layers is None else f"{preset} --layers {layers}"
    rows, first_tokens = [], None
    with _cpu_threads(device):
        for config, (mapping, isa) in _configs().items():
            ctx = use_backend(mapping) if mapping else contextlib.nullcontext()
            with ctx, (native_isa_cap(isa) if isa else contextlib.nullcontext()):
                generate(model, [prompt], 4)                       # warm-up: binds every op's shapes
                best = None
                for _ in range(repeats):
                    model.ops.reset_counts()
                    res = generate(model, [prompt], new_tokens, eos_id=-1)
                    if best is None or res.prefill_s + res.decode_s < best[0].prefill_s + best[0].decode_s:
                        best = (res, model.ops.used())
            res, used = best
            first_tokens = first_tokens or res.tokens
            rows.append(ModelRow(name, config, prompt_len, new_tokens, res.prefill_tok_s, res.decode_tok_s, used,
                                 res.tokens == first_tokens))
            log(f"{name} [{config}]: prefill {res.prefill_tok_s:.1f} tok/s, decode {res.decode_tok_s:.2f} tok/s")
    return rows


def format_model_rows(rows: list[ModelRow]) -> str:
    """A Markdown table: one row per (model, configuration), the speed-up over the first configuration."""
    lines = ["| model | ops | prompt / new tokens | prefill tok/s | decode tok/s | vs first row | same tokens |",
             "|---|---|---|---|---|---|---|"]
    base: dict[str, ModelRow] = {}
    for r in rows:
        b = base.setdefault(r.model, r)
        ratio = f"{r.prefill_tok_s / b.prefill_tok_s:.2f}x prefill, {r.decode_tok_s / b.decode_tok_s:.2f}x decode"
        lines.append(f"| {r.model} | {r.config} | {r.prompt_tokens} / {r.new_tokens} | {r.prefill_tok_s:,.1f} | "
                     f"{r.decode_tok_s:,.2f} | {ratio} | {'yes' if r.same_tokens else 'no'} |")
    return "\n".join(lines)
