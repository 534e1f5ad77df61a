"""Starting a multi-process run under ``torchrun`` and describing its layout.

``torchrun --nproc-per-node N -m dsv4rt run ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`init_from_env` then initialises the default process group with the backend
that follows the device (:func:`backend_for_device`: nccl for cuda, hccl for npu, gloo for cpu) and puts
the rank on device ``LOCAL_RANK``. Nothing here runs at import time.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .layout import Parallel, split_range

__all__ = ["backend_for_device", "world_from_env", "init_from_env", "shutdown", "describe"]

_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def backend_for_device(device: torch.device | str) -> str:
    """The torch.distributed backend for a device type: nccl (cuda), hccl (npu, needs torch_npu), gloo (cpu)."""
    kind = device.split(":")[0] if isinstance(device, str) else device.type  # "npu" parses only with torch_npu
    if kind not in _BACKENDS:
        raise ValueError(f"no torch.distributed backend known for device type {kind!r} "
                         f"(known: {', '.join(f'{k} -> {v}' for k, v in _BACKENDS.items())})")
    return _BACKENDS[kind]


def world_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's variables; (1, 0, 0) outside torchrun."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: torch.device) -> torch.device:
    """Initialise the default process group from torchrun's variables (if not done yet); returns this
    rank's device (``cuda:LOCAL_RANK`` / ``npu:LOCAL_RANK``, or the CPU)."""
    import torch.distributed as dist

    world, rank, local = world_from_env()
    if device.type in ("cuda", "npu") and device.index is None:
        device = torch.device(device.type, local)
        getattr(torch, device.type).set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for_device(device), rank=rank, world_size=world)
    return device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def describe(par: Parallel | None, cfg: Any) -> list[str]:
    """The lines ``dsv4rt run`` prints for the layout (one process: a single line)."""
    if par is None:
        return ["parallel 1 process (tensor / expert parallel: torchrun --nproc-per-node N -m dsv4rt run ...)"]
    tp, ep, e = par.tp, par.ep, cfg.n_routed_experts
    csa = any(cfg.kind(i) == "csa" for i in range(cfg.n_layers))
    lines = [f"parallel {par.world} processes, torch.distributed {par.backend} on {par.device.type}: "
             f"tensor parallel {tp} (attention), expert parallel {ep} (MoE)",
             f"  per rank: {cfg.n_heads // tp}/{cfg.n_heads} query heads, {cfg.o_groups // tp}/{cfg.o_groups} wo_a "
             f"groups" + (f", {cfg.index_n_heads // tp}/{cfg.index_n_heads} indexer heads" if csa else "")
             + f", ~{-(-cfg.vocab_size // tp)}/{cfg.vocab_size} vocab rows, {e // ep}/{e} routed experts; "
             f"wq_a, wkv, compressors, router and shared expert replicated"]
    for r in range(par.world):
        tr, er = r % tp, r % ep
        h0, g0, v = tr * cfg.n_heads // tp, tr * cfg.o_groups // tp, split_range(cfg.vocab_size, tp, tr)
        t0 = r - tr
        lines.append(f"  rank {r}: tp group {t0}-{t0 + tp - 1} rank {tr} (heads {h0}-{h0 + cfg.n_heads // tp - 1}, "
                     f"groups {g0}-{g0 + cfg.o_groups // tp - 1}, vocab {v[0]}-{v[1] - 1}), ep group "
                     f"{r - er}-{r - er + ep - 1} rank {er} (experts {er * e // ep}-{(er + 1) * e // ep - 1})")
    return lines
