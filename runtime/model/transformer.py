"""The DeepSeek-V4 model: embedding -> 4 mHC streams -> blocks -> hc_head -> norm -> head (fp32 logits).

Built from any weight source (a validated Checkpoint, or synthetic weights) onto one device; the heavy
work of every layer goes through the registry ops (``OpCaller``), so the backend is picked by the inputs'
device and ``dsv4rt.use_backend`` around the call.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .block import Block, MTPBlock, load_hc
from .cache import KVCache
from .config import SWA, ModelConfig
from .functional import rms_norm
from .head import OutputHead
from .mhc import hc_head
from .opcall import OpCaller
from .ragged import RaggedBatch
from .rope import RopeTable, rope_tables
from .weights import Loader, WeightSource

__all__ = ["Transformer"]


class Transformer:
    """``Transformer(cfg, source, device)``; ``forward(tokens, cache)`` returns fp32 logits.

    ``dtype`` is the activation dtype (bfloat16 as the reference; float32 for precise comparisons);
    ``quant=False`` disables the reference's FP8/FP4 quantisation points and ``precision="fp32"`` its bf16
    precision points (see OpCaller; default "release"); ``mtp`` also
    loads the MTP block; ``convert_fp4`` converts the FP4 experts losslessly to FP8 at load (spec 1.5).
    ``par`` (a :class:`dsv4rt.distributed.Parallel`) loads and runs this rank's part of a tensor / expert
    parallel layout (vocab-parallel embedding and head; see the attention, indexer and MoE layers).
    """

    def __new__(cls, cfg: ModelConfig, *args: Any, **kwargs: Any) -> Any:
        if cfg.is_v41 and cls is Transformer:   # the V4.1 model: the same interface, its own layers
            from .transformer_v41 import Transformer41
            # an instance only: Python then runs Transformer41.__init__ once (constructing it here as well
            # would load every weight twice, the returned object being a Transformer)
            return super().__new__(Transformer41)
        return super().__new__(cls)

    def __init__(self, cfg: ModelConfig, source: WeightSource, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16, mtp: bool = False, convert_fp4: bool = False,
                 quant: bool = True, par: Any = None, precision: str = "release") -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.par = par
        self._tp = par if par is not None and par.tp > 1 else None
        ld = Loader(source, self.device, dtype, convert_fp4=convert_fp4, par=par)
        self.embed = ld.act("embed.weight", tp_dim=0)
        self.layers = [Block(cfg, i, ld) for i in range(cfg.n_layers)]
        self.norm = ld.f32("norm.weight")
        self.head = OutputHead(ld, "head.weight", tp_dim=0)
        self.hc_head = load_hc(ld, "hc_head")
        self.mtp = [MTPBlock(cfg, cfg.n_layers + i, ld) for i in range(cfg.n_mtp_layers if mtp else 0)]
        self.rope = rope_tables(cfg, self.device)
        self.ops = OpCaller(quant, precision)

    @staticmethod
    def load_order(cfg: ModelConfig, mtp: bool = False) -> Iterable[str]:
        """Names the constructor reads (for a progress bar's total)."""
        from .schema import checkpoint_schema

        return [n for n in checkpoint_schema(cfg, mtp=mtp)]

    def new_cache(self, batch: int = 1, max_seq_len: int | None = None) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_seq_len`` tokens (default cfg.max_seq_len);
        the RoPE tables grow to cover it."""
        return self._fit_rope(KVCache(self.cfg, batch, max_seq_len, self.dtype, self.device, mtp=bool(self.mtp)))

    def _fit_rope(self, cache: Any) -> Any:
        """``cache``, after growing the RoPE tables to its ``max_seq_len``."""
        if cache.max_seq_len > self.rope[SWA].cos.shape[0]:
            self.rope = rope_tables(self.cfg, self.device, cache.max_seq_len)
        return cache

    def _rope(self, layer: int) -> RopeTable:
        return self.rope[SWA if self.cfg.kind(layer) == SWA else "compressed"]

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cache: KVCache, all_logits: bool = False,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """tokens [B, S] (positions ``cache.pos ..``) -> logits [B, V] of the last position, or [B, S, V]
        with ``all_logits``; with ``return_hidden`` also the final streams [B, S, hc, dim]. Advances the cache."""
        cfg = self.cfg
        b, s, p0, ids = self._begin(tokens, cache)
        x = self._embed(ids).unsqueeze(1).repeat(1, cfg.hc_mult, 1)  # [T, hc, dim]
        for i, blk in enumerate(self.layers):
            x = blk(self.ops, x, b, ids, cache.layers[i], p0, self._rope(i))
        cache.pos = p0 + s
        logits = self._logits(x, b, s, self.hc_head, self.norm, all_logits)
        return (logits, x.view(b, s, cfg.hc_mult, cfg.dim)) if return_hidden else logits

    def _begin(self, tokens: Tensor, cache: KVCache) -> tuple[int, int, int, Tensor]:
        """The checks and values every forward starts with: (B, S, the first position, flat token ids)."""
        b, s = tokens.shape
        if b != cache.batch:
            raise ValueError(f"forward: batch {b} but the cache holds {cache.batch} sequences")
        cache.check_room(s)
        return b, s, cache.pos, tokens.reshape(-1).to(self.device)

    @torch.inference_mode()
    def forward_ragged(self, tokens: list[Tensor], caches: list[KVCache]) -> Tensor:
        """One step over sequences at independent positions (continuous batching, see ragged.py):
        ``tokens[i]`` (1-D, length >= 1: one decode token or a prefill chunk) continues the one-sequence
        cache ``caches[i]`` (a ``KVPool`` slot view) at its own position. Returns the fp32 logits of each
        sequence's last token [n, V] and advances each cache; each sequence gets what ``forward`` on it
        alone gives (up to the summation order of batched kernels)."""
        rb = RaggedBatch(tokens, caches, self.device)
        x = self._embed(rb.ids).unsqueeze(1).repeat(1, self.cfg.hc_mult, 1)  # [T, hc, dim]
        for i, blk in enumerate(self.layers):
            x = blk(self.ops, x, 1, rb.ids, rb.layer(i), 0, self._rope(i))
        rb.advance()
        return self._logits(x[rb.last], len(caches), 1, self.hc_head, self.norm, False)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.embed[ids] if self._tp is None else self._tp.embed(self.embed, ids, self.cfg.vocab_size)

    def _logits(self, x: Tensor, b: int, s: int, hc, norm: Tensor, all_logits: bool) -> Tensor:
        y = rms_norm(hc_head(x, hc, self.cfg.hc_eps, self.cfg.norm_eps), norm, self.cfg.norm_eps)
        y = y.view(b, s, -1)
        return self._head_logits(y if all_logits else y[:, -1])

    def _head_logits(self, y: Tensor) -> Tensor:
        """fp32 logits of the normed hidden states ``y`` (all vocabulary columns, gathered under TP)."""
        logits = self.head(y)
        return logits if self._tp is None else self._tp.gather_vocab(logits, self.cfg.vocab_size)

    @torch.inference_mode()
    def forward_mtp(self, hidden: Tensor, next_tokens: Tensor, cache: KVCache, p0: int,
                    all_logits: bool = False) -> Tensor:
        """MTP block 0: hidden streams [B, S, hc, dim] of positions p0.. and the tokens that follow them
        [B, S] -> logits of the token after those (not used by generation, as in the reference)."""
        if not self.mtp:
            raise ValueError("forward_mtp: the model was built without its MTP block (mtp=False)")
        blk = self.mtp[0]
        b, s = next_tokens.shape
        ids = next_tokens.reshape(-1).to(self.device)
        x = blk.inputs(self.ops, hidden.reshape(b * s, self.cfg.hc_mult, -1), self._embed(ids))
        x = blk(self.ops, x, b, ids, cache.mtp_layers[0], p0, self._rope(self.cfg.n_layers))
        return self._logits(x, b, s, blk.hc_head, blk.norm, all_logits)
