"""Turning source tensors (a Checkpoint or a SyntheticSource: anything with ``get(name)``) into the
model's parameters on the target device: FP8 linears (fused when their 128-row tiles align), the stacked
FP4 experts fp4_grouped_gemm takes, BF16/FP32 parameters in the dtypes the reference computes with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..formats import dequant_fp8_block, fp4_to_fp8_tiles
from ..prepare import Preparer, weight_preparer
from .grouped import GroupedProjection
from .opcall import OpCaller

__all__ = ["WeightSource", "Loader", "Fp8Linear", "Experts"]


class WeightSource(Protocol):
    def get(self, name: str) -> Tensor: ...


class Fp8Linear:
    """One FP8 E4M3 projection with block x block scales (128 for V4, 32 for V4.1), or several stacked along
    the output rows when every part but the last has a multiple of ``block`` rows (so the scale tiles stay
    aligned); ``__call__``
    returns the parts' outputs (``y`` for one part). ``prep`` (the device backend's weight hook, see
    :mod:`dsv4rt.prepare`) converts each weight that fp8_gemm receives, once; None keeps the tensors."""

    def __init__(self, parts: list[tuple[Tensor, Tensor]], block: int = 128, prep: Preparer | None = None) -> None:
        self.sizes = [w.shape[0] for w, _ in parts]
        if len(parts) > 1 and all(n % block == 0 for n in self.sizes[:-1]):
            self.groups = [(torch.cat([w for w, _ in parts]), torch.cat([s for _, s in parts]), self.sizes)]
        else:
            self.groups = [(w, s, [w.shape[0]]) for w, s in parts]
        if prep is not None:
            self.groups = [(prep(w, s, block), s, sizes) for w, s, sizes in self.groups]

    def __call__(self, ops: OpCaller, x: Tensor) -> Any:
        outs: list[Tensor] = []
        for w, s, sizes in self.groups:
            y = ops.fp8_gemm(x, w, s)
            outs.extend(y.split(sizes, dim=-1) if len(sizes) > 1 else [y])
        return outs[0] if len(outs) == 1 else outs


@dataclass
class Experts:
    """Routed experts. ``fp4``: ``w13 [E, 2I, dim/2]`` (w1 rows then w3 rows), ``w2 [E, dim, I/2]`` with
    E8M0 ``[.., K/32]`` scales, run by fp4_grouped_gemm. ``fp8`` (lossless conversion at load, or the -Base
    checkpoints): per-expert FP8 linears, run by fp8_gemm on each non-empty expert's rows."""

    kind: str
    inter: int
    w13: Tensor | None = None
    s13: Tensor | None = None
    w2: Tensor | None = None
    s2: Tensor | None = None
    fp8_13: list[Fp8Linear] | None = None
    fp8_2: list[Fp8Linear] | None = None

    def gate_up(self, ops: OpCaller, x: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "fp4":
            y = ops.fp4_grouped_gemm(x, self.w13, self.s13, offsets)
            return y[:, :self.inter], y[:, self.inter:]
        y = self._per_expert(ops, x, offsets, self.fp8_13, 2 * self.inter)
        return y[:, :self.inter], y[:, self.inter:]

    def down(self, ops: OpCaller, h: Tensor, offsets: Tensor) -> Tensor:
        if self.kind == "fp4":
            return ops.fp4_grouped_gemm(h, self.w2, self.s2, offsets)
        return self._per_expert(ops, h, offsets, self.fp8_2, self.fp8_2[0].sizes[0])

    @staticmethod
    def _per_expert(ops: OpCaller, x: Tensor, offsets: Tensor, lins: list[Fp8Linear], n: int) -> Tensor:
        out = x.new_empty((x.shape[0], n))
        bounds = offsets.tolist()
        for e, lin in enumerate(lins):
            a, b = bounds[e], bounds[e + 1]
            if b > a:
                y = lin(ops, x[a:b])
                out[a:b] = torch.cat(y, dim=-1) if isinstance(y, list) else y
        return out


class Loader:
    """Fetches tensors from a source and places them on ``device`` in the dtype each use needs.

    ``par`` (a :class:`dsv4rt.distributed.Parallel`, or None for one process) makes the ``tp_dim`` arguments
    effective: the tensor is split along that dim across the tensor-parallel group and only this rank's part
    is read (``source.get_slice`` when the source has it, so a checkpoint's other parts are never touched).

    Every GEMM weight (the FP8 linears, the stacked FP4 experts) goes once through the weight hook of the
    backend that runs ``device`` (:func:`dsv4rt.prepare.weight_preparer`, chosen at the first weight of each
    op); where that backend keeps the default, no call is made and the tensors read are the model's."""

    def __init__(self, source: WeightSource, device: torch.device, dtype: torch.dtype, convert_fp4: bool = False,
                 par: Any = None, block: int = 128):
        self.source, self.device, self.dtype, self.convert_fp4 = source, device, dtype, convert_fp4
        self.par, self.block = par, block
        self._preps: dict[str, Preparer | None] = {}

    def preparer(self, op: str) -> Preparer | None:
        """The device backend's weight hook for ``op`` (None: keep the released tensors), looked up once."""
        if op not in self._preps:
            self._preps[op] = weight_preparer(op, self.device.type)
        return self._preps[op]

    def _part(self, name: str, dim: int | None) -> tuple[int, int] | None:
        """This rank's ``[start, stop)`` of dim ``dim`` of ``name`` (None: the whole tensor)."""
        if dim is None or self.par is None or self.par.tp == 1:
            return None
        return self.par.tp_range(self._shape(name)[dim])

    def _shape(self, name: str) -> tuple[int, ...]:
        schema = getattr(self.source, "schema", None)
        return tuple(schema[name].shape if schema is not None else self.source.get(name).shape)

    def _read(self, name: str, dim: int | None, part: tuple[int, int] | None) -> Tensor:
        if part is None:
            return self.source.get(name)
        get_slice = getattr(self.source, "get_slice", None)
        if get_slice is not None:
            return get_slice(name, dim, *part)
        return self.source.get(name).narrow(dim, part[0], part[1] - part[0])

    def _own(self, name: str, dtype: torch.dtype | None = None, tp_dim: int | None = None,
             part: tuple[int, int] | None = None) -> Tensor:
        """The tensor (or this rank's part) on the device in ``dtype``, always in memory of its own (never a
        view of a checkpoint's memory map, whose tensors need not even be aligned)."""
        t = self._read(name, tp_dim, part if part is not None else self._part(name, tp_dim))
        out = t.to(self.device, dtype or t.dtype).contiguous()
        return out.clone() if out.data_ptr() == t.data_ptr() else out

    def stored(self, name: str, tp_dim: int | None = None) -> Tensor:
        """The tensor (or this rank's part) as the source holds it, on the CPU and possibly a view of a
        checkpoint's memory map: for a caller that copies it into a layout of its own at once."""
        return self._read(name, tp_dim, self._part(name, tp_dim))

    def raw(self, name: str, tp_dim: int | None = None) -> Tensor:
        return self._own(name, tp_dim=tp_dim)

    def f32(self, name: str, tp_dim: int | None = None) -> Tensor:
        return self._own(name, torch.float32, tp_dim)

    def act(self, name: str, tp_dim: int | None = None) -> Tensor:
        return self._own(name, self.dtype, tp_dim)

    def _fp8_pair(self, base: str, tp_dim: int | None) -> tuple[Tensor, Tensor]:
        """An FP8 weight and its block scales, both cut at the same (block-aligned) rows / columns."""
        part = self._part(f"{base}.weight", tp_dim)
        if part is None:
            return self.raw(f"{base}.weight"), self.raw(f"{base}.scale")
        a, b = part
        n, blk = self._shape(f"{base}.weight")[tp_dim], self.block
        if a % blk or (b % blk and b != n):
            raise CheckpointError(f"tensor {base + '.weight'!r}: tensor-parallel part {a}:{b} of dim {tp_dim} is not "
                                  f"aligned to the {blk}-wide scale blocks")
        return (self._own(f"{base}.weight", tp_dim=tp_dim, part=part),
                self._own(f"{base}.scale", tp_dim=tp_dim, part=(a // blk, -(-b // blk))))

    def fp8(self, *bases: str, tp_dim: int | None = None) -> Fp8Linear:
        return Fp8Linear([self._fp8_pair(b, tp_dim) for b in bases], self.block, self.preparer("fp8_gemm"))

    def grouped_fp8(self, base: str, groups: int, tp_dim: int | None = 0) -> GroupedProjection:
        """A grouped FP8 projection (``wo_a``, this rank's ``groups``), kept FP8 for the CPU's native kernel
        where that gives the bf16 dequantisation's bits, else dequantised (``runtime/model/grouped.py``)."""
        w, s = self._fp8_pair(base, tp_dim)
        return GroupedProjection.from_fp8(w, s, self.block, groups, self.dtype)

    def fp8_dequant(self, base: str, tp_dim: int | None = None) -> Tensor:
        """An FP8 weight dequantised to the activation dtype (``wo_a``, as the reference's convert.py)."""
        w, s = self._fp8_pair(base, tp_dim)
        return dequant_fp8_block(w, s, self.block, torch.float32).to(self.dtype)

    def mapped(self, name: str) -> Tensor:
        """A huge table left where it lies (a checkpoint's memory map: only the rows a lookup touches are
        read), or the source's tensor when it has no map (synthetic weights)."""
        mapped = getattr(self.source, "mapped", None)
        return mapped(name) if mapped is not None else self.source.get(name)

    def experts(self, prefix: str, n: int, inter: int, kind: str, first: int = 0) -> Experts:
        """Routed experts ``first .. first + n - 1`` (all of them in one process; an expert-parallel rank's
        contiguous range otherwise), stacked at local indices ``0 .. n - 1``."""
        ids = range(first, first + n)
        if kind == "fp8":
            return Experts("fp8", inter, fp8_13=[self.fp8(f"{prefix}.{e}.w1", f"{prefix}.{e}.w3") for e in ids],
                           fp8_2=[self.fp8(f"{prefix}.{e}.w2") for e in ids])
        if self.convert_fp4:
            prep = self.preparer("fp8_gemm")
            return Experts("fp8", inter, fp8_13=[Fp8Linear([self._to_fp8(f"{prefix}.{e}.w1"),
                                                            self._to_fp8(f"{prefix}.{e}.w3")], prep=prep) for e in ids],
                           fp8_2=[Fp8Linear([self._to_fp8(f"{prefix}.{e}.w2")], prep=prep) for e in ids])
        w13 = s13 = w2 = s2 = None
        for i, e in enumerate(ids):
            w1, s1 = self.source.get(f"{prefix}.{e}.w1.weight"), self.source.get(f"{prefix}.{e}.w1.scale")
            w3, s3 = self.source.get(f"{prefix}.{e}.w3.weight"), self.source.get(f"{prefix}.{e}.w3.scale")
            wd, sd = self.source.get(f"{prefix}.{e}.w2.weight"), self.source.get(f"{prefix}.{e}.w2.scale")
            if w13 is None:
                w13 = torch.empty((n, 2 * inter, w1.shape[1]), dtype=w1.dtype, device=self.device)
                s13 = torch.empty((n, 2 * inter, s1.shape[1]), dtype=s1.dtype, device=self.device)
                w2 = torch.empty((n, *wd.shape), dtype=wd.dtype, device=self.device)
                s2 = torch.empty((n, *sd.shape), dtype=sd.dtype, device=self.device)
            w13[i, :inter].copy_(w1)
            w13[i, inter:].copy_(w3)
            s13[i, :inter].copy_(s1)
            s13[i, inter:].copy_(s3)
            w2[i].copy_(wd)
            s2[i].copy_(sd)
        prep = self.preparer("fp4_grouped_gemm")
        if prep is not None:
            w13, w2 = prep(w13, s13, self.block), prep(w2, s2, self.block)
        return Experts("fp4", inter, w13=w13, s13=s13, w2=w2, s2=s2)

    def _to_fp8(self, base: str) -> tuple[Tensor, Tensor]:
        """Lossless MXFP4 -> FP8 128x128 conversion (spec 1.5); CheckpointError when it would round."""
        w, s = self.raw(f"{base}.weight"), self.raw(f"{base}.scale")
        try:
            w8, s8 = fp4_to_fp8_tiles(w, s)
        except ValueError as exc:
            raise CheckpointError(f"tensor {base + '.weight'!r}: FP4 -> FP8 conversion is not lossless ({exc})") from None
        return w8, s8.view(torch.float8_e8m0fnu)
