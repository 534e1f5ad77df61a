"""A recording stand-in for the ``torch_npu`` module, for WIRING tests on hosts without an NPU.

``make(soc_version=...)`` returns a module object to put in ``sys.modules["torch_npu"]``. Each op has the
documented signature (positional-or-keyword before ``*``, keyword-only after, the documented names and
defaults), so a call with a wrong argument name fails; each records its name and every argument as a
:class:`TensorDesc` (dtype, shape, storage format ND/NZ, contiguity) or the plain value; and returns
tensors of the documented shapes computed by a plain-torch model of the documented semantics.

What this proves: the fused implementations form the calls as documented and the layout conversions
around them are consistent with the documented semantics. What it does NOT prove: that the NPU computes
what the documents say, or its numerics. The backend itself never imports this module.

Bound to a release (``make(..., facts=tests/data/ascend/torch_npu-<version>.txt)``, see ``fake_schemas``),
every call goes through ``torch.library`` ops defined with that release's real schemas, so argument names,
keyword-only rules, types and overloads are the wheel's; the dtype constants are the release's (checked
equal to :data:`DTYPE_CONSTANTS`, the values of ``torch_npu._C._cd.DType``), and ``npu_grouped_matmul``
enforces the ``*_dtype`` values its graph-mode (meta) registration accepts. Documented input dtypes are
enforced where the backend depends on them (``npu_moe_token_unpermute``: bfloat16 tokens and probs;
``npu_lightning_indexer``: weights in the query's dtype or float32).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["make", "TensorDesc", "Call", "Recorder", "DTYPE_CONSTANTS", "describe"]

DTYPE_CONSTANTS = {"float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297, "float8_e8m0fnu": 293,
                   "float8_e4m3fn": 292, "float8_e5m2": 291, "hifloat8": 290, "int4": 285}
"""torch_npu 2.13.0 / 2.14.0 values (``op_plugin/meta/_meta_registrations.py`` of both wheels)."""
_NZ = 29


@dataclass(frozen=True)
class TensorDesc:
    dtype: torch.dtype
    shape: tuple[int, ...]
    format: int  # 2 = ND, 29 = FRACTAL_NZ
    contiguous: bool
    stride: tuple[int, ...] = field(default=(), compare=False)


@dataclass
class Call:
    op: str
    args: dict[str, Any]


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    formats: dict[int, int] = field(default_factory=dict)  # storage data_ptr -> format

    def named(self, op: str) -> list[Call]:
        return [c for c in self.calls if c.op == op]


def describe(value: Any, rec: Recorder) -> Any:
    if isinstance(value, Tensor):
        fmt = rec.formats.get(value.untyped_storage().data_ptr(), 2) if value.device.type != "meta" else 2
        return TensorDesc(value.dtype, tuple(value.shape), fmt, value.is_contiguous(), tuple(value.stride()))
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        return [describe(v, rec) for v in value]
    return value


def _e8m0(b: Tensor) -> Tensor:
    return torch.exp2(b.to(torch.float32) - 127.0)


def make(soc_version: int = 223, ops: tuple[str, ...] | None = None, device_count: int = 1,
         facts: Any = None) -> types.ModuleType:
    """A torch_npu stand-in reporting ``soc_version`` (223 = A2, 253 = A3, 260 = 950); ``ops`` limits which
    ops exist (default: all); ``facts``: a :class:`fake_schemas.Facts` or the path of a facts file to bind
    every op to that release's schemas (default: plain Python signatures). ``module.recorder`` holds the
    calls."""
    from .fake_schemas import Facts, load_facts

    if facts is not None and not isinstance(facts, Facts):
        facts = load_facts(facts)
    if facts is not None and any(facts.dtypes.get(k, v) != v for k, v in DTYPE_CONSTANTS.items()):
        raise ValueError(f"torch_npu {facts.version} dtype constants {facts.dtypes} differ from {DTYPE_CONSTANTS}")
    rec = Recorder()
    mod = types.ModuleType("torch_npu")
    mod.__file__ = __file__
    mod.recorder = rec
    mod.npu = types.SimpleNamespace(get_soc_version=lambda: soc_version, device_count=lambda: device_count,
                                    is_available=lambda: device_count > 0)
    for name, value in DTYPE_CONSTANTS.items():
        setattr(mod, name, value)

    def record(op: str, **args: Any) -> None:
        rec.calls.append(Call(op, {k: describe(v, rec) for k, v in args.items()}))

    def npu_format_cast(input, acl_format, *, customize_dtype=None, input_dtype=None):
        record("npu_format_cast", input=input, acl_format=acl_format, customize_dtype=customize_dtype,
               input_dtype=input_dtype)
        out = input.clone()
        rec.formats[out.untyped_storage().data_ptr()] = int(acl_format)
        return out

    def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                          dst_type_max=0.0):
        record("npu_dynamic_quant", input=input, smooth_scales=smooth_scales, group_index=group_index,
               dst_type=dst_type, quant_mode=quant_mode, dst_type_max=dst_type_max)
        x = input.float()
        scale = x.abs().amax(dim=-1).clamp(min=1e-30) / 127.0
        return torch.round(x / scale[..., None]).clamp(-128, 127).to(torch.int8), scale

    def npu_dynamic_mx_quant(input, *, axis=-1, round_mode="rint", dst_type=296, block_size=32, scale_alg=0,
                             dst_type_max=0.0, max_low_bound=0.0):
        record("npu_dynamic_mx_quant", input=input, axis=axis, round_mode=round_mode, dst_type=dst_type,
               block_size=block_size, scale_alg=scale_alg, dst_type_max=dst_type_max)
        if axis not in (-1, input.dim() - 1) or dst_type != DTYPE_CONSTANTS["float8_e4m3fn"]:
            raise NotImplementedError("stand-in models the last axis to float8_e4m3fn only")
        x = input.float()
        lead, k = x.shape[:-1], x.shape[-1]
        blocks = x.reshape(*lead, k // block_size, block_size)
        amax = blocks.abs().amax(-1)
        if scale_alg == 1:   # aclnnDynamicMxQuant scaleAlg 1: 2^ceil(log2(amax / 448))
            e = torch.ceil(torch.log2((amax / 448.0).clamp(min=2.0 ** -127)))
        else:                # OCP: floor(log2(amax)) - emax(E4M3 = 8)
            e = torch.floor(torch.log2(amax.clamp(min=2.0 ** -127))) - 8
        e = e.clamp(-127, 127)
        y = (blocks / torch.exp2(e)[..., None]).reshape(x.shape).to(torch.float8_e4m3fn)
        s = (e + 127).to(torch.uint8)
        if s.shape[-1] % 2:
            s = torch.cat([s, torch.zeros_like(s[..., :1])], -1)
        return y, s.reshape(*lead, s.shape[-1] // 2, 2)

    def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                           antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                           activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                           group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                           weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
        record("npu_grouped_matmul", x=x, weight=weight, bias=bias, scale=scale, offset=offset,
               antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset, per_token_scale=per_token_scale,
               group_list=group_list, split_item=split_item, group_type=group_type, group_list_type=group_list_type,
               act_type=act_type, output_dtype=output_dtype, x_dtype=x_dtype, weight_dtype=weight_dtype,
               scale_dtype=scale_dtype, per_token_scale_dtype=per_token_scale_dtype)
        if facts is not None:
            for arg, value in (("x_dtype", x_dtype), ("weight_dtype", weight_dtype), ("scale_dtype", scale_dtype),
                               ("per_token_scale_dtype", per_token_scale_dtype)):
                allowed = [facts.dtypes[n] for n in facts.gmm_meta.get(arg, ())]
                if value is not None and arg in facts.gmm_meta and value not in allowed:
                    raise RuntimeError(f"npu_grouped_matmul: {arg}={value!r}; the graph-mode (meta) registration of "
                                       f"torch_npu {facts.version} accepts only {facts.gmm_meta[arg]} ({allowed})")
        xs, ws = x[0], weight[0]
        ends = group_list.long() if group_list_type == 0 else torch.cumsum(group_list.long(), 0)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        if weight_dtype == DTYPE_CONSTANTS["float4_e2m1fn_x2"]:   # MxA8W4: [E, K/2, N] view of [E, N, K/2] bytes
            from dsv4rt.formats import decode_e4m3, dequant_mxfp4

            e, _, n = ws.shape
            raw = ws.transpose(1, 2)
            sc = antiquant_scale[0].transpose(1, 2).reshape(e, n, -1)
            wv = dequant_mxfp4(raw, sc, torch.float32).transpose(1, 2)          # [E, K, N]
            xv = decode_e4m3(xs.view(torch.uint8))
            xv = xv * _e8m0(per_token_scale[0].reshape(xv.shape[0], -1)).repeat_interleave(32, -1)
        elif xs.dtype == torch.int8:
            xv, wv = xs.float(), ws.float()
        else:
            xv, wv = xs.float(), ws.float()
        out = torch.zeros((xs.shape[0], wv.shape[-1]), dtype=torch.float32)
        for g, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            if b > a:
                out[a:b] = xv[a:b] @ wv[g]
                if scale is not None:
                    out[a:b] *= scale[0][g].float()
        if per_token_scale is not None and xs.dtype == torch.int8:
            out *= per_token_scale[0][:, None]
        dtype = output_dtype if isinstance(output_dtype, torch.dtype) else xs.dtype
        return [out.to(dtype)]

    def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                                expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                                expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=[],
                                row_idx_type=0, x_dtype=None):
        record("npu_moe_init_routing_v2", x=x, expert_idx=expert_idx, scale=scale, offset=offset,
               active_num=active_num, expert_capacity=expert_capacity, expert_num=expert_num,
               drop_pad_mode=drop_pad_mode, expert_tokens_num_type=expert_tokens_num_type,
               expert_tokens_num_flag=expert_tokens_num_flag, quant_mode=quant_mode,
               active_expert_range=list(active_expert_range), row_idx_type=row_idx_type, x_dtype=x_dtype)
        if drop_pad_mode != 0 or quant_mode != -1:
            raise NotImplementedError("stand-in models the dropless, unquantized mode only")
        k = expert_idx.shape[1]
        lo, hi = active_expert_range or (0, expert_num)
        flat = expert_idx.reshape(-1).long()
        order = torch.sort(flat, stable=True).indices              # the doc's np.argsort(kind="stable")
        if row_idx_type == 1:
            row_idx = order.to(torch.int32)
        else:
            row_idx = torch.empty_like(order, dtype=torch.int32)
            row_idx[order] = torch.arange(order.numel(), dtype=torch.int32)
        counts = torch.bincount(flat, minlength=hi)[lo:hi]
        hist = torch.cumsum(counts, 0) if expert_tokens_num_type == 0 else counts
        return x[order // k], row_idx, hist.to(torch.int64), torch.empty(0)

    def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False,
                                restore_shape=None):
        record("npu_moe_token_unpermute", permuted_tokens=permuted_tokens, sorted_indices=sorted_indices,
               probs=probs, padded_mode=padded_mode, restore_shape=restore_shape)
        if permuted_tokens.dtype != torch.bfloat16 or (probs is not None and probs.dtype != torch.bfloat16):
            raise RuntimeError(f"npu_moe_token_unpermute: permuted_tokens {permuted_tokens.dtype}, probs "
                               f"{None if probs is None else probs.dtype}; the op documents bfloat16 for both")
        if sorted_indices.dtype not in (torch.int32, torch.int64):
            raise RuntimeError(f"npu_moe_token_unpermute: sorted_indices {sorted_indices.dtype}")
        k = 1 if probs is None else probs.shape[1]
        t = permuted_tokens.float()[sorted_indices.long()]                    # aclnn: T[k] = T[S[k]]
        if probs is not None:
            t = t * probs.reshape(-1, 1).float()
        return t.reshape(-1, k, t.shape[-1]).sum(1).to(torch.bfloat16)

    def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                              block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048,
                              sparse_mode=3, pre_tokens=2**63 - 1, next_tokens=2**63 - 1, return_value=False):
        record("npu_lightning_indexer", query=query, key=key, weights=weights,
               actual_seq_lengths_query=actual_seq_lengths_query, actual_seq_lengths_key=actual_seq_lengths_key,
               block_table=block_table, layout_query=layout_query, layout_key=layout_key,
               sparse_count=sparse_count, sparse_mode=sparse_mode, return_value=return_value)
        if layout_query != "BSND" or layout_key != "BSND":
            raise NotImplementedError("stand-in models BSND only")
        if weights.dtype not in (query.dtype, torch.float32):
            raise RuntimeError(f"npu_lightning_indexer: weights {weights.dtype} with query {query.dtype}; weights "
                               f"must be in the query's dtype (or float32)")
        b, s, _, _ = query.shape
        n = key.shape[1]
        dots = torch.einsum("bshd,bnd->bshn", query.float(), key[:, :, 0].float()).relu()
        score = torch.einsum("bsh,bshn->bsn", weights.float(), dots)
        lk = actual_seq_lengths_key.long() if actual_seq_lengths_key is not None else torch.full((b,), n)
        j = torch.arange(n)[None, None, :]
        i = torch.arange(s)[None, :, None]
        visible = j < lk[:, None, None]
        if sparse_mode == 3:
            visible &= j <= lk[:, None, None] - s + i
        score = score.masked_fill(~visible, float("-inf"))
        kk = min(sparse_count, n)
        vals, idx = score.topk(kk, dim=-1)
        idx = idx.masked_fill(torch.isinf(vals), -1)                  # valid entries first, -1 after (assumed)
        out = torch.full((b, s, 1, sparse_count), -1, dtype=torch.int32)
        out[:, :, 0, :kk] = idx.to(torch.int32)
        return out, torch.empty(0)

    def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
                                        actual_seq_lengths=None, actual_seq_lengths_kv=None, dequant_scale1=None,
                                        quant_scale1=None, dequant_scale2=None, quant_scale2=None,
                                        quant_offset2=None, antiquant_scale=None, antiquant_offset=None,
                                        block_table=None, query_padding_size=None, kv_padding_size=None,
                                        key_antiquant_scale=None, key_antiquant_offset=None,
                                        value_antiquant_scale=None, value_antiquant_offset=None,
                                        key_shared_prefix=None, value_shared_prefix=None,
                                        actual_shared_prefix_len=None, query_rope=None, key_rope=None,
                                        key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
                                        pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                        num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                        antiquant_mode=0, softmax_lse_flag=False, key_antiquant_mode=0,
                                        value_antiquant_mode=0):
        record("npu_fused_infer_attention_score", query=query, key=key, value=value, atten_mask=atten_mask,
               actual_seq_lengths=actual_seq_lengths, actual_seq_lengths_kv=actual_seq_lengths_kv,
               num_heads=num_heads, scale=scale, pre_tokens=pre_tokens, next_tokens=next_tokens,
               input_layout=input_layout, num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode,
               softmax_lse_flag=softmax_lse_flag)
        if input_layout != "BSND" or num_key_value_heads != 1:
            raise NotImplementedError("stand-in models BSND with one key/value head only")
        b, s, n, _ = query.shape
        ks = key.shape[1]
        logits = torch.einsum("bsnd,bkd->bnsk", query.float(), key[:, :, 0].float()) * scale
        j = torch.arange(ks)[None, None, None, :]
        if s == 1:
            lk = torch.tensor(actual_seq_lengths_kv if actual_seq_lengths_kv is not None else [ks] * b)
            allowed = j < lk[:, None, None, None]
        else:
            i = torch.arange(s)[None, None, :, None] + (ks - s)      # right-down aligned diagonal
            allowed = torch.ones_like(logits, dtype=torch.bool)
            if sparse_mode in (2, 3, 4):
                allowed = (j <= i + (next_tokens if sparse_mode == 4 else 0))
                if sparse_mode == 4:
                    allowed &= j >= i - pre_tokens
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(logits, -1, keepdim=True)               # [B, N, S, 1]
        out = torch.einsum("bnsk,bkd->bsnd", torch.exp(logits - lse), value[:, :, 0].float())
        return out.to(query.dtype), (lse if softmax_lse_flag else torch.zeros(1))

    impls = {fn.__name__: fn for fn in (npu_format_cast, npu_dynamic_quant, npu_dynamic_mx_quant, npu_grouped_matmul,
                                         npu_moe_init_routing_v2, npu_moe_token_unpermute, npu_lightning_indexer,
                                         npu_fused_infer_attention_score)}
    if facts is not None:
        from .fake_schemas import bind

        impls = bind(facts, impls)
        mod.facts = facts
    for name, fn in impls.items():
        if ops is None or name in ops:
            setattr(mod, name, fn)
    return mod
