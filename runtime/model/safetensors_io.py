"""A dependency-free reader and writer of the safetensors format (8-byte header length, JSON header,
raw little-endian data), so ``dsv4rt run`` works on a fresh install without the ``safetensors`` package.

The reader validates the whole header up front (dtypes, shapes, offsets inside the file, no overlap)
and maps the file read-only-by-contract (``ACCESS_COPY``: pages are shared with the file until written,
which never happens), so a tensor costs nothing until it is touched. Every problem raises
CheckpointError naming the file and, where there is one, the tensor.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["DTYPES", "TensorEntry", "SafetensorsFile", "write_safetensors", "torch_dtype_name"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype (``torch.float8_e8m0fnu`` -> ``F8_E8M0``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors spelling") from None


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


class SafetensorsFile:
    """A validated safetensors file; ``get(name)`` returns a CPU tensor backed by the memory map."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mm: mmap.mmap | None = None
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: truncated or corrupt safetensors header (header length {n}, "
                                          f"file size {size})")
                raw = f.read(n)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object")
        self.metadata: Mapping[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.size = size
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info)
        self._check_overlap()

    def _entry(self, name: str, info: Any) -> TensorEntry:
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            a, b = int(a), int(b)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: malformed header entry {info!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
        if any(s < 0 for s in shape) or a < 0 or b < a:
            raise CheckpointError(f"{where}: negative shape or offsets ({shape}, [{a}, {b}])")
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        if math.prod(shape) * itemsize != b - a:
            raise CheckpointError(f"{where}: {dtype} {list(shape)} needs {math.prod(shape) * itemsize} bytes, "
                                  f"the header gives {b - a}")
        if self.data_start + b > self.size:
            raise CheckpointError(f"{where}: data ends at byte {self.data_start + b} but the file has "
                                  f"{self.size} bytes (truncated file)")
        return TensorEntry(name, dtype, shape, self.data_start + a, self.data_start + b)

    def _check_overlap(self) -> None:
        last_end, last = self.data_start, None
        for e in sorted(self.entries.values(), key=lambda e: (e.start, e.end)):
            if e.nbytes and e.start < last_end:
                raise CheckpointError(f"{self.path}: tensors {last!r} and {e.name!r} overlap in the data section")
            if e.nbytes:
                last_end, last = e.end, e.name

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            try:
                with open(self.path, "rb") as f:
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{self.path}: cannot map ({exc})") from None
        return self._mm

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (CPU, sharing the mapped pages; copy it before keeping it long)."""
        return self.read(name)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor (``dim`` None), or its part ``start:stop`` along ``dim``: a strided view of the
        mapped bytes from the part's first to its last element, so copying it touches only that part (the
        one function through which tensor data is read; tensor-parallel ranks read their shards here)."""
        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        if e.nbytes and e.end > len(self._map()):
            raise CheckpointError(f"{self.path}: tensor {name!r} lies past the end of the file (truncated)")
        dtype, shape = DTYPES[e.dtype], list(e.shape)
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        first = 0
        if dim is not None:
            stop = shape[dim] if stop is None else stop
            if not 0 <= start <= stop <= shape[dim]:
                raise CheckpointError(f"{self.path}: tensor {name!r}: slice {start}:{stop} of dim {dim} is outside "
                                      f"its shape {e.shape}")
            first, shape[dim] = start * strides[dim], stop - start
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype)
        span = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
        size = torch.empty((), dtype=dtype).element_size()
        arr = np.frombuffer(self._map(), dtype=np.uint8, count=span * size, offset=e.start + first * size)
        return torch.from_numpy(arr).view(dtype).as_strided(shape, strides)

    def close(self) -> None:
        self._mm = None  # the map closes when the last tensor view of it is gone


def write_safetensors(path: str, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``(name, tensor)`` pairs (in that order) to ``path``; returns the bytes written.

    Written to ``path + '.tmp'`` and renamed, so a crash never leaves a half file under the real name.
    """
    items = [(n, t.detach().contiguous().cpu()) for n, t in tensors]
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, t in items:
        nb = t.numel() * t.element_size()
        header[name] = {"dtype": torch_dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
    return 8 + len(raw) + off
