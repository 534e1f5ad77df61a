"""The DeepSeek-V4.1 text model (official ``Transformer.forward``): embedding -> hc_mult streams -> per layer
(Engram, then the single-pass mHC block) -> collapse with the last block's ``pre`` -> norm -> head (fp32 logits).

``Transformer(cfg, ...)`` builds this class for a V4.1 config; it has the V4 model's interface
(``forward``, ``forward_ragged``, ``new_cache``, ``load_order``), so generation, ``dsv4rt run`` and
``serve`` drive both.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .block_v41 import Block41
from .cache_v41 import KVCache41
from .config import ModelConfig
from .engram import token_classes
from .functional import rms_norm
from .head import OutputHead
from .indexer_v41 import Shared41
from .mhc import hc_collapse
from .opcall import OpCaller
from .rope import rope_tables
from .transformer import Transformer
from .weights import Loader, WeightSource

__all__ = ["Transformer41"]


class Transformer41(Transformer):
    """See :class:`dsv4rt.model.transformer.Transformer` for the arguments (``convert_fp4`` is V4's); the loading
    order, RoPE tables, embedding and vocabulary head are the V4 model's."""

    def __init__(self, cfg: ModelConfig, source: WeightSource, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16, mtp: bool = False, convert_fp4: bool = False,
                 quant: bool = True, par: Any = None, precision: str = "release") -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.par = par
        self._tp = par if par is not None and par.tp > 1 else None
        ld = Loader(source, self.device, dtype, convert_fp4=convert_fp4, par=par, block=cfg.fp8_block)
        self.embed = ld.act("embed.weight", tp_dim=0)
        self.layers = [Block41(cfg, i, ld) for i in range(cfg.n_layers)]
        self.norm = ld.f32("norm.weight")
        self.head = OutputHead(ld, "head.weight", tp_dim=0)
        self.mtp = [Block41(cfg, cfg.n_layers + i, ld) for i in range(cfg.n_mtp_layers if mtp else 0)]
        self.classes = token_classes(cfg, source, self.device) if cfg.engram_layer_ids else None
        self.pad_class = int(self.classes[cfg.engram_pad_id]) if self.classes is not None else 0
        self.rope = rope_tables(cfg, self.device)
        self.ops = OpCaller(quant, precision)

    @property
    def ops(self) -> OpCaller:
        return self._ops

    @ops.setter
    def ops(self, caller: OpCaller) -> None:
        """Any op caller (``run --check`` swaps in reference / audit callers) calls the GEMMs with V4.1's blocks."""
        caller.fp8_block = self.cfg.fp8_block
        self._ops = caller

    def new_cache(self, batch: int = 1, max_seq_len: int | None = None) -> KVCache41:  # type: ignore[override]
        """An empty V4.1 cache (packed formats unless the model runs without quantisation)."""
        return self._fit_rope(KVCache41(self.cfg, batch, max_seq_len, self.dtype, self.device, mtp=bool(self.mtp),
                                        quant=self.ops.quant))

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cache: KVCache41, all_logits: bool = False,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """tokens [B, S] (positions ``cache.pos ..``) -> fp32 logits [B, V] of the last position, or [B, S, V]
        with ``all_logits``; with ``return_hidden`` also the final streams [B, S, hc, dim]. Advances the cache."""
        cfg = self.cfg
        if not isinstance(cache, KVCache41):
            raise TypeError("forward: a V4.1 model needs its own cache (model.new_cache())")
        b, s, p0, ids = self._begin(tokens, cache)
        if self.classes is not None:
            cache.engram_hist[:, p0:p0 + s] = self.classes[ids].view(b, s).to(torch.int32)
        x = self._embed(ids).unsqueeze(1).repeat(1, cfg.hc_mult, 1)  # [T, hc, dim]
        pre = torch.zeros((b * s, cfg.hc_mult), dtype=torch.float32, device=self.device)
        pre[:, 0] = 1.0   # the first block collapses onto stream 0 (make_identity_pre_mix)
        shared = Shared41()
        for i, blk in enumerate(self.layers):
            if blk.engram is not None:
                x = blk.engram(self.ops, x, cache.engram_hist, p0, self.pad_class)
            x, pre = blk(self.ops, x, b, ids, cache.layers[i], p0, self._rope(i), pre, shared)
        cache.pos = p0 + s
        y = rms_norm(hc_collapse(x, pre), self.norm, cfg.norm_eps).view(b, s, -1)
        logits = self._head_logits(y if all_logits else y[:, -1])
        return (logits, x.view(b, s, cfg.hc_mult, cfg.dim)) if return_hidden else logits

    @torch.inference_mode()
    def forward_ragged(self, tokens: list[Tensor], caches: list[KVCache41]) -> Tensor:
        """One step over sequences at independent positions: each sequence runs alone on its own cache
        (a V4.1 step is per sequence; batched ragged kernels are V4's). Returns [n, V] fp32 logits."""
        return torch.cat([self.forward(t.view(1, -1).to(self.device), c) for t, c in zip(tokens, caches)])

