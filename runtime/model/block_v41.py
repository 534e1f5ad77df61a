"""A DeepSeek-V4.1 block with single-pass (lagged) mHC (official ``Block.forward``; spec deepseek-v41.md e):

``a_pre, a_post, a_comb = split(X)``; ``X' = hc_post(attn(attn_norm(collapse(X, pre_in))), X, a_post, a_comb)``;
``f_pre, f_post, f_comb = split(X')``; ``X'' = hc_post(ffn(ffn_norm(collapse(X', a_pre))), X', f_post, f_comb)``;
the block returns ``(X'', f_pre)``: each sub-layer collapses the streams with the ``pre`` of the sub-layer before
it (the first block gets stream 0, the head the last block's ``f_pre``). An Engram layer first adds its gated
n-gram value to the streams.
"""
from __future__ import annotations

from torch import Tensor

from .attention_v41 import Attention41
from .block import load_hc
from .cache_v41 import LayerCache41
from .config import ModelConfig
from .engram import Engram
from .functional import rms_norm
from .indexer_v41 import Shared41
from .mhc import hc_collapse, hc_post, hc_split
from .moe import MoE
from .opcall import OpCaller
from .rope import RopeTable
from .schema import layer_prefix
from .weights import Loader

__all__ = ["Block41"]


class Block41:
    """Layer ``layer`` of a V4.1 model (or DSpark block ``layer - n_layers``: its tensors load; drafting is not
    run, as generation in the reference does not run it)."""

    def __init__(self, cfg: ModelConfig, layer: int, ld: Loader) -> None:
        p = layer_prefix(cfg, layer)
        self.cfg, self.layer = cfg, layer
        self.attn = Attention41(cfg, layer, ld, f"{p}.attn")
        self.attn_norm = ld.f32(f"{p}.attn_norm.weight")
        self.ffn = MoE(cfg, layer, ld, f"{p}.ffn")
        self.ffn_norm = ld.f32(f"{p}.ffn_norm.weight")
        self.hc_attn = load_hc(ld, f"{p}.hc_attn")
        self.hc_ffn = load_hc(ld, f"{p}.hc_ffn")
        self.engram = Engram(cfg, layer, ld, f"{p}.engram") if layer in cfg.engram_layer_ids else None
        self.extra = {}
        if layer >= cfg.n_layers:    # DSpark stage tensors (main_proj / heads), loaded for completeness
            stage = layer - cfg.n_layers
            if stage == 0:
                self.extra["main_proj"] = ld.fp8(f"{p}.main_proj")
                self.extra["main_norm"] = ld.f32(f"{p}.main_norm.weight")
            if stage == cfg.n_mtp_layers - 1:
                for n in ("norm", "markov_head.embed", "markov_head.head", "confidence_head.proj"):
                    self.extra[n] = ld.f32(f"{p}.{n}.weight")

    def __call__(self, ops: OpCaller, x: Tensor, batch: int, token_ids: Tensor, lc: LayerCache41, p0: int,
                 rope: RopeTable, pre_in: Tensor, shared: Shared41) -> tuple[Tensor, Tensor]:
        """x [T, hc, dim] (T = batch * S tokens at positions p0..), pre_in [T, hc] -> (x'' [T, hc, dim], f_pre)."""
        c = self.cfg
        t, _, dim = x.shape
        a_pre, a_post, a_comb = hc_split(x, self.hc_attn, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps)
        u = rms_norm(hc_collapse(x, pre_in), self.attn_norm, c.norm_eps)
        a = self.attn(ops, u.view(batch, t // batch, dim), lc, p0, rope, shared)
        x = hc_post(a.view(t, dim), x, a_post, a_comb)
        f_pre, f_post, f_comb = hc_split(x, self.hc_ffn, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps)
        u = rms_norm(hc_collapse(x, a_pre), self.ffn_norm, c.norm_eps)
        f = self.ffn(ops, u, token_ids)
        return hc_post(f, x, f_post, f_comb), f_pre
