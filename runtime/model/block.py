"""One transformer block (spec 9.2): ``hc_pre -> attn_norm -> attention -> hc_post -> hc_pre -> ffn_norm ->
MoE -> hc_post``, and the MTP block that wraps it (spec 7: ``e_proj(enorm(embed)) + h_proj(hnorm(X))``,
its own head merge and norm)."""
from __future__ import annotations

from torch import Tensor

from .attention import Attention
from .cache import LayerCache
from .config import ModelConfig
from .functional import rms_norm
from .mhc import HcParams, hc_post, hc_pre
from .moe import MoE
from .opcall import OpCaller
from .ragged import RaggedLayer
from .rope import RopeTable
from .schema import layer_prefix
from .weights import Loader

__all__ = ["Block", "MTPBlock", "load_hc"]


def load_hc(ld: Loader, prefix: str) -> HcParams:
    """``<prefix>_fn``, ``<prefix>_base``, ``<prefix>_scale`` as float32."""
    return HcParams(ld.f32(f"{prefix}_fn"), ld.f32(f"{prefix}_base"), ld.f32(f"{prefix}_scale"))


class Block:
    """Layer ``layer`` of the model (or MTP block ``layer - n_layers``)."""

    def __init__(self, cfg: ModelConfig, layer: int, ld: Loader) -> None:
        p = layer_prefix(cfg, layer)
        self.cfg, self.layer = cfg, layer
        self.attn = Attention(cfg, layer, ld, f"{p}.attn")
        self.attn_norm = ld.f32(f"{p}.attn_norm.weight")
        self.ffn = MoE(cfg, layer, ld, f"{p}.ffn")
        self.ffn_norm = ld.f32(f"{p}.ffn_norm.weight")
        self.hc_attn = load_hc(ld, f"{p}.hc_attn")
        self.hc_ffn = load_hc(ld, f"{p}.hc_ffn")

    def __call__(self, ops: OpCaller, x: Tensor, batch: int, token_ids: Tensor, lc: LayerCache | RaggedLayer,
                 p0: int, rope: RopeTable) -> Tensor:
        """x [T, hc, dim] (T = batch * S tokens of a lockstep batch, ``lc`` its layer cache; or a ragged step,
        ``lc`` a RaggedLayer, ``batch`` and ``p0`` unused) -> [T, hc, dim]."""
        c = self.cfg
        t, _, dim = x.shape
        u, post, comb = hc_pre(x, self.hc_attn, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps)
        u = rms_norm(u, self.attn_norm, c.norm_eps)
        if isinstance(lc, RaggedLayer):
            a = self.attn.ragged(ops, u, lc, rope)
        else:
            a = self.attn(ops, u.view(batch, t // batch, dim), lc, p0, rope)
        x = hc_post(a.view(t, dim), x, post, comb)
        u, post, comb = hc_pre(x, self.hc_ffn, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps)
        f = self.ffn(ops, rms_norm(u, self.ffn_norm, c.norm_eps), token_ids)
        return hc_post(f, x, post, comb)


class MTPBlock(Block):
    """The multi-token-prediction block ``mtp.i`` (not used by generation, like the reference)."""

    def __init__(self, cfg: ModelConfig, layer: int, ld: Loader) -> None:
        super().__init__(cfg, layer, ld)
        p = layer_prefix(cfg, layer)
        self.e_proj = ld.fp8(f"{p}.e_proj")
        self.h_proj = ld.fp8(f"{p}.h_proj")
        self.enorm = ld.f32(f"{p}.enorm.weight")
        self.hnorm = ld.f32(f"{p}.hnorm.weight")
        self.norm = ld.f32(f"{p}.norm.weight")
        self.hc_head = load_hc(ld, f"{p}.hc_head")

    def inputs(self, ops: OpCaller, x: Tensor, emb: Tensor) -> Tensor:
        """``e_proj(enorm(e))`` broadcast over the streams plus ``h_proj(hnorm(X))`` per stream."""
        t, hc, dim = x.shape
        e = self.e_proj(ops, rms_norm(emb, self.enorm, self.cfg.norm_eps))
        h = self.h_proj(ops, rms_norm(x, self.hnorm, self.cfg.norm_eps).reshape(t * hc, dim)).view(t, hc, dim)
        return (e.unsqueeze(1).float() + h.float()).to(x.dtype)
