"""Checkpoint writing and reading in the released format, and every malformed input raising
CheckpointError that names the tensor or the file."""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch

from dsv4rt.errors import CheckpointError
from dsv4rt.model.checkpoint import INDEX_NAME, Checkpoint, write_checkpoint
from dsv4rt.model.shard import ShardFile, write_shard
from dsv4rt.model.schema import checkpoint_schema


@pytest.fixture(scope="module")
def tensors(tiny_ckpt):
    return {n: tiny_ckpt.get(n).clone() for n in tiny_ckpt.names()}


def _write(path, cfg, tensors, **kw):
    return write_checkpoint(path, cfg, list(tensors.items()), **kw)


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int16 if
                                                                                              t.element_size() == 2 else torch.int32 if t.element_size() == 4 else torch.int64)


def test_released_layout_and_dtypes(tiny_dir, tiny_ckpt):
    files = sorted(os.listdir(tiny_dir))
    assert INDEX_NAME in files and "config.json" in files
    assert sum(f.startswith("model-") and f.endswith(".safetensors") for f in files) >= 2   # sharded
    e = tiny_ckpt.entry
    assert (e("layers.0.ffn.experts.3.w1.weight").dtype, e("layers.0.ffn.experts.3.w1.scale").dtype) == ("I8", "F8_E8M0")
    assert e("layers.0.ffn.experts.3.w1.weight").shape == (128, 128)
    assert e("layers.0.ffn.experts.3.w1.scale").shape == (128, 8)
    assert (e("layers.1.attn.wq_b.weight").dtype, e("layers.1.attn.wq_b.scale").dtype) == ("F8_E4M3", "F8_E8M0")
    assert e("layers.0.ffn.gate.tid2eid").dtype == "I64" and e("hc_head_fn").dtype == "F32"
    assert e("layers.1.attn.compressor.wkv.weight").dtype == "BF16"


def test_write_read_round_trip(tmp_path, tiny_ckpt, tensors):
    out = _write(tmp_path / "ck", tiny_ckpt.cfg, tensors, max_shard_bytes=1 << 20)
    again = Checkpoint(out)
    assert again.cfg == tiny_ckpt.cfg and set(again.names()) == set(tensors)
    assert len(again.files) > 2
    for name, t in tensors.items():
        u = again.get(name)
        assert u.dtype == t.dtype and u.shape == t.shape and torch.equal(_bits(u), _bits(t)), name


def test_interoperates_with_the_safetensors_package(tmp_path, tensors):
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    some = {n: tensors[n] for n in ("embed.weight", "layers.0.ffn.experts.0.w1.weight",
                                    "layers.0.ffn.experts.0.w1.scale", "layers.1.attn.wq_b.weight",
                                    "layers.0.ffn.gate.tid2eid", "hc_head_scale")}
    write_shard(str(tmp_path / "ours.safetensors"), some.items())
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        for n, t in some.items():
            assert torch.equal(_bits(f.get_tensor(n)), _bits(t)), n
    st.save_file(some, str(tmp_path / "theirs.safetensors"))
    ours = ShardFile(str(tmp_path / "theirs.safetensors"))
    for n, t in some.items():
        assert torch.equal(_bits(ours.get(n)), _bits(t)), n


def test_single_file_without_index(tmp_path, tiny_ckpt, tensors):
    root = tmp_path / "single"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(tiny_ckpt.cfg.to_hf_dict()))
    write_shard(str(root / "model.safetensors"), tensors.items())
    assert Checkpoint(root).get("norm.weight").shape == (256,)


# ---- malformed checkpoints -------------------------------------------------------------------------

def _mutated(tmp_path, cfg, tensors, drop=(), add=None, change=None):
    t = {k: v for k, v in tensors.items() if k not in drop}
    t.update(add or {})
    t.update(change or {})
    return _write(tmp_path / "bad", cfg, t, max_shard_bytes=2 << 20)


@pytest.mark.parametrize("case,match", [
    ("missing", "missing tensor 'layers.2.attn.compressor.ape'"),
    ("extra", "unexpected tensor 'layers.9.attn.wq_a.weight'"),
    ("shape", "tensor 'layers.1.attn.wq_b.scale' is F8_E8M0 \\[4, 1\\], expected F8_E8M0 \\[8, 1\\]"),
    ("dtype", "tensor 'layers.0.ffn.experts.1.w2.weight' is U8"),
    ("fp32_scale_dtype", "tensor 'layers.1.attn.wkv.scale' is F32"),
])
def test_header_errors_name_the_tensor(tmp_path, tiny_ckpt, tensors, case, match):
    t = tensors
    kw = {"missing": dict(drop=["layers.2.attn.compressor.ape"]),
          "extra": dict(add={"layers.9.attn.wq_a.weight": torch.zeros(2, 2)}),
          "shape": dict(change={"layers.1.attn.wq_b.scale": t["layers.1.attn.wq_b.scale"][:4].contiguous()}),
          "dtype": dict(change={"layers.0.ffn.experts.1.w2.weight": t["layers.0.ffn.experts.1.w2.weight"].view(torch.uint8)}),
          "fp32_scale_dtype": dict(change={"layers.1.attn.wkv.scale": t["layers.1.attn.wkv.scale"].float()}),
          }[case]
    root = _mutated(tmp_path, tiny_ckpt.cfg, t, **kw)
    with pytest.raises(CheckpointError, match=match) as err:
        Checkpoint(root)
    assert os.path.basename(root) in str(err.value) or "model-" in str(err.value)


@pytest.mark.parametrize("case,name,match", [
    ("e8m0_nan", "layers.0.ffn.experts.2.w3.scale", "non-finite scale"),
    ("fp8_scale_nan", "layers.3.attn.wo_b.scale", "non-finite scale"),
    ("fp32_inf", "layers.2.hc_attn_fn", "non-finite value"),
    ("bf16_nan", "layers.1.attn.kv_norm.weight", "non-finite value"),
    ("bf16_neg_inf", "layers.1.attn.kv_norm.weight", "non-finite value"),
    ("fp8_weight_nan", "layers.1.attn.wq_b.weight", "NaN FP8 code"),
    ("tid2eid", "layers.1.ffn.gate.tid2eid", "expert id outside"),
])
def test_value_errors_name_the_tensor(tmp_path, tiny_ckpt, tensors, build, case, name, match):
    bad = tensors[name].clone()
    if case in ("e8m0_nan", "fp8_scale_nan"):
        bad.view(torch.uint8)[0, -1] = 255
    elif case == "fp8_weight_nan":
        bad.view(torch.uint8).view(-1)[-3] = 0xFF   # -NaN: sign bit set
    elif case == "bf16_neg_inf":
        bad.view(-1)[-1] = float("-inf")
    elif case == "tid2eid":
        bad[7, 1] = tiny_ckpt.cfg.n_routed_experts
    else:
        bad.view(-1)[5] = float("inf") if case == "fp32_inf" else float("nan")
    ck = Checkpoint(_mutated(tmp_path, tiny_ckpt.cfg, tensors, change={name: bad}))
    with pytest.raises(CheckpointError, match=match) as err:
        build(ck)
    assert repr(name) in str(err.value)


def test_truncated_shard(tmp_path, tiny_ckpt, tensors):
    root = _mutated(tmp_path, tiny_ckpt.cfg, tensors)
    shard = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))[-1]
    path = os.path.join(root, shard)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="truncated") as err:
        Checkpoint(root)
    assert shard in str(err.value)
    os.truncate(path, 5)
    with pytest.raises(CheckpointError, match=shard):
        Checkpoint(root)


def _edit_index(root, fn):
    with open(os.path.join(root, INDEX_NAME)) as f:
        idx = json.load(f)
    fn(idx["weight_map"])
    with open(os.path.join(root, INDEX_NAME), "w") as f:
        json.dump(idx, f)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_outside_the_directory(tmp_path, tiny_ckpt, tensors, target):
    root = _mutated(tmp_path, tiny_ckpt.cfg, tensors)
    shutil.copy(os.path.join(root, sorted(os.listdir(root))[1]), tmp_path / "outside.safetensors")
    _edit_index(root, lambda m: m.__setitem__("norm.weight", target))
    with pytest.raises(CheckpointError, match="norm.weight") as err:
        Checkpoint(root)
    assert target in str(err.value)


def test_index_inconsistencies(tmp_path, tiny_ckpt, tensors):
    root = _mutated(tmp_path, tiny_ckpt.cfg, tensors)
    shards = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
    _edit_index(root, lambda m: m.__setitem__("norm.weight", "model-00099-of-00099.safetensors"))
    with pytest.raises(CheckpointError, match="'norm.weight'.*does not exist"):
        Checkpoint(root)
    other = [s for s in shards if "norm.weight" not in ShardFile(os.path.join(root, s)).entries][0]
    _edit_index(root, lambda m: m.__setitem__("norm.weight", other))
    with pytest.raises(CheckpointError, match=f"{other}: tensor 'norm.weight' is listed in the index"):
        Checkpoint(root)
    with open(os.path.join(root, INDEX_NAME), "w") as f:
        f.write("{")
    with pytest.raises(CheckpointError, match=INDEX_NAME):
        Checkpoint(root)


def test_corrupt_header(tmp_path, tiny_ckpt, tensors):
    root = _mutated(tmp_path, tiny_ckpt.cfg, tensors)
    shard = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))[0]
    path = os.path.join(root, shard)
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"[" + b" " * (n - 1)
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard}: safetensors header is not valid JSON"):
        Checkpoint(root)


def test_duplicate_tensor_across_files(tmp_path, tiny_ckpt, tensors):
    root = tmp_path / "dup"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(tiny_ckpt.cfg.to_hf_dict()))
    write_shard(str(root / "a.safetensors"), tensors.items())
    write_shard(str(root / "b.safetensors"), [("norm.weight", tensors["norm.weight"])])
    with pytest.raises(CheckpointError, match="b.safetensors: tensor 'norm.weight' is also in"):
        Checkpoint(root)


def test_no_weights(tmp_path, tiny_ckpt):
    (tmp_path / "config.json").write_text(json.dumps(tiny_ckpt.cfg.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint(tmp_path)


# ---- expert formats ------------------------------------------------------------------------------

def test_lossless_fp4_to_fp8_conversion_at_load(tiny_ckpt, build):
    toks = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(1))
    fp4 = build(tiny_ckpt, dtype=torch.float32)
    fp8 = build(tiny_ckpt, dtype=torch.float32, convert_fp4=True)
    assert fp4.layers[0].ffn.experts.kind == "fp4" and fp8.layers[0].ffn.experts.kind == "fp8"
    a = fp4.forward(toks, fp4.new_cache(), all_logits=True)
    b = fp8.forward(toks, fp8.new_cache(), all_logits=True)
    assert torch.allclose(a, b, atol=1e-3, rtol=0), float((a - b).abs().max())
    assert "fp4_grouped_gemm" not in fp8.ops.used()


def test_fp8_expert_checkpoint_is_detected(tmp_path, tiny_ckpt, tensors, build):
    """A -Base style checkpoint (FP8 experts, float32 block scales) is recognised from its headers."""
    from dsv4rt.formats import dequant_mxfp4, quant_fp8_block

    cfg8 = tiny_ckpt.cfg.replace(expert_dtype="fp8")
    t = dict(tensors)
    for name, spec in checkpoint_schema(cfg8).items():
        if ".experts." in name and name.endswith(".weight"):
            base = name[:-len(".weight")]
            w = dequant_mxfp4(tensors[name], tensors[base + ".scale"])
            w8, s = quant_fp8_block(w)
            t[name], t[base + ".scale"] = w8, torch.exp2(s.float() - 127)
    root = _write(tmp_path / "fp8", tiny_ckpt.cfg, t)   # config.json still says fp4
    ck = Checkpoint(root)
    assert ck.cfg.expert_dtype == "fp8"
    model = build(ck, dtype=torch.float32)
    out = model.forward(torch.tensor([[0, 50, 60, 70]]), model.new_cache())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype,bits,field,bad", [
    (torch.float8_e4m3fn, torch.uint8, 0x7F, 0x7F), (torch.float8_e4m3fn, torch.uint8, 0x7F, 0xFF),
    (torch.float8_e8m0fnu, torch.uint8, 0xFF, 0xFF), (torch.bfloat16, torch.int16, 0x7F80, -128),
    (torch.float32, torch.int32, 0x7F800000, 0x7FC00000),
])
def test_value_scan_finds_a_bad_code_in_every_step(monkeypatch, dtype, bits, field, bad):
    """The load-time scan walks the tensor a step at a time: a bad code in the first, a middle or the last
    (partial) step is found, and a tensor of every other code passes."""
    from dsv4rt.model import checkpoint as ckmod
    monkeypatch.setattr(ckmod, "_SCAN", 64)
    g = torch.Generator().manual_seed(7)
    n = 64 * 5 + 17
    raw = torch.randint(0, 256, (n * (torch.tensor([], dtype=bits).element_size()),), generator=g, dtype=torch.uint8)
    t = raw.view(bits)
    low = torch.tensor(field & -field, dtype=bits)
    t = torch.where((t & field) == field, t ^ low, t)   # random codes, none with the whole field set
    t = t.view(dtype).reshape(1, n)
    assert not ckmod._all_ones_somewhere(t, bits, field)
    for i in (0, 64 * 2 + 5, n - 1):
        u = t.clone()
        u.view(bits).view(-1)[i] = bad
        assert ckmod._all_ones_somewhere(u, bits, field), i
