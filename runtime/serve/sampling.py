"""Per-request sampling: parameters, a batched sampler and incremental detokenisation with stop strings.

The sampler takes one engine step's logits ``[n, V]`` and each row's parameters. Each row's logits first
get its ``logit_bias`` and penalties (:mod:`.logits`); rows with temperature below ``GREEDY_EPS`` (1e-5,
as vLLM) take the argmax; the others are scaled by their temperature, masked by their top-k and top-p
(vectorised over the rows), and drawn with their own ``torch.Generator`` (Gumbel-max: ``argmax(p /
Exp(1))``, an exact draw from ``p``), so the same seed and prompt give the same output whatever else
shares the step. :func:`sample_rows` isolates failures: a row whose sampling raises gets its exception
and the other rows their tokens, each drawing the same noise as if the failing row were not there.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

from .logits import Sampled, logprobs_of, process

__all__ = ["SamplingParams", "GREEDY_EPS", "make_generator", "apply_top_k", "apply_top_p", "sample_rows",
           "sample_batch", "Sampled", "TextStream"]

GREEDY_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``)."""


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation. ``max_tokens`` None: up to the context limit; ``top_k`` 0 or
    -1 and ``top_p`` 1 disable those masks; ``seed`` None draws a fresh one; ``ignore_eos`` keeps
    generating past EOS (benchmarks); ``skip_special_tokens`` False keeps control tokens in the text (chat
    parsing reads ``<think>`` and DSML from it); penalties and ``logit_bias`` ((id, bias) pairs) as
    :mod:`.logits` applies them; ``logprobs`` None: none, k >= 0: each token's raw log-probability and the
    k most likely tokens."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature below ``GREEDY_EPS``)."""
        return self.temperature < GREEDY_EPS


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's random stream on ``device`` (None for greedy requests, which draw nothing); the seed
    is taken modulo 2^64, the range ``manual_seed`` takes."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed % 2 ** 64 if params.seed is not None else secrets.randbits(63))
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


def _sample(logits: Tensor, params: list[SamplingParams], noise: list[Tensor | None], prompts: list[list[int]],
            outputs: list[list[int]]) -> list[Sampled]:
    """Rows of ``logits [n, V]`` sampled with the pre-drawn Exp(1) ``noise`` of their non-greedy rows."""
    raw = logits.float()
    x = process(raw, params, prompts, outputs)
    out = x.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        dev, v = x.device, x.shape[-1]
        idx = torch.tensor(rows, device=dev)
        temp = torch.tensor([params[i].temperature for i in rows], device=dev, dtype=x.dtype)
        y = x.index_select(0, idx) / temp.unsqueeze(-1)
        y = apply_top_k(y, torch.tensor([k if 0 < (k := params[i].top_k) < v else 0 for i in rows], device=dev))
        y = apply_top_p(y, torch.tensor([params[i].top_p for i in rows], device=dev, dtype=y.dtype))
        probs = torch.softmax(y, dim=-1)
        out = out.index_copy(0, idx, (probs / torch.stack([noise[i] for i in rows])).argmax(dim=-1))
    return logprobs_of(raw, params, out.tolist())


def sample_rows(logits: Tensor, params: list[SamplingParams], gens: list[torch.Generator | None],
                prompts: list[list[int]] | None = None, outputs: list[list[int]] | None = None
                ) -> list[Sampled | Exception]:
    """One :class:`Sampled` per row of ``logits [n, V]`` (row i under ``params[i]``, generator ``gens[i]``,
    penalties over ``prompts[i]`` / ``outputs[i]``), or the exception that row's sampling raised. Each
    non-greedy row draws its noise first, once, so a failing row changes nothing for the others: when the
    batched draw raises, every row is sampled again alone with the same noise."""
    n = len(params)
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    res: list[Sampled | Exception | None] = [None] * n
    noise: list[Tensor | None] = [None] * n
    for i, p in enumerate(params):
        if not p.greedy:
            try:
                noise[i] = torch.empty(logits.shape[-1], device=logits.device).exponential_(1, generator=gens[i])
            except Exception as exc:  # noqa: BLE001 - the row fails, not the step
                res[i] = exc
    live = [i for i in range(n) if res[i] is None]
    if not live:
        return res  # type: ignore[return-value]
    try:
        got = _sample(logits[live], [params[i] for i in live], [noise[i] for i in live],
                      [prompts[i] for i in live], [outputs[i] for i in live])
        for i, s in zip(live, got):
            res[i] = s
    except Exception:  # noqa: BLE001 - find the row that raised
        for i in live:
            try:
                res[i] = _sample(logits[i:i + 1], [params[i]], [noise[i]], [prompts[i]], [outputs[i]])[0]
            except Exception as exc:  # noqa: BLE001
                res[i] = exc
    return res  # type: ignore[return-value]


def sample_batch(logits: Tensor, params: list[SamplingParams], gens: list[torch.Generator | None],
                 prompts: list[list[int]] | None = None, outputs: list[list[int]] | None = None) -> list[int]:
    """The token ids of :func:`sample_rows` (raises the first row's exception, if any)."""
    res = sample_rows(logits, params, gens, prompts, outputs)
    for r in res:
        if isinstance(r, Exception):
            raise r
    return [r.token for r in res]  # type: ignore[union-attr]


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
