"""One safetensors file of a checkpoint, read and written through the ``safetensors`` library.

The library parses and checks the header (JSON syntax and depth, dtypes, integer shapes and offsets, offsets
covering the data section exactly, string metadata) and maps the file (``safe_open``, ``get_slice`` for a
tensor-parallel rank's part). dsv4rt adds what the library does not check: only regular files are opened
(a FIFO or device named ``*.safetensors`` never blocks), a tensor name appears once in a header, and every
problem, the library's included, is a CheckpointError naming the file and, where there is one, the tensor.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError

__all__ = ["TensorEntry", "ShardFile", "write_shard", "regular_file"]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: dtype name, shape and byte range (absolute offsets in the file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def regular_file(path: str) -> None:
    """Raise CheckpointError unless ``path`` (symlinks followed) is a regular file: opening a FIFO or a
    device would block or read without end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or directory is never opened)")


def _library_error(path: str, exc: BaseException) -> CheckpointError:
    """The library's (or the OS's) complaint about a file as a CheckpointError naming the file."""
    msg = str(exc)
    if "header too small" in msg:
        what = "truncated safetensors file (no complete header)"
    elif "header too large" in msg:
        what = "corrupt safetensors header length (larger than the format allows)"
    elif "not fully covered" in msg:
        what = f"truncated or padded file ({os.path.getsize(path)} bytes do not match the header's offsets)"
    elif "invalid JSON" in msg or "invalid UTF-8" in msg:
        what = "safetensors header is not valid JSON for the format"
    else:
        what = "not a readable safetensors file"
    return CheckpointError(f"{path}: {what} ({msg})")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise KeyError(k)
        seen[k] = v
    return seen


class ShardFile:
    """A validated safetensors file; ``read(name)`` returns a CPU tensor in the stored dtype."""

    def __init__(self, path: str) -> None:
        self.path = path
        regular_file(path)
        try:
            self._f = safe_open(path, framework="pt")
            self.metadata: Mapping[str, str] = self._f.metadata() or {}
            slices = {n: self._f.get_slice(n) for n in self._f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _library_error(path, exc) from None
        offsets = self._offsets()
        self.entries: dict[str, TensorEntry] = {}
        for name, sl in slices.items():
            a, b = offsets[name]
            self.entries[name] = TensorEntry(name, sl.get_dtype(), tuple(sl.get_shape()), a, b)

    def _offsets(self) -> dict[str, tuple[int, int]]:
        """Absolute byte ranges per tensor, and the one header check the library leaves out: a name given
        twice (the library keeps the last silently). The library has already bounded the header's size
        and nesting depth, so parsing it again here is cheap and safe."""
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            raw = f.read(n)
        try:
            header = json.loads(raw, object_pairs_hook=_no_duplicates)
        except KeyError as exc:
            raise CheckpointError(f"{self.path}: tensor {exc.args[0]!r} is named twice in the header") from None
        return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                for k, v in header.items() if k != "__metadata__"}

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor as stored (CPU)."""
        return self.read(name)

    def map_bytes(self, name: str) -> torch.Tensor:
        """A 1-byte-per-element tensor (F8_E4M3 / F8_E8M0 / U8 / I8) as uint8 of its shape, left in the file: a
        copy-on-write memory map, so reading a few rows of a 100 GB table touches only their pages."""
        import numpy as np

        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        if e.dtype not in ("F8_E4M3", "F8_E8M0", "U8", "I8"):
            raise CheckpointError(f"{self.path}: tensor {name!r} is {e.dtype}; only 1-byte tensors are mapped")
        if e.nbytes == 0:
            return torch.zeros(e.shape, dtype=torch.uint8)
        arr = np.memmap(self.path, dtype=np.uint8, mode="c", offset=e.start, shape=(e.nbytes,))
        return torch.from_numpy(arr).view(e.shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor (``dim`` None), or its part ``start:stop`` along ``dim`` through the library's
        ``get_slice``, which touches only that part of the mapped file (the one function through which
        tensor data is read; tensor-parallel ranks read their shards here)."""
        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        try:
            if dim is None:
                return self._f.get_tensor(name)
            stop = e.shape[dim] if stop is None else stop
            if not 0 <= start <= stop <= e.shape[dim]:
                raise CheckpointError(f"{self.path}: tensor {name!r}: slice {start}:{stop} of dim {dim} is outside "
                                      f"its shape {e.shape}")
            return self._f.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read ({exc})") from None


def write_shard(path: str, tensors: Iterable[tuple[str, torch.Tensor]],
                metadata: Mapping[str, str] | None = None) -> int:
    """Write ``(name, tensor)`` pairs to ``path`` with the library's ``save_file``; returns the bytes written.

    Written to ``path + '.tmp'`` and renamed, so a crash never leaves a half file under the real name.
    """
    items: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for n, t in tensors:
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # the library refuses tensors sharing memory
        storages.add(t.untyped_storage().data_ptr())
        items[n] = t
    tmp = path + ".tmp"
    save_file(items, tmp, metadata=dict(metadata or {"format": "pt"}))
    os.replace(tmp, path)
    return os.path.getsize(path)
