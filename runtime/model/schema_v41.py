"""Every tensor of a DeepSeek-V4.1 checkpoint, from a ModelConfig (spec deepseek-v41.md 2.2 and 3.3).

Names are the official ``inference/model.py`` module names, with no ``model.`` prefix, as the release:
FP8 projections with 32x32 E8M0 block scales, the compressor (``wkv``, ``wgate`` for ratio 2, ``norm``) only at
kv source layers, the indexer's query side at index sources and its key side (``wk``, ``k_norm``) at key
owners (the kv sources), ``engram.*`` at the Engram layers, and the DSpark draft blocks ``mtp.i`` (window-only
attention, ``main_proj``/``main_norm`` at stage 0, ``norm``/``markov_head``/``confidence_head`` at the last).
No ``hc_head_*`` (single-pass mHC) and no hash-routing tables.
"""
from __future__ import annotations

from typing import Iterator

from .config import ModelConfig
from .schema import BF16, F32, TensorSpec, _fp4, _fp8, _hc, layer_prefix

__all__ = ["checkpoint_schema_v41", "block_schema_v41"]


def _lin(name: str, cfg: ModelConfig, out: int, inp: int) -> Iterator[TensorSpec]:
    yield from _fp8(name, out, inp, block=cfg.fp8_block)


def _attention(p: str, cfg: ModelConfig, layer: int, fp8_wo_a: bool) -> Iterator[TensorSpec]:
    h, hd, dim = cfg.n_heads, cfg.head_dim, cfg.dim
    yield TensorSpec(f"{p}.attn_sink", (h,), (F32,))
    yield from _lin(f"{p}.wq_a", cfg, cfg.q_lora_rank, dim)
    yield TensorSpec(f"{p}.q_norm.weight", (cfg.q_lora_rank,), (BF16,))
    yield from _lin(f"{p}.wq_b", cfg, h * hd, cfg.q_lora_rank)
    yield from _lin(f"{p}.wkv", cfg, hd, dim)
    yield TensorSpec(f"{p}.kv_norm.weight", (hd,), (BF16,))
    wo_a = (cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups)
    if fp8_wo_a:   # as the HF release may store it (the official convert.py dequantises it to bf16)
        yield from _lin(f"{p}.wo_a", cfg, *wo_a)
    else:
        yield TensorSpec(f"{p}.wo_a.weight", wo_a, (BF16, F32))
    yield from _lin(f"{p}.wo_b", cfg, dim, cfg.o_groups * cfg.o_lora_rank)
    if layer >= cfg.n_layers:
        return
    if layer in cfg.kv_source_layers:
        yield TensorSpec(f"{p}.compressor.wkv.weight", (hd, dim), (BF16, F32))
        if cfg.ratio(layer) > 1:
            yield TensorSpec(f"{p}.compressor.wgate.weight", (hd, dim), (BF16, F32))
        yield TensorSpec(f"{p}.compressor.norm.weight", (hd,), (BF16,))
    if layer in cfg.index_source_layers:
        ih, ihd = cfg.index_n_heads, cfg.index_head_dim
        yield from _lin(f"{p}.indexer.wq_b", cfg, ih * ihd, cfg.q_lora_rank)
        yield TensorSpec(f"{p}.indexer.weights_proj.weight", (ih, dim), (BF16,))
        if layer in cfg.kv_source_layers:
            yield TensorSpec(f"{p}.indexer.wk.weight", (ihd, hd), (BF16,))
            yield TensorSpec(f"{p}.indexer.k_norm.weight", (ihd,), (BF16,))


def _moe(p: str, cfg: ModelConfig, layer: int) -> Iterator[TensorSpec]:
    dspark = layer >= cfg.n_layers
    e = cfg.dspark_n_routed_experts or cfg.n_routed_experts if dspark else cfg.n_routed_experts
    dim, inter = cfg.dim, cfg.moe_inter_dim
    yield TensorSpec(f"{p}.gate.weight", (e, dim), (BF16,))
    yield TensorSpec(f"{p}.gate.bias", (e,), (F32,))
    yield TensorSpec(f"{p}.gate.bias_vl", (e,), (F32,))   # image-span routing bias (loaded, unused for text)
    for i in range(e):
        q = f"{p}.experts.{i}"
        yield from _fp4(f"{q}.w1", inter, dim)
        yield from _fp4(f"{q}.w2", dim, inter)
        yield from _fp4(f"{q}.w3", inter, dim)
    yield from _lin(f"{p}.shared_experts.w1", cfg, inter, dim)
    yield from _lin(f"{p}.shared_experts.w2", cfg, dim, inter)
    yield from _lin(f"{p}.shared_experts.w3", cfg, inter, dim)


def _engram(p: str, cfg: ModelConfig, layer: int) -> Iterator[TensorSpec]:
    rows = cfg.engram_num_embeddings[cfg.engram_layer_ids.index(layer)]
    d = cfg.engram_head_dim
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads * d
    yield TensorSpec(f"{p}.embed.weight", (rows, d), ("F8_E4M3",))
    yield TensorSpec(f"{p}.embed.scale", (rows, d // 32), ("F8_E8M0",))
    yield from _lin(f"{p}.wkv", cfg, cfg.dim * (cfg.hc_mult + 1), cols)
    yield TensorSpec(f"{p}.q_weight", (cfg.hc_mult, cfg.dim), (BF16, F32))
    yield TensorSpec(f"{p}.k_weight", (cfg.hc_mult, cfg.dim), (BF16, F32))


def _dspark(p: str, cfg: ModelConfig, stage: int) -> Iterator[TensorSpec]:
    dim, rank = cfg.dim, cfg.dspark_markov_rank
    if stage == 0:
        yield from _lin(f"{p}.main_proj", cfg, dim, dim * len(cfg.dspark_target_layer_ids))
        yield TensorSpec(f"{p}.main_norm.weight", (dim,), (BF16,))
    if stage == cfg.n_mtp_layers - 1:
        yield TensorSpec(f"{p}.norm.weight", (dim,), (BF16,))
        yield TensorSpec(f"{p}.markov_head.embed.weight", (cfg.vocab_size, rank), (BF16,))
        yield TensorSpec(f"{p}.markov_head.head.weight", (cfg.vocab_size, rank), (BF16,))
        yield TensorSpec(f"{p}.confidence_head.proj.weight", (1, dim + rank), (BF16, F32))


def block_schema_v41(cfg: ModelConfig, layer: int, fp8_wo_a: bool = False) -> Iterator[TensorSpec]:
    """Tensors of one V4.1 block (a backbone layer, or DSpark block ``layer - n_layers``)."""
    p = layer_prefix(cfg, layer)
    yield from _attention(f"{p}.attn", cfg, layer, fp8_wo_a)
    yield TensorSpec(f"{p}.attn_norm.weight", (cfg.dim,), (BF16,))
    yield from _moe(f"{p}.ffn", cfg, layer)
    yield TensorSpec(f"{p}.ffn_norm.weight", (cfg.dim,), (BF16,))
    yield from _hc(p, cfg, "attn")
    yield from _hc(p, cfg, "ffn")
    if layer in cfg.engram_layer_ids:
        yield from _engram(f"{p}.engram", cfg, layer)
    if layer >= cfg.n_layers:
        yield from _dspark(p, cfg, layer - cfg.n_layers)


def checkpoint_schema_v41(cfg: ModelConfig, mtp: bool = True, fp8_wo_a: bool = False) -> dict[str, TensorSpec]:
    """name -> TensorSpec of every text-model tensor of a V4.1 checkpoint (top level, layers, DSpark);
    ``fp8_wo_a``: the grouped output projection stored FP8 with 32x32 scales instead of bf16."""
    specs = [TensorSpec("embed.weight", (cfg.vocab_size, cfg.dim), (BF16,)),
             TensorSpec("head.weight", (cfg.vocab_size, cfg.dim), (BF16, F32)),
             TensorSpec("norm.weight", (cfg.dim,), (BF16,))]
    for layer in range(cfg.n_layers + (cfg.n_mtp_layers if mtp else 0)):
        specs.extend(block_schema_v41(cfg, layer, fp8_wo_a))
    return {s.name: s for s in specs}
