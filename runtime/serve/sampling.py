"""Per-request sampling: parameters, a batched sampler and incremental detokenisation with stop strings.

The sampler takes one engine step's logits ``[n, V]`` and each row's parameters: temperature 0 rows take
the argmax; the others are scaled by their temperature, masked by their top-k and top-p (vectorised over
the rows), and drawn with their own ``torch.Generator`` (Gumbel-max: ``argmax(p / Exp(1))``, an exact
draw from ``p``), so the same seed and prompt give the same output whatever else shares the step.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingParams", "make_generator", "apply_top_k", "apply_top_p", "sample_batch", "TextStream"]


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation. ``top_k`` 0 or -1 and ``top_p`` 1 disable those masks; ``seed``
    None draws a fresh one; ``ignore_eos`` keeps generating past EOS (benchmarks); ``skip_special_tokens``
    False keeps control tokens in the text (chat parsing reads ``<think>`` and DSML from it)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0)."""
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's random stream on ``device`` (None for greedy requests, which draw nothing)."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return g


def apply_top_k(logits: Tensor, k: Tensor) -> Tensor:
    """Rows of ``logits [n, V]`` with everything below each row's k-th largest value set to -inf; ``k [n]``
    <= 0 (or >= V) keeps the row whole. Ties with the k-th value are kept."""
    v = logits.shape[-1]
    k = torch.where((k <= 0) | (k > v), torch.full_like(k, v), k)
    if bool((k == v).all()):
        return logits
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: Tensor) -> Tensor:
    """Rows of ``logits [n, V]`` keeping the smallest set of top tokens whose probability reaches each row's
    ``p [n]`` (nucleus); the top token always stays; rows with p >= 1 are unchanged."""
    if bool((p >= 1).all()):
        return logits
    sorted_, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_, dim=-1)
    before = probs.cumsum(dim=-1) - probs           # mass of the tokens ranked above each one
    drop = (before >= p.unsqueeze(-1)) & (p.unsqueeze(-1) < 1)
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def sample_batch(logits: Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits [n, V]`` (fp32), row i under ``params[i]`` with generator ``gens[i]``."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        temp = torch.tensor([params[i].temperature for i in rows], device=dev, dtype=logits.dtype)
        x = logits.index_select(0, idx).float() / temp.unsqueeze(-1)
        x = apply_top_k(x, torch.tensor([params[i].top_k for i in rows], device=dev))
        x = apply_top_p(x, torch.tensor([params[i].top_p for i in rows], device=dev, dtype=x.dtype))
        probs = torch.softmax(x, dim=-1)
        noise = torch.stack([torch.empty(x.shape[-1], device=dev).exponential_(1, generator=gens[i])
                             for i in rows])
        out = out.index_copy(0, idx, (probs / noise).argmax(dim=-1))
    return out.tolist()


class TextStream:
    """Incremental detokenisation of one request: ``push(id)`` returns the new text and whether a stop string
    ended the output. Each push decodes the whole generated id list and diffs it against what was already
    sent (so multi-byte characters split over tokens come out whole); text that could still turn into a stop
    string, or ends in an incomplete character (U+FFFD), is held back until it settles; ``flush()`` releases
    it at the end. ``text`` is everything sent, truncated before a stop string. ``skip_special_tokens``
    False decodes control tokens as text."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self.tok, self.stop = tokenizer, tuple(s for s in stop if s)
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._full = ""
        self._maxstop = max((len(s) for s in self.stop), default=0)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a generated token: (text to send now, True if a stop string was reached)."""
        self.ids.append(token_id)
        full = self.tok.decode(self.ids) if self.skip else self.tok.decode(self.ids, skip_special_tokens=False)
        self._full = full
        sent = len(self.text)
        if self.stop:
            start = max(0, sent - self._maxstop)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                return self._send(full[:max(min(hits), sent)]), True
        hold = len(full) - len(full.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), hold, -1):
                if full.endswith(s[:k]):
                    hold = k
                    break
        return self._send(full[:max(len(full) - hold, sent)]), False

    def flush(self) -> str:
        """The held-back rest at the end of generation (no stop string was reached)."""
        return self._send(self._full)

    def _send(self, upto: str) -> str:
        delta = upto[len(self.text):]
        self.text += delta
        return delta
