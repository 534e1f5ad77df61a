"""tools/oracle_v41.py: the comparison, and (with DSV4RT_V41_OFFICIAL = the user's official ``inference/``
folder) the official model on CPU: import under both import spellings, the tiny released-format checkpoint,
strict loading, prefill/decode consistency, and dsv4rt against it in fp32."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest
import torch

import oracle_v41 as O

OFFICIAL = os.environ.get("DSV4RT_V41_OFFICIAL")
needs_official = pytest.mark.skipif(
    not OFFICIAL, reason="DSV4RT_V41_OFFICIAL (the official V4.1 inference/ folder) is not set: the oracle's runs "
                         "of the official model are SKIPPED")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_compare_verdicts():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 50, generator=g)
    same = O.compare(ref, ref.clone(), 1e-3, 1.0)
    assert same["verdict"] == "PASS" and same["worst_rel_max"] == 0 and same["agree_fraction"] == 1.0
    near = O.compare(ref, ref * (1 + 1e-5), 1e-3, 1.0)
    assert near["verdict"] == "PASS" and 0 < near["worst_rel_max"] < 2e-5
    bad = ref.clone()
    bad[3] += 0.05 * ref[3].abs().max()
    r = O.compare(ref, bad, 1e-3, 1.0)
    assert r["verdict"] == "FAIL" and r["rel_max"][3] > 1e-2 and max(r["rel_max"][:3]) == 0
    flip = ref.clone()
    flip[2] = -flip[2]
    r = O.compare(ref, flip, 10.0, 1.0)
    assert r["verdict"] == "FAIL" and r["argmax_agree"][2] is False and r["agree_fraction"] == 5 / 6
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert O.compare(ref, nan, 10.0, 0.0)["verdict"] == "FAIL"
    with pytest.raises(ValueError, match="shapes differ"):
        O.compare(ref, ref[:5], 1e-3, 1.0)
    text = O.report(r, 2)
    assert "prefill" in text and "decode" in text and text.splitlines()[-1].startswith("FAIL")


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit):
        O.main(["--inference", "nowhere"])
    assert "--checkpoint is required" in capsys.readouterr().err


# ---- with the official inference/ folder -----------------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    from oracle_v41_official import import_official

    return import_official(OFFICIAL)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, official):
    from oracle_v41_tiny import make_tiny

    out = str(tmp_path_factory.mktemp("tiny_v41"))
    return out, make_tiny(official, out, seed=0)


@needs_official
def test_both_import_spellings(tmp_path, official):
    """The upstream folder imports ``from kernel import`` / ``from engram import``; the vendored copy uses
    package-relative imports of ``.kernel_cpu``. Both resolve to the oracle's kernel module."""
    import oracle_v41_kernels as shim
    from oracle_v41_official import import_official

    assert official.sparse_attn is shim.sparse_attn and official.act_quant is shim.act_quant
    up = tmp_path / "upstream"
    up.mkdir()
    for name in ("model.py", "engram.py", "vision.py", "image_processor.py"):
        src = open(os.path.join(OFFICIAL, name), encoding="utf-8").read()
        src = re.sub(r"^from \.kernel_cpu import", "from kernel import", src, flags=re.M)
        src = re.sub(r"^from \.(engram|vision|image_processor) import", r"from \1 import", src, flags=re.M)
        (up / name).write_text(src, encoding="utf-8")
    assert "from kernel import" in (up / "model.py").read_text(encoding="utf-8")
    mod = import_official(str(up))
    assert mod.fp4_gemm is shim.fp4_gemm and mod.EngramLayout.__module__.endswith(".engram")
    assert "kernel" not in sys.modules or sys.modules["kernel"] is not shim
    with pytest.raises(FileNotFoundError, match="not the official"):
        import_official(str(tmp_path))


@needs_official
def test_tiny_checkpoint_names_and_config(tiny, official):
    from oracle_v41_official import build, model_args

    path, names = tiny
    cfg = json.load(open(os.path.join(path, "config.json")))
    args, notes = model_args(official, cfg, 64)
    assert notes == []
    assert (args.dim, args.n_layers, args.n_mtp_layers, args.kv_source_layers, args.index_source_layers) == \
        (256, 6, 2, (1, 3), (1, 3, 4))
    assert (args.candidate_source_layer, args.engram_pad_id, args.dspark_n_activated_experts) == (3, 2, 2)
    assert (args.original_seq_len, args.rope_factor, args.window_size, args.dtype) == (65536, 16, 128, "fp8")
    assert args.engram_compressed_vocab_size == 230
    model = build(official, args, os.path.join(path, "tokenizer.json"), "release")
    params = dict(model.named_parameters())
    written = {n: (s, d) for n, s, d in names}
    assert set(params) <= set(written)
    assert set(written) - set(params) == {n for n in written if n.endswith(".gate.bias_vl")}
    for n, p in params.items():
        assert tuple(p.shape) == written[n][0], n
    kinds = {d for _, d in written.values()}
    assert kinds == {"F8_E4M3", "F8_E8M0", "I8", "BF16", "F32"}
    assert written["layers.1.attn.compressor.wgate.weight"][1] == "BF16"
    assert "layers.3.attn.compressor.wgate.weight" not in written            # ratio 1: no gate
    assert "layers.2.attn.compressor.wkv.weight" not in written              # reader: no compressor
    assert "layers.4.attn.indexer.wk.weight" not in written                  # index source, not a key owner
    assert "mtp.0.main_proj.weight" in written and "mtp.1.markov_head.head.weight" in written


@needs_official
def test_loading_is_strict(tiny, tmp_path, official):
    from safetensors.torch import load_file, save_file

    from oracle_v41_official import build, load_weights, model_args

    path, _ = tiny
    cfg = json.load(open(os.path.join(path, "config.json")))
    args, _ = model_args(official, cfg, 64)
    tensors = load_file(os.path.join(path, "model-00001-of-00001.safetensors"))
    for mutate, err in ((lambda t: t.pop("layers.2.attn.wkv.scale"), "layers.2.attn.wkv.scale"),
                        (lambda t: t.update({"layers.0.bogus": torch.zeros(2)}), "layers.0.bogus")):
        d = tmp_path / err
        d.mkdir()
        shutil.copy(os.path.join(path, "config.json"), d)
        t = dict(tensors)
        mutate(t)
        save_file(t, str(d / "model.safetensors"))
        with pytest.raises(KeyError, match=re.escape(err)):
            load_weights(build(official, args, os.path.join(path, "tokenizer.json"), "release"), str(d))


@needs_official
def test_official_prefill_and_decode_agree_in_fp32(tiny):
    """With every index-key owner publishing its own keys, the official decode steps reproduce a single
    prefill's logits; as released, the ratio-2 indexer reads another layer's keys on even decode steps."""
    path, _ = tiny
    tokens = O.token_ids(48, 259, 1)
    full = O.run_official(OFFICIAL, path, tokens, 48, "fp32")
    notes: list[str] = []
    dec = O.run_official(OFFICIAL, path, tokens, 24, "fp32", notes)
    assert any("publish their own key cache" in n for n in notes)
    r = O.compare(full, dec, 1e-4, 1.0)
    assert r["verdict"] == "PASS", r["rel_max"]
    stale = O.run_official(OFFICIAL, path, tokens, 24, "fp32", as_released=True)
    rs = O.compare(full, stale, 1e-4, 1.0)
    assert max(rs["rel_max"][:24]) < 1e-4                                     # prefill is the same
    assert max(rs["rel_max"][24::2]) > 1e-3                                   # even decode positions are not


@needs_official
def test_release_mode_runs_the_quantised_model(tiny):
    path, _ = tiny
    tokens = O.token_ids(20, 259, 2)
    rel = O.run_official(OFFICIAL, path, tokens, 10, "release")
    f32 = O.run_official(OFFICIAL, path, tokens, 10, "fp32")
    again = O.run_official(OFFICIAL, path, tokens, 10, "release")
    assert torch.isfinite(rel).all() and torch.equal(rel, again)              # deterministic
    d = float((rel - f32).abs().max())
    assert 1e-3 * float(f32.abs().max()) < d < float(f32.abs().max())        # rounding-size, not garbage


@needs_official
def test_dsv4rt_matches_the_official_model_in_fp32(tiny, capsys):
    path, _ = tiny
    rc = O.main(["--inference", OFFICIAL, "--checkpoint", path, "--tokens", "40", "--prefill", "20",
                 "--precision", "fp32", "--no-floor"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("PASS")
