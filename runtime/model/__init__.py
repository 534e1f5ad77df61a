"""The DeepSeek-V4 model on the dsv4rt registry (design.md section 7).

    from dsv4rt.model import Checkpoint, Transformer, generate, tiny_checkpoint
    ck = Checkpoint(tiny_checkpoint())                 # or a released checkpoint directory
    model = Transformer(ck.cfg, ck, device="cpu")
    res = generate(model, [[0, 75, 108]], max_new_tokens=8)

Modules: ``config`` (ModelConfig, readers, presets), ``schema`` (checkpoint tensor list), ``checkpoint`` /
``shard`` (one safetensors file through the library), ``synthetic`` (seeded weights), ``rope``, ``mhc``,
``functional``, ``compressor``, ``indexer``, ``attention``, ``moe``, ``block``, ``transformer``, ``cache``,
``generate``, ``tokenizer``, ``kvsize`` (KV-cache accounting), ``runner`` (``dsv4rt run``). Nothing heavy
is imported until an attribute is used.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "ModelConfig": "config", "preset": "config", "load_config": "config", "PRESETS": "config",
    "checkpoint_schema": "schema", "TensorSpec": "schema",
    "Checkpoint": "checkpoint", "write_checkpoint": "checkpoint",
    "SyntheticSource": "synthetic", "tiny_checkpoint": "synthetic",
    "Transformer": "transformer", "KVCache": "cache",
    "generate": "generate", "GenerationResult": "generate",
    "ByteTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "kv_cache_bytes": "kvsize",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
