"""Every tensor of a checkpoint in the released format (spec 1.4 and the S4 listings), from a ModelConfig.

Names follow the official checkpoints: ``embed.weight``, ``layers.L.attn.wq_a.weight`` + ``.scale``,
``layers.L.ffn.experts.E.w1.weight`` (FP4: I8 ``[out, in/2]`` + F8_E8M0 ``[out, in/32]``), ``mtp.0.*``...
For Flash the schema has 69,187 tensors and for Pro 145,116, as the real checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .config import CSA, SWA, ModelConfig

__all__ = ["TensorSpec", "checkpoint_schema", "layer_prefix", "FP8", "E8M0", "I8", "BF16", "F32", "I64", "I32"]

FP8, E8M0, I8, BF16, F32, I64, I32 = "F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64", "I32"


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: name, shape and the accepted safetensors dtypes (first = the written one)."""

    name: str
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]

    @property
    def dtype(self) -> str:
        return self.dtypes[0]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layer_prefix(cfg: ModelConfig, layer: int) -> str:
    """``layers.L`` for a main layer, ``mtp.i`` for MTP block i (layer index ``n_layers + i``)."""
    return f"layers.{layer}" if layer < cfg.n_layers else f"mtp.{layer - cfg.n_layers}"


def _fp8(name: str, out: int, inp: int, scale: str = E8M0, block: int = 128) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{name}.weight", (out, inp), (FP8,))
    yield TensorSpec(f"{name}.scale", (_cdiv(out, block), _cdiv(inp, block)), (scale,))


def _fp4(name: str, out: int, inp: int) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{name}.weight", (out, inp // 2), (I8,))
    yield TensorSpec(f"{name}.scale", (out, inp // 32), (E8M0,))


def _compressor(p: str, cfg: ModelConfig, ratio: int, d: int) -> Iterator[TensorSpec]:
    coff = 2 if ratio == 4 else 1
    yield TensorSpec(f"{p}.ape", (ratio, coff * d), (F32,))
    yield TensorSpec(f"{p}.wkv.weight", (coff * d, cfg.dim), (BF16,))
    yield TensorSpec(f"{p}.wgate.weight", (coff * d, cfg.dim), (BF16,))
    yield TensorSpec(f"{p}.norm.weight", (d,), (BF16,))


def _attention(p: str, cfg: ModelConfig, layer: int) -> Iterator[TensorSpec]:
    h, hd = cfg.n_heads, cfg.head_dim
    yield TensorSpec(f"{p}.attn_sink", (h,), (F32,))
    yield from _fp8(f"{p}.wq_a", cfg.q_lora_rank, cfg.dim)
    yield TensorSpec(f"{p}.q_norm.weight", (cfg.q_lora_rank,), (BF16,))
    yield from _fp8(f"{p}.wq_b", h * hd, cfg.q_lora_rank)
    yield from _fp8(f"{p}.wkv", hd, cfg.dim)
    yield TensorSpec(f"{p}.kv_norm.weight", (hd,), (BF16,))
    yield from _fp8(f"{p}.wo_a", cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups)
    yield from _fp8(f"{p}.wo_b", cfg.dim, cfg.o_groups * cfg.o_lora_rank)
    ratio = cfg.ratio(layer)
    if cfg.kind(layer) == SWA:
        return
    yield from _compressor(f"{p}.compressor", cfg, ratio, hd)
    if cfg.kind(layer) == CSA:
        ih = cfg.index_n_heads
        yield from _fp8(f"{p}.indexer.wq_b", ih * cfg.index_head_dim, cfg.q_lora_rank)
        yield TensorSpec(f"{p}.indexer.weights_proj.weight", (ih, cfg.dim), (BF16,))
        yield from _compressor(f"{p}.indexer.compressor", cfg, ratio, cfg.index_head_dim)


def _moe(p: str, cfg: ModelConfig, layer: int) -> Iterator[TensorSpec]:
    e, dim, inter = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    yield TensorSpec(f"{p}.gate.weight", (e, dim), (BF16,))
    if cfg.is_hash(layer):
        yield TensorSpec(f"{p}.gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), (I64, I32))
    else:
        yield TensorSpec(f"{p}.gate.bias", (e,), (F32,))
    for i in range(e):
        q = f"{p}.experts.{i}"
        if cfg.expert_dtype == "fp4":
            yield from _fp4(f"{q}.w1", inter, dim)
            yield from _fp4(f"{q}.w2", dim, inter)
            yield from _fp4(f"{q}.w3", inter, dim)
        else:  # the -Base checkpoints: FP8 experts with float32 block scales
            yield from _fp8(f"{q}.w1", inter, dim, F32)
            yield from _fp8(f"{q}.w2", dim, inter, F32)
            yield from _fp8(f"{q}.w3", inter, dim, F32)
    if cfg.n_shared_experts:
        yield from _fp8(f"{p}.shared_experts.w1", inter, dim)
        yield from _fp8(f"{p}.shared_experts.w2", dim, inter)
        yield from _fp8(f"{p}.shared_experts.w3", inter, dim)


def _hc(p: str, cfg: ModelConfig, sub: str) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{p}.hc_{sub}_fn", (cfg.mix_hc, cfg.hc_mult * cfg.dim), (F32,))
    yield TensorSpec(f"{p}.hc_{sub}_base", (cfg.mix_hc,), (F32,))
    yield TensorSpec(f"{p}.hc_{sub}_scale", (3,), (F32,))


def _head(p: str, cfg: ModelConfig) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{p}hc_head_fn", (cfg.hc_mult, cfg.hc_mult * cfg.dim), (F32,))
    yield TensorSpec(f"{p}hc_head_base", (cfg.hc_mult,), (F32,))
    yield TensorSpec(f"{p}hc_head_scale", (1,), (F32,))


def block_schema(cfg: ModelConfig, layer: int) -> Iterator[TensorSpec]:
    """Tensors of one block (a main layer, or an MTP block when ``layer >= n_layers``)."""
    p = layer_prefix(cfg, layer)
    yield from _attention(f"{p}.attn", cfg, layer)
    yield TensorSpec(f"{p}.attn_norm.weight", (cfg.dim,), (BF16,))
    yield from _moe(f"{p}.ffn", cfg, layer)
    yield TensorSpec(f"{p}.ffn_norm.weight", (cfg.dim,), (BF16,))
    yield from _hc(p, cfg, "attn")
    yield from _hc(p, cfg, "ffn")
    if layer >= cfg.n_layers:
        yield from _fp8(f"{p}.e_proj", cfg.dim, cfg.dim)
        yield from _fp8(f"{p}.h_proj", cfg.dim, cfg.dim)
        for n in ("enorm", "hnorm", "norm"):
            yield TensorSpec(f"{p}.{n}.weight", (cfg.dim,), (BF16,))
        yield from _head(f"{p}.", cfg)


def checkpoint_schema(cfg: ModelConfig, mtp: bool = True, fp8_wo_a: bool = False) -> dict[str, TensorSpec]:
    """name -> TensorSpec of every tensor of the checkpoint, in a stable order (top level, layers, MTP)."""
    if cfg.is_v41:
        from .schema_v41 import checkpoint_schema_v41
        return checkpoint_schema_v41(cfg, mtp, fp8_wo_a)
    specs = [TensorSpec("embed.weight", (cfg.vocab_size, cfg.dim), (BF16,)),
             TensorSpec("head.weight", (cfg.vocab_size, cfg.dim), (BF16,)),
             TensorSpec("norm.weight", (cfg.dim,), (BF16,)), *_head("", cfg)]
    for layer in range(cfg.n_layers + (cfg.n_mtp_layers if mtp else 0)):
        specs.extend(block_schema(cfg, layer))
    return {s.name: s for s in specs}
