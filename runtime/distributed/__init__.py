"""Multi-device DeepSeek-V4 on torch.distributed: expert-parallel MoE and tensor-parallel attention.

    torchrun --nproc-per-node 4 -m dsv4rt run --tp 4 --ep 4 ...      (see README.md in this folder)

Modules: ``layout`` (Parallel: who owns which heads / vocabulary rows / experts, the process groups and
the collectives the model calls), ``ep`` (``ep_dispatch`` / ``ep_combine``: the all-to-all form of
``moe_dispatch`` / ``moe_combine``), ``moe`` (the expert-parallel MoE forward), ``tp`` (vocab-parallel
embedding and head, the tensor-parallel indexer), ``launch`` (torchrun environment, backend per device,
layout description). Nothing heavy is imported until an attribute is used.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "Parallel": "layout", "split_range": "layout", "default_layout": "layout", "check_layout": "layout",
    "EPHandle": "ep", "ep_dispatch": "ep", "ep_combine": "ep",
    "ep_moe_forward": "moe", "gather_rows": "moe",
    "vocab_parallel_embed": "tp", "gather_vocab": "tp", "indexer_topk": "tp", "topk_from_scores": "tp",
    "indexer_partial_scores": "tp", "indexer_scores": "tp", "engram_parallel_lookup": "tp",
    "backend_for_device": "launch", "init_from_env": "launch", "world_from_env": "launch", "shutdown": "launch",
    "describe": "launch",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
