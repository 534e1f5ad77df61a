"""Deterministic synthetic weights in the released format, from a seed.

Every tensor is a function of (seed, tensor name), so any subset can be produced in any order. Values are
realistic: projections are random BF16 weights with std ``fan_in^-0.5`` quantised by the official rules
(:func:`dsv4rt.formats.quant_fp8_block`, :func:`dsv4rt.formats.quant_mxfp4`), norms near 1, mHC
parameters giving pre weights near 0.27, post near 1 and a mixing comb. ``fast=True`` (the V4-Flash
slice on a GPU) draws FP4 codes and FP8 values directly with a power-of-two scale of the same std.

The tiny preset's checkpoint is generated on first use into ``$DSV4RT_CACHE_DIR`` (default
``~/.cache/dsv4rt``) and then always read back through the normal loader.
"""
from __future__ import annotations

import math
import os
import zlib

import torch

from .. import env
from ..formats import quant_fp8_block, quant_mxfp4
from .checkpoint import INDEX_NAME, write_checkpoint
from .config import ModelConfig, preset
from .schema import E8M0, FP8, I8, TensorSpec, checkpoint_schema

__all__ = ["SyntheticSource", "cache_dir", "tiny_checkpoint", "SYNTHETIC_VERSION"]

SYNTHETIC_VERSION = 3
"""Bumped whenever the recipe changes, so stale cached checkpoints are not reused."""
_FP4_RMS = math.sqrt(sum(v * v for v in (0, .5, 1, 1.5, 2, 3, 4, 6)) / 8)


def cache_dir() -> str:
    """``$DSV4RT_CACHE_DIR`` or ``~/.cache/dsv4rt``."""
    return env.get("DSV4RT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dsv4rt")


class SyntheticSource:
    """A weight source (``get(name)``, ``cfg``, ``names()``) producing the schema's tensors on ``device``."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu", fast: bool = False,
                 mtp: bool = True) -> None:
        self.cfg, self.seed, self.device, self.fast = cfg, seed, torch.device(device), fast
        self.schema = checkpoint_schema(cfg, mtp=mtp)
        self._stash: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        return list(self.schema)

    def _gen(self, name: str) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return g

    def _randn(self, shape: tuple[int, ...], name: str, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        x = torch.randn(shape, generator=self._gen(name), device=self.device, dtype=torch.float32)
        return x.mul_(std).add_(mean)

    def get(self, name: str) -> torch.Tensor:
        if name in self._stash:
            return self._stash.pop(name)
        spec = self.schema[name]
        if name.endswith(".weight") and spec.dtype in (FP8, I8):
            w, s = self._quantised(spec)
            self._stash[name[:-len("weight")] + "scale"] = s
            return w
        if name.endswith(".scale"):
            self.get(name[:-len("scale")] + "weight")
            return self._stash.pop(name)
        return self._plain(spec)

    def _quantised(self, spec: TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
        base = spec.name[:-len(".weight")]
        scale_dtype = self.schema[base + ".scale"].dtype
        out, k = spec.shape[0], spec.shape[1] * (2 if spec.dtype == I8 else 1)
        std = k ** -0.5
        if self.fast:
            g = self._gen(spec.name)
            if spec.dtype == I8:
                b = 127 + round(math.log2(std / _FP4_RMS))
                codes = torch.randint(0, 256, spec.shape, generator=g, device=self.device, dtype=torch.uint8)
                scale = torch.full((out, k // 32), b, dtype=torch.uint8, device=self.device)
                return codes.view(torch.int8), scale.view(torch.float8_e8m0fnu)
            e = round(math.log2(std))
            w = torch.randn(spec.shape, generator=g, device=self.device).to(torch.float8_e4m3fn)
            shape = self.schema[base + ".scale"].shape
            if scale_dtype == E8M0:
                return w, torch.full(shape, 127 + e, dtype=torch.uint8, device=self.device).view(torch.float8_e8m0fnu)
            return w, torch.full(shape, 2.0 ** e, dtype=torch.float32, device=self.device)
        # BF16 values, quantised in NumPy (much faster than torch for many small tensors on a CPU)
        w = self._randn((out, k), spec.name, std).to(torch.bfloat16).float().cpu().numpy()
        if spec.dtype == I8:
            packed, scale = (torch.from_numpy(a).to(self.device) for a in quant_mxfp4(w))
            return packed.view(torch.int8), scale.view(torch.float8_e8m0fnu)
        if self.schema[base + ".scale"].shape[0] == out:   # per-row 1x32 blocks (the Engram tables)
            w8, scale = (torch.from_numpy(a).to(self.device) for a in quant_fp8_block(w[:, None, :], 32))
            w8, scale = w8[:, 0], scale[:, 0]
        else:
            w8, scale = (torch.from_numpy(a).to(self.device) for a in quant_fp8_block(w, self.cfg.fp8_block))
        if scale_dtype == E8M0:
            return w8.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu)
        return w8.view(torch.float8_e4m3fn), torch.exp2(scale.float() - 127)

    def _plain(self, spec: TensorSpec) -> torch.Tensor:
        name, shape, cfg = spec.name, spec.shape, self.cfg
        leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
        if name.endswith("tid2eid"):
            order = torch.rand((shape[0], cfg.n_routed_experts), generator=self._gen(name), device=self.device)
            return order.argsort(dim=1)[:, :shape[1]].to(torch.int64)
        if name == "embed.weight":
            v = self._randn(shape, name)
        elif leaf.endswith("norm"):
            v = self._randn(shape, name, 0.05, 1.0)
        elif leaf == "attn_sink":
            v = self._randn(shape, name, 0.5)
        elif leaf == "ape":
            v = self._randn(shape, name, 0.1)
        elif leaf in ("bias", "bias_vl"):
            v = self._randn(shape, name, 0.01)
        elif leaf in ("q_weight", "k_weight"):   # Engram gate weights (ones at initialisation)
            v = self._randn(shape, name, 0.05, 1.0)
        elif "_fn" in leaf:  # mHC projections: mixes of std ~1 on RMS-normalised streams
            v = self._randn(shape, name, shape[1] ** -0.5)
        elif "_base" in leaf:
            hc = cfg.hc_mult
            v = self._randn(shape, name, 0.5)
            v[:hc] = -1.0          # pre = sigmoid(-1) ~ 0.27 per stream
            if shape[0] > hc:
                v[hc:2 * hc] = 0.0  # post = 2 * sigmoid(0) = 1
        elif "_scale" in leaf:
            v = torch.full(shape, 0.5, device=self.device)
        else:  # BF16 matrices: head, router, compressor wkv/wgate, indexer weights_proj
            v = self._randn(shape, name, shape[-1] ** -0.5)
            if name == "head.weight" and cfg.extra.get("tokenizer") == "bytes":
                # cosmetic: rows of printable ASCII get a wider logit spread, so the byte-level presets'
                # random generations read as (random) text instead of control bytes
                keep = torch.zeros(shape[0], dtype=torch.bool, device=v.device)
                keep[32 + 3:min(127 + 3, shape[0])] = True
                v[~keep] *= 0.25
        return v.to(torch.bfloat16 if spec.dtype == "BF16" else torch.float32)


def tiny_checkpoint(seed: int = 0, root: str | None = None, name: str = "tiny") -> str:
    """The checkpoint directory of a toy preset (``tiny``, or ``tiny-v41`` with its byte-level tokenizer.json),
    generated on first use (a few MB, about a second)."""
    root = root or cache_dir()
    tag = "tiny" if name == "tiny" else name
    path = os.path.join(root, f"{tag}-v{SYNTHETIC_VERSION}-seed{seed}")
    if os.path.isfile(os.path.join(path, INDEX_NAME)) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(root, exist_ok=True)
    cfg = preset(name)
    src = SyntheticSource(cfg, seed)
    extras = None
    if cfg.is_v41:   # V4.1's Engram builds its token classes from the tokenizer, as the release's does
        from .engram_map import write_byte_tokenizer_json
        extras = write_byte_tokenizer_json
    return write_checkpoint(path, cfg, ((n, src.get(n)) for n in src.names()), max_shard_bytes=4 << 20,
                            overwrite=False, extras=extras)
