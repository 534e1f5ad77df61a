"""KV-cache bytes per sequence from the layer schedule (docs/deepseek-v4.md section 8).

Per layer: a ``window_size``-token window of ``head_dim`` entries in every layer; ``S // ratio``
compressed entries in CSA / HCA layers; ``S // 4`` indexer keys of ``index_head_dim`` in CSA layers.
Entry sizes by format: ``bf16`` is the reference layout (2 bytes per value: 1024 B main, 256 B indexer);
``fp8`` is the vLLM / production layout (584 B main = 448 E4M3 + 128 B BF16 rope + 8 B scales) with an
FP8 indexer (132 B) or, with ``indexer="fp4"``, an MXFP4 one (68 B). Compressor state (fp32, constant in
S) and the MTP layer are reported separately, as the published 9.62 GiB figure excludes them.

``allocated_bytes`` is what dsv4rt's own cache (``KVCache``, one ``KVPool`` slot) allocates per sequence:
the whole ring of ``window_size`` rows whatever the context, ``max_seq_len // ratio`` entry rows and indexer
keys in the activation dtype, the fp32 compressor state, and the MTP layer when the model loads it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import CSA, SWA, ModelConfig

__all__ = ["KVBreakdown", "kv_cache_bytes", "entry_bytes", "format_report", "allocated_bytes"]


def entry_bytes(cfg: ModelConfig, fmt: str, indexer: str | None = None) -> tuple[int, int]:
    """(main entry bytes, indexer key bytes) for a format."""
    if fmt == "bf16":
        main = 2 * cfg.head_dim
    elif fmt == "fp8":
        nope = cfg.head_dim - cfg.rope_head_dim
        main = nope + 2 * cfg.rope_head_dim + (nope // 64 + 1)
    else:
        raise ValueError(f"kv-cache format {fmt!r}: expected bf16 or fp8")
    ind = indexer or fmt
    ihd = cfg.index_head_dim
    idx = {"bf16": 2 * ihd, "fp8": ihd + 4, "fp4": ihd // 2 + 4}.get(ind)
    if idx is None:
        raise ValueError(f"indexer format {ind!r}: expected bf16, fp8 or fp4")
    return main, idx


@dataclass
class KVBreakdown:
    context: int
    fmt: str
    window: int
    compressed: int
    indexer: int
    compressor_state: int
    mtp_window: int
    layers: dict[str, int]

    @property
    def total(self) -> int:
        """The published accounting: windows + compressed entries + indexer keys (no state, no MTP)."""
        return self.window + self.compressed + self.indexer


def kv_cache_bytes(cfg: ModelConfig, context: int, fmt: str = "bf16", indexer: str | None = None) -> KVBreakdown:
    """Bytes per sequence at ``context`` tokens for ``cfg``'s layer schedule."""
    main, idx = entry_bytes(cfg, fmt, indexer)
    win = comp = ind = state = 0
    kinds = {SWA: 0, CSA: 0, "hca": 0}
    for layer in range(cfg.n_layers):
        kind, ratio = cfg.kind(layer), cfg.ratio(layer)
        kinds[kind] += 1
        win += min(cfg.window_size, context) * main
        if kind == SWA:
            continue
        comp += (context // ratio) * main
        coff = 2 if ratio == 4 else 1
        state += 2 * coff * ratio * coff * cfg.head_dim * 4       # kv + score, fp32 (spec 8.1)
        if kind == CSA:
            ind += (context // ratio) * idx
            state += 2 * 2 * ratio * 2 * cfg.index_head_dim * 4
    mtp = cfg.n_mtp_layers * min(cfg.window_size, context) * main
    return KVBreakdown(context, fmt, win, comp, ind, state, mtp, kinds)


def _layer_allocated(cfg: ModelConfig, layer: int, max_seq_len: int, act_bytes: int) -> int:
    kind, ratio = cfg.kind(layer), cfg.ratio(layer)
    cap = max_seq_len // ratio if ratio else 0
    n = (cfg.window_size + cap) * cfg.head_dim * act_bytes
    if kind == SWA:
        return n
    overlap = ratio == 4
    n += (4 if overlap else 2) * ratio * (2 if overlap else 1) * cfg.head_dim * 4     # CompressorState, fp32
    if kind == CSA:
        n += cap * cfg.index_head_dim * act_bytes + 4 * ratio * 2 * cfg.index_head_dim * 4
    return n


def allocated_bytes(cfg: ModelConfig, max_seq_len: int, act_bytes: int = 2, mtp: bool = False) -> int:
    """Bytes dsv4rt's cache allocates per sequence of up to ``max_seq_len`` tokens (module docstring)."""
    layers = range(cfg.n_layers + (cfg.n_mtp_layers if mtp else 0))
    return sum(_layer_allocated(cfg, i, max_seq_len, act_bytes) for i in layers)


def format_report(cfg: ModelConfig, context: int, fmt: str = "bf16", indexer: str | None = None) -> str:
    """What ``dsv4rt kv-cache`` prints."""
    r = kv_cache_bytes(cfg, context, fmt, indexer)
    main, idx = entry_bytes(cfg, fmt, indexer)
    gib, mib, k = float(1 << 30), float(1 << 20), r.layers
    rows = ((f"windows ({cfg.n_layers} x {min(cfg.window_size, context)} tokens)", r.window),
            ("compressed entries", r.compressed), ("indexer keys", r.indexer))
    lines = [f"DeepSeek-V4 {cfg.name}: {cfg.n_layers} layers ({k[CSA]} CSA, {k['hca']} HCA, {k[SWA]} SWA), "
             f"context {context:,} tokens",
             f"entry bytes: main {main} B ({fmt}), indexer key {idx} B ({indexer or fmt})"]
    lines += [f"  {label:<32}{n / mib:14.2f} MiB" for label, n in rows]
    lines.append(f"KV cache per sequence: {r.total / gib:.2f} GiB ({r.total:,} bytes)")
    lines.append(f"not counted above: compressor state {r.compressor_state / mib:.2f} MiB (fp32), "
                 f"MTP window {r.mtp_window / mib:.2f} MiB")
    if fmt == "bf16":
        alloc = allocated_bytes(cfg, context)
        lines.append(f"dsv4rt allocates per sequence (KVPool slot, bf16, whole window ring, compressor state, "
                     f"no MTP): {alloc / gib:.2f} GiB ({alloc:,} bytes)")
    return "\n".join(lines)
