"""KV-cache bytes of a DeepSeek-V4.1 model (spec deepseek-v41.md 2.2(d)): the released per-token figure and
what dsv4rt's own cache really allocates (measured from ``KVCache41``'s tensors, on the meta device).

Global cache per token: every kv source layer stores one FP4 entry (288 B at D = 512) and one MXFP4 index key
(68 B at d = 128) per ``ratio`` tokens: V4.1-Flash's 3 ratio-2 and 1 ratio-1 sources give 534 + 356 = 890 B.
Per sequence, independent of the context once it passes the window: an FP8 window ring of ``window_size`` rows
(528 B) in every layer, DSpark blocks included, and the fp32 state of the ratio-2 compressors.
"""
from __future__ import annotations

import torch

from .cache_v41 import KVCache41, kv_row_bytes
from .config import SWA, ModelConfig

__all__ = ["global_bytes_per_token", "format_report_v41"]


def _index_key_bytes(cfg: ModelConfig) -> int:
    return cfg.index_head_dim // 2 + cfg.index_head_dim // 32


def global_bytes_per_token(cfg: ModelConfig) -> float:
    """Bytes of global cache (FP4 entries + MXFP4 index keys) one token adds, over every kv source."""
    _, glob = kv_row_bytes(cfg.head_dim)
    return sum((glob + _index_key_bytes(cfg)) / cfg.ratio(i) for i in cfg.kv_source_layers)


def format_report_v41(cfg: ModelConfig, context: int) -> str:
    """What ``dsv4rt kv-cache`` prints for a V4.1 config."""
    win_b, glob_b = kv_row_bytes(cfg.head_dim)
    idx_b = _index_key_bytes(cfg)
    mib, gib = float(1 << 20), float(1 << 30)
    layers = cfg.n_layers + cfg.n_mtp_layers
    window = layers * min(cfg.window_size, context) * win_b
    entries = sum(context // cfg.ratio(i) for i in cfg.kv_source_layers)
    glob = sum((context // cfg.ratio(i)) * glob_b for i in cfg.kv_source_layers)
    keys = entries * idx_b
    state = sum(2 * cfg.ratio(i) * cfg.head_dim * 4 for i in cfg.kv_source_layers if cfg.ratio(i) > 1)
    kinds = cfg.layer_kinds()
    lines = [f"DeepSeek-V4.1 {cfg.name}: {cfg.n_layers} layers ({len(kinds) - kinds.count(SWA)} compressed, "
             f"{len(cfg.kv_source_layers)} of them kv sources {list(cfg.kv_source_layers)}, {kinds.count(SWA)} window "
             f"only) + {cfg.n_mtp_layers} DSpark, context {context:,} tokens",
             f"row bytes: window {win_b} B (FP8 E4M3 + UE8M0 per 32), global entry {glob_b} B (FP4 E2M1 + E4M3 per "
             f"16), index key {idx_b} B (MXFP4)",
             f"global cache per token: {global_bytes_per_token(cfg):.1f} B (entries + index keys of every kv source)",
             f"  {'windows (' + str(layers) + ' x ' + str(min(cfg.window_size, context)) + ' tokens)':<32}"
             f"{window / mib:14.2f} MiB",
             f"  {'global entries':<32}{glob / mib:14.2f} MiB",
             f"  {'index keys':<32}{keys / mib:14.2f} MiB",
             f"KV cache per sequence: {(window + glob + keys) / gib:.3f} GiB ({window + glob + keys:,} bytes), plus "
             f"compressor state {state / 1024:.1f} KiB (fp32)"]
    if context:
        cache = KVCache41(cfg, 1, context, torch.bfloat16, "meta", mtp=cfg.n_mtp_layers > 0)
        alloc = cache.nbytes()
        hist = cache.engram_hist.numel() * cache.engram_hist.element_size()
        lines.append(f"dsv4rt allocates per sequence (its cache's tensors: packed rows, whole window rings, "
                     f"compressor state, Engram token history {hist / mib:.2f} MiB): {alloc / gib:.3f} GiB "
                     f"({alloc:,} bytes)")
    return "\n".join(lines)
