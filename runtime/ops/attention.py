"""Compressed attention family: kv_compress, sparse_attention (docs/deepseek-v4.md sections 3 and 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from . import _check as c
from ..kv_formats import kv_fp4_row_bytes, kv_fp8_row_bytes, unpack_kv_fp4, unpack_kv_fp8
from ..spec import OutputSpec, declare_spec

FAMILY = "attention"


def kv_compress(kv: Tensor, gate: Tensor | None, ape: Tensor | None, ratio: int, overlap: bool,
                prev_kv: Tensor | None = None, prev_gate: Tensor | None = None) -> Tensor:
    """out[B, S/ratio, d] float32: gated softmax pooling of every block of ``ratio`` tokens, per channel.

    - ``kv``, ``gate``: [B, S, C] float32 / bfloat16 / float16 (the compressor's ``wkv(x)``, ``wgate(x)``),
      S % ratio == 0 (ratio >= 1); ``ape``: [ratio, C] float32, added to the gate by position in block, or
      None for no position bias (the same as an all-zero ``ape``).
    - ``overlap=False`` (V4 HCA, ratio 128; V4.1 CSA2, ratio 2 with ``ape=None``): C = d,
      ``out[j, c] = sum_{i in block j} softmax_i(gate[i, c] + ape[i mod ratio, c]) * kv[i, c]``.
    - ``overlap=True`` (V4 CSA, ratio 4): C = 2d; entry j is a softmax over 2*ratio tokens per channel c:
      the previous block's first-half channel ``c`` (logit ``gate[i, c] + ape[i - ratio(j-1), c]``) and the
      own block's second-half channel ``d + c`` (logit ``gate[i, d+c] + ape[i - ratio j, d+c]``), with
      values ``kv`` at the same channels. For j = 0 the previous block is ``prev_kv``/``prev_gate``
      [B, ratio, C] when given (continuing a sequence), else empty (logit -inf). ``prev_*`` need overlap.
    - ``gate=None`` (V4.1 ratio-1 layers, whose compressor has no ``wgate``): only with ``ratio=1``,
      ``ape=None``, ``overlap=False``; one token per entry, nothing to pool: ``out = kv`` as float32 (exact,
      non-finite values passed through). So every compressed layer of V4 and V4.1 calls this one op.
    The op is stateless and never sees a partial block: a caller decoding token by token (V4.1: fp32
    ``kv_state``/``score_state`` [B, ratio, d]) keeps the raw rows of the incomplete block and calls the op
    on a block once it completes ((pos + 1) % ratio == 0); a prefill's trailing S % ratio rows wait the same
    way. Blocks do not depend on each other without overlap, so any chunking gives the same entries.
    No norm, cast or RoPE here: the cast to the activation dtype, RMSNorm (V4.1: eps 1e-20; for ratio 1
    the whole ``c_t = RMSNorm(wkv(x_t))``), RoPE and KV quantisation are model glue. Computed in float32.
    Non-finite inputs follow the IEEE arithmetic of the max-subtracted softmax, on every variant alike: a
    NaN or +inf logit, a NaN value, or logits that are all -inf (an empty softmax) make that entry's
    channel NaN; an infinite value with a nonzero weight makes it +-inf (NaN with both signs).
    """


def sparse_attention(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor | None, scale: float,
                     return_lse: bool = False, p_dtype: torch.dtype | None = None,
                     kv_format: str | None = None, kv_global: Tensor | None = None) -> Tensor:
    """o[B, S, H, D]: one softmax per (b, s, h) over the selected shared K=V entries plus an attention sink.

    - ``q``: [B, S, H, D] float32 / bfloat16 / float16; ``kv``: [B, N, D] (K = V), same dtype family.
    - ``idx``: [B, S, K] int32 entries in [0, N) or -1 (skip: reads no kv row, so non-finite values in
      rows nobody selects never reach the output); duplicates count as separate entries.
    - ``sink``: [H] float32 logits or None: ``exp(sink[h])`` is added to the denominator only.
    - ``logit_j = scale * q . kv[idx_j]``; ``o = sum_j exp(logit_j) kv[idx_j] / (sum_j exp(logit_j) + exp(sink))``.
      A row with no valid index returns zeros. Output dtype = q dtype, fp32 statistics.
    - ``return_lse``: also return ``lse`` [B, S, H] float32 = log of the full denominator (sink
      included; -inf for a row with no valid index and no sink), so partial results merge exactly.
    - NaN in q or in a selected kv row gives NaN in that (b, s, h)'s ``o`` and ``lse``; other rows are
      unaffected. Infinite inputs follow the IEEE arithmetic of the max-subtracted softmax (shift
      ``m = max(logits, sink)``), on every variant alike: a +inf logit gives ``exp(inf - inf)`` = NaN in
      that (b, s, h)'s ``o`` and ``lse``, a -inf logit weight 0.
    - ``p_dtype``: the precision of the probabilities in the P.V product. ``None`` (default) = kv's
      dtype, as the release's kernel (online softmax with fp32 statistics, P cast to the bf16 KV dtype
      for the P.V MMA); ``torch.float32`` keeps P in fp32; ``torch.bfloat16`` / ``torch.float16`` round
      it. With ``m`` = the row's largest logit (the sink excluded),
      ``o = sum_j round(exp(logit_j - m)) kv[idx_j] / (sum_j exp(logit_j - m) + exp(sink - m))``: only the
      numerator's P is rounded, the denominator and ``lse`` stay fp32. An online kernel rounds against
      its running max, which differs from ``m`` by at most one rounding of each P (inside the tolerance).
    - ``kv_format``: None (default, V4: ``kv`` holds the values as above, ``kv_global`` must be None) or
      ``"v41"``, the V4.1 quantised cache (dsv4rt.formats / runtime/kv_formats.py; D % 32 == 0):
      ``kv`` uint8 [B, N, D + D/32] packed FP8 rows (``pack_kv_fp8``: E4M3 codes, then one UE8M0 scale
      per 32; the window, in prefill the chunk's own rows), ``kv_global`` None or uint8
      [B, M, D/2 + D/16] packed FP4 rows (``pack_kv_fp4``: E2M1 pairs, low nibble = even element, then
      one E4M3 scale per 16; the compressed entries). ``idx`` entries in [0, N) read window row ``idx``,
      entries in [N, N + M) read global row ``idx - N``, -1 skips. The math above runs on the decoded
      rows (``unpack_kv_fp8`` / ``unpack_kv_fp4``: exact in fp32, exactly representable in bf16; a NaN
      scale byte makes its group NaN); ``p_dtype=None`` then means q's dtype (the bf16 buffer the
      release dequantises into). q: float32 / bfloat16 / float16 as above; the output takes q's dtype.
    """


# ---- the window declaration of sparse_attention's idx ---------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A ``sparse_attention`` caller's declaration about its ``idx``: the leading ``width`` columns of every
    query hold exactly these kv rows, each once, -1 elsewhere (in any order):

    - prefill (``valid is None``, queries 0..S-1 from position 0): query s holds rows
      ``first_row + max(0, s - width + 1) .. first_row + s`` (the model's prefill: ``first_row = W``);
    - decode (``valid[b]`` per sequence, S = 1): rows ``first_row .. first_row + valid[b] - 1`` (the ring
      buffer: ``first_row = 0``, ``valid[b] = min(pos_b + 1, W)``).
    """

    width: int
    first_row: int
    valid: tuple[int, ...] | None = None


class WindowedIndex(Tensor):
    """An idx tensor (int32 [B, S, K]) with its :class:`Window` in ``.window``; behaves as the plain tensor.

    Backend-neutral and optional: the contract and every implementation that ignores it see the plain idx
    (same storage, results unchanged). An implementation that can take the window as a contiguous band of
    kv rows without reading idx (Ascend FIA: a device->host sync otherwise) checks ``isinstance(idx,
    WindowedIndex)`` in its ``supports()``. The declaration is trusted; :meth:`verify` checks it (syncs).
    Ops on it return plain tensors, so a sliced or copied idx declares nothing."""

    window: Window
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def prefill(idx: Tensor, width: int, first_row: int) -> "WindowedIndex":
        return WindowedIndex._wrap(idx, Window(int(width), int(first_row), None))

    @staticmethod
    def decode(idx: Tensor, width: int, first_row: int, valid: Sequence[int]) -> "WindowedIndex":
        return WindowedIndex._wrap(idx, Window(int(width), int(first_row), tuple(int(v) for v in valid)))

    @staticmethod
    def _wrap(idx: Tensor, window: Window) -> "WindowedIndex":
        out = Tensor._make_subclass(WindowedIndex, idx, False)
        out.window = window
        return out

    def expected(self) -> Tensor:
        """The window columns the declaration describes ([B, S, width], sorted ascending, -1 first)."""
        w, b, s = self.window, self.shape[0], self.shape[1]
        c = torch.arange(w.width, device=self.device)
        if w.valid is None:
            pos = torch.arange(s, device=self.device)[:, None] - (w.width - 1) + c[None, :]
            rows = torch.where(pos < 0, -1, w.first_row + pos).expand(b, s, w.width)
        else:
            n = torch.tensor(w.valid, device=self.device)[:, None]
            rows = torch.where(c[None, :] >= w.width - n, w.first_row + c[None, :] - (w.width - n), -1)
            rows = rows[:, None, :].expand(b, s, w.width)
        return rows.to(torch.int32)

    def verify(self) -> bool:
        """True when the leading columns really are the declared window (reads the data: syncs)."""
        got = self.as_subclass(Tensor)[..., :self.window.width].sort(dim=-1).values
        return bool(torch.equal(got, self.expected()))



def _check_compress(a: Mapping[str, Any]) -> None:
    op = "kv_compress"
    c.tensor(op, "kv", a["kv"], 3, c.FLOAT_ACT)
    b, s, ch = a["kv"].shape
    c.integer(op, "ratio", a["ratio"], lo=1)
    c.flag(op, "overlap", a["overlap"])
    ratio = a["ratio"]
    if a["gate"] is None:   # V4.1 ratio 1: no gate, nothing to pool
        if ratio != 1:
            raise c.ContractError(op, "gate", "a [B, S, C] tensor (gate=None only with ratio 1: one token per "
                                  "entry, nothing to pool)", f"None with ratio = {ratio}")
        if a["overlap"]:
            raise c.ContractError(op, "overlap", "False when gate is None (ratio 1 without a gate)", "True")
        if a["ape"] is not None:
            raise c.ContractError(op, "ape", "None when gate is None (no gate to add a bias to)", "a tensor")
    else:
        c.tensor(op, "gate", a["gate"], 3, c.FLOAT_ACT)
        c.shape(op, "gate", a["gate"], (b, s, ch), "[B, S, C] like kv")
    if s % ratio:
        raise c.ContractError(op, "kv", f"S (kv.shape[1]) divisible by ratio = {ratio}", f"S = {s}")
    if a["overlap"] and ch % 2:
        raise c.ContractError(op, "kv", "an even channel count C = 2d when overlap=True", f"C = {ch}")
    if a["ape"] is not None:
        c.tensor(op, "ape", a["ape"], 2, (torch.float32,))
        c.shape(op, "ape", a["ape"], (ratio, ch), "[ratio, C]")
    prev = [n for n in ("prev_kv", "prev_gate") if a[n] is not None]
    if prev and not a["overlap"]:
        raise c.ContractError(op, prev[0], "None when overlap=False (blocks do not overlap)", "a tensor")
    if len(prev) == 1:
        missing = "prev_gate" if prev[0] == "prev_kv" else "prev_kv"
        raise c.ContractError(op, missing, f"a tensor, since {prev[0]} was given (both or neither)", "None")
    for n in prev:
        c.tensor(op, n, a[n], 3, c.FLOAT_ACT)
        c.shape(op, n, a[n], (b, ratio, ch), "[B, ratio, C]")


def _out_compress(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    b, s, ch = a["kv"].shape
    d = ch // 2 if a["overlap"] else ch
    return (OutputSpec("out", (b, s // a["ratio"], d), torch.float32),)


KV_FORMATS = (None, "v41")


def _check_kv_v41(op: str, a: Mapping[str, Any], b: int, d: int) -> None:
    if d % 32:
        raise c.ContractError(op, "q", "a head dim D % 32 == 0 with kv_format='v41' (one FP8 scale per 32)",
                              f"D = {d}")
    c.tensor(op, "kv", a["kv"], 3, (torch.uint8,))
    c.shape(op, "kv", a["kv"], (b, a["kv"].shape[1], kv_fp8_row_bytes(d)),
            "[B, N, D + D/32] (packed FP8 rows with kv_format='v41')")
    if a["kv_global"] is not None:
        c.tensor(op, "kv_global", a["kv_global"], 3, (torch.uint8,))
        c.shape(op, "kv_global", a["kv_global"], (b, a["kv_global"].shape[1], kv_fp4_row_bytes(d)),
                "[B, M, D/2 + D/16] (packed FP4 rows)")


def _check_attention(a: Mapping[str, Any]) -> None:
    op = "sparse_attention"
    c.tensor(op, "q", a["q"], 4, c.FLOAT_ACT)
    b, s, h, d = a["q"].shape
    c.choice(op, "kv_format", a["kv_format"], KV_FORMATS)
    if a["kv_format"] == "v41":
        _check_kv_v41(op, a, b, d)
    else:
        if a["kv_global"] is not None:
            raise c.ContractError(op, "kv_global", "None unless kv_format='v41' (the packed FP4 global rows)",
                                  "a tensor")
        c.tensor(op, "kv", a["kv"], 3, c.FLOAT_ACT)
        c.shape(op, "kv", a["kv"], (b, a["kv"].shape[1], d), "[B, N, D]")
    c.tensor(op, "idx", a["idx"], 3, c.INDEX)
    c.shape(op, "idx", a["idx"], (b, s, a["idx"].shape[2]), "[B, S, K]")
    if a["sink"] is not None:
        c.tensor(op, "sink", a["sink"], 1, (torch.float32,))
        c.shape(op, "sink", a["sink"], (h,), "[H]")
    c.number(op, "scale", a["scale"], positive=True)
    c.flag(op, "return_lse", a["return_lse"])
    c.choice(op, "p_dtype", a["p_dtype"], P_DTYPES)


P_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def p_dtype_of(a: Mapping[str, Any]) -> torch.dtype:
    """The effective P dtype of a sparse_attention call (``p_dtype``, or when None kv's dtype; q's dtype
    for the packed ``kv_format='v41'`` cache)."""
    if a.get("p_dtype") is not None:
        return a["p_dtype"]
    return a["q"].dtype if a.get("kv_format") == "v41" else a["kv"].dtype


def kv_rows(a: Mapping[str, Any]) -> int:
    """N + M: the row count ``idx`` addresses (window rows, then the V4.1 global rows)."""
    g = a.get("kv_global")
    return a["kv"].shape[1] + (0 if g is None else g.shape[1])


def dequant_kv(a: Mapping[str, Any]) -> Tensor:
    """The values every ``idx`` entry addresses, float32 [B, N + M, D]: ``kv`` itself (widened) without a
    kv_format, else the decoded window rows followed by the decoded global rows (the whole cache: for
    references and tolerances, not for kernels)."""
    if a.get("kv_format") != "v41":
        return a["kv"].float()
    rows = [unpack_kv_fp8(a["kv"])]
    if a.get("kv_global") is not None:
        rows.append(unpack_kv_fp4(a["kv_global"]))
    return torch.cat(rows, dim=1)


def _values_attention(a: Mapping[str, Any]) -> None:
    c.index_range("sparse_attention", "idx", a["idx"], 0, kv_rows(a), allow_minus_one=True)
    if a["sink"] is not None:
        c.finite("sparse_attention", "sink", a["sink"])


def _out_attention(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    out = (OutputSpec("o", tuple(a["q"].shape), a["q"].dtype),)
    if a["return_lse"]:
        out += (OutputSpec("lse", tuple(a["q"].shape[:3]), torch.float32),)
    return out


KV_COMPRESS = declare_spec(kv_compress, family=FAMILY, check=_check_compress, outputs=_out_compress,
                           reference="dsv4rt.reference:kv_compress",
                           cases="dsv4rt.conformance.cases.attention:kv_compress",
                           tolerance="dsv4rt.conformance.tolerance:pooling")
SPARSE_ATTENTION = declare_spec(sparse_attention, family=FAMILY, check=_check_attention, outputs=_out_attention,
                                check_values=_values_attention, reference="dsv4rt.reference:sparse_attention",
                                cases="dsv4rt.conformance.cases.attention:sparse_attention",
                                tolerance="dsv4rt.conformance.tolerance:attention")
SPECS = (KV_COMPRESS, SPARSE_ATTENTION)
