"""Checkpoints in the released DeepSeek-V4 format: validated, memory-mapped loading and writing.

A checkpoint directory holds ``config.json`` and either ``model.safetensors.index.json`` with its shards
or plain ``*.safetensors`` files. :class:`Checkpoint` checks every header against the schema derived from
the config (:mod:`.schema`) before any data is read, then hands out one tensor at a time from the memory
map (with value checks: finite scales and norms, no FP8 NaN codes, ``tid2eid`` in range). Every malformed
input raises CheckpointError naming the tensor or the file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..errors import CheckpointError
from .config import ModelConfig, load_config
from .progress import Progress
from .shard import ShardFile, TensorEntry, regular_file, write_shard
from .schema import FP8, I8, TensorSpec, checkpoint_schema

__all__ = ["Checkpoint", "write_checkpoint", "INDEX_NAME"]

log = logging.getLogger("dsv4rt")
INDEX_NAME = "model.safetensors.index.json"
_EXPERT_PROBE = "layers.0.ffn.experts.0.w1.weight"


def _unusable(name: str) -> str | None:
    """Why no file can have the name ``name`` (a NUL byte, or a character the file system encoding cannot
    encode, e.g. a lone surrogate from a JSON escape), or None: os.path would raise ValueError on it."""
    if "\0" in name:
        return "it holds a NUL byte"
    try:
        os.fsencode(name)
    except UnicodeEncodeError as exc:
        return f"the file system encoding cannot encode it ({exc.reason})"
    return None


def _shard_path(root: str, name: object, where: str) -> str:
    """The path of a shard named in the index; only plain files inside ``root`` are accepted."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise CheckpointError(f"{where}: shard name {name!r} is not a relative file name inside {root}")
    why = _unusable(name)
    if why:
        raise CheckpointError(f"{where}: shard name {name!r} is not a file name: {why}")
    norm = os.path.normpath(name)
    if norm.startswith("..") or norm.split(os.sep)[0] == ".." or norm == ".":
        raise CheckpointError(f"{where}: shard {name!r} is named outside the checkpoint directory {root}")
    return _inside(root, os.path.join(root, norm), f"{where}: shard {name!r}")


def _inside(root: str, path: str, where: str) -> str:
    """``path`` if it resolves (symlinks followed) to a place inside ``root``: a link out is refused."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CheckpointError(f"{where}: {path} resolves to {real}, outside the checkpoint directory {root}")
    return path


class Checkpoint:
    """A validated checkpoint; ``get(name)`` returns one tensor (CPU, the stored dtype)."""

    def __init__(self, path: str | os.PathLike, cfg: ModelConfig | None = None, progress: bool = False) -> None:
        self.root = os.path.abspath(os.fspath(path))
        if not os.path.exists(self.root):
            raise CheckpointError(f"{self.root}: does not exist; --checkpoint takes the folder of a downloaded "
                                  f"checkpoint (config.json and the *.safetensors files; README.md, 'Real weights')")
        if not os.path.isdir(self.root):
            raise CheckpointError(f"{self.root}: is a file, not a checkpoint directory; give the folder that holds "
                                  f"config.json and the *.safetensors files")
        self.cfg = cfg if cfg is not None else load_config(self.root)
        self.show_progress = progress
        self.where: dict[str, ShardFile] = {}
        self._open_files()
        probe = self.where.get(_EXPERT_PROBE)
        if probe is not None:  # the checkpoint says which expert format it is (HF configs often do not)
            kind = {I8: "fp4", FP8: "fp8"}.get(probe.entries[_EXPERT_PROBE].dtype)
            if kind and kind != self.cfg.expert_dtype:
                log.info("dsv4rt: %s stores %s experts; using expert_dtype=%s", self.root, kind, kind)
                self.cfg = self.cfg.replace(expert_dtype=kind)
        # V4.1: wo_a as the release stores it (FP8 + scales) or as the official convert.py writes it (bf16)
        fp8_wo_a = "layers.0.attn.wo_a.scale" in self.where
        self.schema: dict[str, TensorSpec] = checkpoint_schema(self.cfg, fp8_wo_a=fp8_wo_a)
        self._validate()
        self._progress: Progress | None = None

    # ---- discovery and header validation ---------------------------------------------------------
    def _open_files(self) -> None:
        index = os.path.join(self.root, INDEX_NAME)
        files: dict[str, ShardFile] = {}
        if os.path.lexists(index):
            regular_file(index)
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc})") from None
            for tensor, shard in weight_map.items():
                path = _shard_path(self.root, shard, f"{index}: tensor {tensor!r}")
                if path not in files:
                    if not os.path.lexists(path):
                        raise CheckpointError(f"{index}: tensor {tensor!r} is in shard {shard!r}, which does not exist")
                    files[path] = ShardFile(path)
                if tensor not in files[path].entries:
                    raise CheckpointError(f"{path}: tensor {tensor!r} is listed in the index but not in this shard")
                self.where[tensor] = files[path]
            for path, st in files.items():
                for tensor in st.entries:
                    if self.where.get(tensor) is not st:
                        raise CheckpointError(f"{path}: tensor {tensor!r} is not mapped to this shard by the index")
        else:
            names = sorted(n for n in os.listdir(self.root) if n.endswith(".safetensors"))
            if not names:
                raise CheckpointError(f"{self.root}: no {INDEX_NAME} and no *.safetensors files")
            for n in names:
                path = _inside(self.root, os.path.join(self.root, n), f"{self.root}: {n!r}")
                st = ShardFile(path)
                for tensor in st.entries:
                    if tensor in self.where:
                        raise CheckpointError(f"{st.path}: tensor {tensor!r} is also in {self.where[tensor].path}")
                    self.where[tensor] = st
        self.files = list(dict.fromkeys(self.where.values()))

    def _validate(self) -> None:
        missing = [n for n in self.schema if n not in self.where]
        if missing:
            s = self.schema[missing[0]]
            raise CheckpointError(f"{self.root}: missing tensor {missing[0]!r} (expected {s.dtype} {list(s.shape)}); "
                                  f"{len(missing)} tensor(s) missing in total")
        extra = [n for n in self.where if n not in self.schema and not _vision(self.cfg, n)]
        if extra:
            raise CheckpointError(f"{self.where[extra[0]].path}: unexpected tensor {extra[0]!r} (not in the "
                                  f"{self.cfg.name} schema); {len(extra)} unexpected tensor(s) in total")
        for name, spec in self.schema.items():
            e = self.entry(name)
            if e.dtype not in spec.dtypes or e.shape != spec.shape:
                raise CheckpointError(f"{self.where[name].path}: tensor {name!r} is {e.dtype} {list(e.shape)}, "
                                      f"expected {' or '.join(spec.dtypes)} {list(spec.shape)}")

    def entry(self, name: str) -> TensorEntry:
        return self.where[name].entries[name]

    # ---- loading ---------------------------------------------------------------------------------
    def start_progress(self, names: Iterable[str], label: str = "loading checkpoint") -> None:
        names = list(names)
        total = sum(self.entry(n).nbytes for n in names)
        self._progress = Progress(label, total, len(names), enabled=self.show_progress)

    def finish_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def get(self, name: str) -> torch.Tensor:
        """One tensor as stored (CPU; backed by the memory map until the caller copies or converts it),
        after the value checks of its kind."""
        if name not in self.schema:
            raise CheckpointError(f"{self.root}: no tensor {name!r} in the {self.cfg.name} schema")
        st = self.where[name]
        t = st.get(name)
        _check_values(name, t, self.schema[name], st.path, self.cfg)
        if self._progress is not None:
            self._progress.advance(self.entry(name).nbytes)
        return t

    def mapped(self, name: str) -> torch.Tensor:
        """A huge 1-byte table (V4.1's Engram rows and scales) as uint8, left memory-mapped in the file; its
        values are checked where they are read (the lookup op turns NaN codes into NaN), never scanned whole."""
        if name not in self.schema:
            raise CheckpointError(f"{self.root}: no tensor {name!r} in the {self.cfg.name} schema")
        return self.where[name].map_bytes(name)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """The part ``start:stop`` along ``dim`` of one tensor, read from the memory map without touching the
        rest (a tensor-parallel rank's shard), after the value checks of its kind."""
        if name not in self.schema:
            raise CheckpointError(f"{self.root}: no tensor {name!r} in the {self.cfg.name} schema")
        st = self.where[name]
        t = st.read(name, dim, start, stop)
        _check_values(name, t, self.schema[name], st.path, self.cfg)
        if self._progress is not None:
            self._progress.advance(t.numel() * t.element_size())
        return t

    def names(self) -> list[str]:
        return list(self.schema)


_VISION_PREFIXES = ("vision.", "aligner.", "image_start", "image_end", "image_newline")


def _vision(cfg: ModelConfig, name: str) -> bool:
    """A V4.1 vision-tower tensor: present in the release, not read by the text model."""
    return cfg.is_v41 and name.startswith(_VISION_PREFIXES)


def _check_values(name: str, t: torch.Tensor, spec: TensorSpec, path: str, cfg: ModelConfig) -> None:
    where = f"{path}: tensor {name!r}"
    if t.dtype == torch.float8_e8m0fnu:
        if _all_ones_somewhere(t, torch.uint8, 0xFF):
            at = _first(t.view(torch.uint8) == 255)
            raise CheckpointError(f"{where}: non-finite scale (E8M0 byte 255 = NaN) at {at}")
    elif t.dtype == torch.float8_e4m3fn:
        if _all_ones_somewhere(t, torch.uint8, 0x7F):
            raise CheckpointError(f"{where}: NaN FP8 code at {_first((t.view(torch.uint8) & 0x7F) == 0x7F)}")
    elif t.dtype in (torch.float32, torch.bfloat16):
        bits, exp = (torch.int32, 0x7F800000) if t.dtype == torch.float32 else (torch.int16, 0x7F80)
        if _all_ones_somewhere(t, bits, exp):
            kind = "scale" if name.endswith(".scale") else "value"
            raise CheckpointError(f"{where}: non-finite {kind} at {_first(~torch.isfinite(t))}")
        if name.endswith(".scale") and bool((t <= 0).any()):
            raise CheckpointError(f"{where}: non-positive scale at {_first(t <= 0)}")
    elif name.endswith("tid2eid"):
        bad = (t < 0) | (t >= cfg.n_routed_experts)
        if bool(bad.any()):
            raise CheckpointError(f"{where}: expert id outside [0, {cfg.n_routed_experts}) at {_first(bad)}")


_SCAN = 1 << 20   # elements per step of the load-time scan: the masked copy stays in the cache


def _all_ones_somewhere(t: torch.Tensor, bits: torch.dtype, field: int) -> bool:
    """Whether some element of ``t`` (read as the integer type ``bits``) has every bit of ``field`` set (NaN
    codes, non-finite exponents). NumPy, a cache-sized step at a time: ~15 GB/s on one core where torch's
    ``isfinite`` / byte comparisons over the whole tensor ran at ~0.3 GB/s, the bulk of a load's time."""
    flat = t.reshape(-1).view(bits).numpy()
    field_np = np.array(field, dtype=flat.dtype)
    buf = np.empty(min(_SCAN, flat.size), dtype=flat.dtype)
    for i in range(0, flat.size, _SCAN):
        chunk = flat[i:i + _SCAN]
        part = buf[:chunk.size]
        np.bitwise_and(chunk, field_np, out=part)
        if part.max() == field_np:
            return True
    return False


def _first(mask: torch.Tensor) -> str:
    return "index " + str(tuple(int(i) for i in mask.nonzero()[0]))


def write_checkpoint(path: str | os.PathLike, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                     max_shard_bytes: int = 4 << 30, overwrite: bool = True,
                     extras: Callable[[str], Any] | None = None) -> str:
    """Write ``(name, tensor)`` pairs and ``config.json`` as a sharded checkpoint in the released layout
    (``extras(dir)`` adds further files, e.g. a tokenizer.json, before the directory appears).

    Shards are ``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``. The directory
    is built under a temporary name and renamed at the end, so readers never see a partial checkpoint.
    With ``overwrite=False`` an existing directory wins (another process finished first) and ours is
    discarded. Returns the directory.
    """
    root = os.path.abspath(os.fspath(path))
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
        nonlocal total
        if batch:
            total += write_shard(os.path.join(tmp, f"shard-{len(shards):05d}"), batch)
            shards.append([n for n, _ in batch])
            for n, _ in batch:
                weight_map[n] = len(shards) - 1

    batch: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in tensors:
        nb = t.numel() * t.element_size()
        if batch and size + nb > max_shard_bytes:
            flush(batch)
            batch, size = [], 0
        batch.append((name, t))
        size += nb
    flush(batch)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(names):
        os.replace(os.path.join(tmp, f"shard-{i:05d}"), os.path.join(tmp, fname))
    with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}},
                  f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    if extras is not None:
        extras(tmp)
    if os.path.exists(root):
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:
        if overwrite or not os.path.isdir(root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return root
