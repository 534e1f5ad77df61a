"""Logit processing of one engine step before sampling: ``logit_bias``, the repetition / frequency /
presence penalties, and the log-probabilities a request asks for.

Order, as vLLM's sampler applies them: the raw fp32 logits ``z`` of a row; ``logit_bias`` adds its bias
to its token ids; then the penalties, with ``c[j]`` the count of token j among the tokens generated so
far and ``seen[j]`` whether j is in the prompt or among them:

* ``repetition_penalty`` r (vLLM's, from CTRL; over prompt + generated): ``z[j] / r`` where
  ``seen[j]`` and ``z[j] > 0``, ``z[j] * r`` where ``seen[j]`` and ``z[j] <= 0``;
* ``frequency_penalty`` f and ``presence_penalty`` p (OpenAI's definition; over generated tokens only):
  ``z[j] - c[j] * f - (c[j] > 0) * p``.

Temperature, top-k and top-p follow in :mod:`.sampling`; greedy rows take the argmax of the processed
logits. Log-probabilities are those of the raw model distribution, ``log_softmax(z)``, before bias,
penalties and temperature (vLLM's default ``--logprobs-mode raw_logprobs``), so they do not depend on
how the token was drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .sampling import SamplingParams

__all__ = ["Sampled", "penalised", "apply_logit_bias", "apply_penalties", "process", "logprobs_of"]


@dataclass(frozen=True)
class Sampled:
    """One sampled token: its id and, when asked for, its raw log-probability and the ``k`` most likely
    tokens of the raw distribution as ``(id, logprob)``, most likely first."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def penalised(p: "SamplingParams") -> bool:
    """Whether any penalty of ``p`` changes the logits."""
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


def apply_logit_bias(x: Tensor, params: list["SamplingParams"]) -> Tensor:
    """``x [n, V]`` with each row's ``logit_bias`` added (a new tensor when any row has one)."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return x
    x = x.clone()
    for i in rows:
        ids = torch.tensor([t for t, _ in params[i].logit_bias], dtype=torch.long, device=x.device)
        bias = torch.tensor([b for _, b in params[i].logit_bias], dtype=x.dtype, device=x.device)
        x[i].index_add_(0, ids, bias)
    return x


def apply_penalties(x: Tensor, params: list["SamplingParams"], prompts: list[list[int]],
                    outputs: list[list[int]]) -> Tensor:
    """``x [n, V]`` with each row's penalties over ``prompts[i]`` and ``outputs[i]`` (the tokens generated
    so far); see the module docstring. A new tensor when any row is penalised."""
    rows = [i for i, p in enumerate(params) if penalised(p)]
    if not rows:
        return x
    x = x.clone()
    v = x.shape[-1]
    for i in rows:
        p, row = params[i], x[i]
        out = torch.tensor(outputs[i], dtype=torch.long, device=x.device)
        counts = torch.bincount(out, minlength=v).to(x.dtype)
        if p.repetition_penalty != 1:
            seen = counts > 0
            seen[torch.tensor(prompts[i], dtype=torch.long, device=x.device)] = True
            r = p.repetition_penalty
            row = torch.where(seen, torch.where(row > 0, row / r, row * r), row)
        x[i] = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(x.dtype)
    return x


def process(x: Tensor, params: list["SamplingParams"], prompts: list[list[int]], outputs: list[list[int]]) -> Tensor:
    """The logits sampling draws from (before temperature): bias, then penalties."""
    return apply_penalties(apply_logit_bias(x, params), params, prompts, outputs)


def logprobs_of(raw: Tensor, params: list["SamplingParams"], tokens: list[int]) -> list[Sampled]:
    """``Sampled`` for each row of the raw fp32 logits ``raw [n, V]``: the chosen ``tokens[i]`` with its
    log-probability and the row's ``params[i].logprobs`` most likely tokens when the row asks for them."""
    out = [Sampled(t) for t in tokens]
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    lp = torch.log_softmax(raw[rows].float(), dim=-1)
    kmax = min(max(params[i].logprobs for i in rows), lp.shape[-1])
    top_v, top_i = lp.topk(kmax, dim=-1) if kmax > 0 else (lp[:, :0], lp[:, :0].long())
    chosen = lp.gather(-1, torch.tensor([[tokens[i]] for i in rows], device=lp.device)).squeeze(-1).tolist()
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        k = params[i].logprobs
        out[i] = Sampled(tokens[i], chosen[j], tuple(zip(top_i[j][:k], top_v[j][:k])))
    return out
