"""Generation: (chunked) prefill, then one-token decode steps; greedy or temperature sampling with a seed
(Gumbel-max, as the reference ``generate.py``); stops at EOS or ``max_new_tokens``.

Prompts of different lengths share one lockstep cache like the reference: the common prefix length is
prefilled, then longer prompts feed their remaining prompt tokens through decode steps instead of
sampled ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .transformer import Transformer

__all__ = ["GenerationResult", "generate", "sample"]


@dataclass
class GenerationResult:
    """Generated ids per sequence (prompt excluded), timings and, optionally, the logits of every step."""

    tokens: list[list[int]]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    step_logits: list[Tensor] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps * len(self.tokens) / self.decode_s if self.decode_s > 0 else float("nan")


def sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """argmax for temperature 0; else Gumbel-max: ``argmax(softmax(logits / T) / Exp(1))``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":  # pragma: no cover - needs torch_npu
        torch.npu.synchronize()  # type: ignore[attr-defined]


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, eos_id: int | None = None, prefill_chunk: int | None = None,
             record_logits: bool = False, forced: list[list[int]] | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt. ``forced`` replays given continuations instead of
    sampling (teacher forcing, for comparing backends on the same input)."""
    device = model.device
    b = len(prompts)
    min_len = min(len(p) for p in prompts)
    total = max(len(p) for p in prompts) + max_new_tokens
    cache = model.new_cache(b, max_seq_len=max(total, model.cfg.window_size))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    eos = model.cfg.eos_token_id if eos_id is None else eos_id
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    logits_rec: list[Tensor] = []

    tokens = torch.tensor([p[:min_len] for p in prompts], dtype=torch.long, device=device)
    _sync(device)
    t0 = time.perf_counter()
    step = prefill_chunk or min_len
    for c0 in range(0, min_len, step):
        logits = model.forward(tokens[:, c0:c0 + step], cache)
    _sync(device)
    t1 = time.perf_counter()

    steps = 0
    pos = min_len
    while True:
        if record_logits:
            logits_rec.append(logits.detach().float().cpu())
        nxt_t = sample(logits, temperature, gen)
        if getattr(model, "par", None) is not None:
            nxt_t = model.par.same_tokens(nxt_t)       # every rank feeds rank 0's tokens to the next step
        nxt = nxt_t.tolist()
        for i in range(b):
            if pos < len(prompts[i]):
                nxt[i] = prompts[i][pos]               # still inside this prompt
            elif not done[i]:
                k = len(out[i])
                if forced is not None:
                    nxt[i] = forced[i][k] if k < len(forced[i]) else eos
                out[i].append(nxt[i])
                done[i] = nxt[i] == eos or len(out[i]) >= max_new_tokens
        pos += 1
        if all(done):
            break
        logits = model.forward(torch.tensor(nxt, dtype=torch.long, device=device).view(b, 1), cache)
        steps += 1
    _sync(device)
    t2 = time.perf_counter()
    return GenerationResult(out, sum(len(p) for p in prompts), t1 - t0, t2 - t1, steps, logits_rec)
