"""Compare dsv4rt's DeepSeek-V4.1 logits with the official inference code's, position by position, on CPU.

    python tools/oracle_v41.py --inference DIR --checkpoint CKPT [--tokens N] [--precision fp32|release]
    python tools/oracle_v41.py --inference DIR --make-tiny OUT     # a tiny released-format checkpoint

``DIR`` is the user's local copy of the official ``inference/`` folder (model.py, engram.py, ...; nothing of it
is copied into the project, nothing is fetched); its TileLang ``kernel`` module is replaced by
tools/oracle_v41_kernels.py. ``CKPT`` is a checkpoint in the released format (config.json with a nested
text_config, safetensors under the official parameter names, tokenizer.json for the Engram token map).

Both models run a teacher-forced sequence of ``N`` seeded token ids (bos first): a prefill of the first ``P``
(default N // 2; the official forward with its head made to return every position's logits), then one decode
step per token at start_pos = P, P+1, ... as the reference's generate does. Per position: the max relative
error ``max|d| / max|ref|`` and the mean relative error ``mean|d| / mean|ref|`` of dsv4rt's logits against
the official ones, and whether the argmaxes agree. PASS when every position's max relative error is within
``--bound`` and the argmax agreement is at least ``--min-agree``. Unless ``--no-floor``, a second official run
with float64-accumulated GEMM and attention products reports the noise floor: how far the same semantics move
under last-bit summation differences (so a FAIL can be told from chaos).

Decode. The released model.py publishes an index-key owner's key cache (``shared_attn.index_k``) only on steps
where its compressor emits a latent; on the other decode steps (ratio 2: even positions) a ratio-2 indexer
reads the keys the last owner of the previous forward left in the slot (the ratio-1 source's). Prefill never
does. By default the oracle makes each owner publish its own cache on every step (so decode reproduces prefill,
checked in the tests); ``--as-released-decode`` runs the release's behaviour unchanged.

Precision. ``release``: the official code as released (torch default dtype bf16, FP8 weights and activations
in 32-blocks, FP4 experts, FP8 window KV, FP4 compressed KV and indexer, bf16 probabilities in sparse_attn),
against dsv4rt's defaults. ``fp32``: the official code at default dtype fp32 with ``dtype="bf16"`` and no
expert dtype (so no Linear is quantised: FP8/FP4 weights are dequantised exactly to fp32 at load and the
bf16-fixed Linears are made fp32); the kernel module's in-place KV / indexer quantise-dequantise calls are
identity and sparse_attn stays fp32; against dsv4rt with dtype fp32, quant=False, precision="fp32". What the
official code does not let fp32 mode change: the Engram row lookup is cast to bf16 (exact: an E4M3 value times
a power of two is a bf16 value), and the selection structure (window, top-k, candidate blocks) is the same.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import oracle_v41_kernels as shim  # noqa: E402
from oracle_v41_official import (FP32_NOTES, build, import_official, load_weights, model_args,  # noqa: E402
                                 publish_index_keys)

BOUNDS = {"fp32": (1e-3, 1.0), "release": (5e-2, 0.9)}
"""Default (max relative error per position, argmax agreement) for a PASS, per precision."""


def token_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, n), generator=g)
    ids[0, 0] = 0
    return ids


def _config(ckpt: str) -> dict[str, Any]:
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def run_official(inference: str, ckpt: str, tokens: torch.Tensor, prefill: int, precision: str,
                 notes: list[str] | None = None, as_released: bool = False, alt_order: bool = False) -> torch.Tensor:
    """fp32 logits [N, V] of the official model (fresh import: its module state is per model). Unless
    ``as_released``, the index-key owners publish their own keys on every step (publish_index_keys)."""
    notes = notes if notes is not None else []
    official = import_official(inference)
    shim.MODE, shim.ALT_ORDER = precision, alt_order
    args, n1 = model_args(official, _config(ckpt), max_seq_len=tokens.size(1), precision=precision)
    tok = os.path.join(ckpt, "tokenizer.json")
    if args.engram_layer_ids and not os.path.isfile(tok):
        raise FileNotFoundError(f"{ckpt}: no tokenizer.json (the official Engram token map needs it)")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    saved = torch.get_default_dtype()
    try:
        model = build(official, args, tok if os.path.isfile(tok) else None, precision)
        notes += n1 + load_weights(model, ckpt, vision=args.vision_n_layers > 0)
        if precision == "fp32":
            notes.append(FP32_NOTES)
        if not as_released and prefill < tokens.size(1):
            n = publish_index_keys(official, model)
            notes.append(f"decode: {n} index-key owners publish their own key cache on every step (the release "
                         f"leaves the previous owner's keys in shared_attn.index_k on steps without a new latent; "
                         f"--as-released-decode keeps that)")
        head = model.head.forward
        torch.set_default_dtype(dtype)
        model.head.forward = lambda x, full_logits=False: head(x, True)  # every prefill position's logits
        out = [model(tokens[:, :prefill], 0)[1][0]]
        model.head.forward = head
        for i in range(prefill, tokens.size(1)):
            out.append(model(tokens[:, i:i + 1], i)[1].reshape(1, -1))
    finally:
        torch.set_default_dtype(saved)
        shim.MODE, shim.ALT_ORDER = "release", False
    return torch.cat(out).float()


def run_dsv4rt(ckpt: str, tokens: torch.Tensor, prefill: int, precision: str) -> torch.Tensor:
    """fp32 logits [N, V] of dsv4rt on the same checkpoint and schedule."""
    from dsv4rt.model import Checkpoint, Transformer

    ck = Checkpoint(ckpt)
    kw = dict(dtype=torch.float32, quant=False, precision="fp32") if precision == "fp32" else {}
    model = Transformer(ck.cfg, ck, **kw)
    cache = model.new_cache(1, tokens.size(1))
    out = [model.forward(tokens[:, :prefill], cache, all_logits=True)[0]]
    for i in range(prefill, tokens.size(1)):
        out.append(model.forward(tokens[:, i:i + 1], cache).reshape(1, -1))
    return torch.cat(out).float()


def compare(ref: torch.Tensor, got: torch.Tensor, bound: float, min_agree: float) -> dict[str, Any]:
    """Per-position errors of ``got`` against ``ref`` ([N, V] each) and the verdict."""
    if ref.shape != got.shape:
        raise ValueError(f"logits shapes differ: official {tuple(ref.shape)}, dsv4rt {tuple(got.shape)}")
    d = (got.double() - ref.double()).abs()
    r = ref.double().abs()
    rel_max = (d.amax(-1) / r.amax(-1).clamp_min(1e-30)).tolist()
    rel_mean = (d.mean(-1) / r.mean(-1).clamp_min(1e-30)).tolist()
    agree = (got.argmax(-1) == ref.argmax(-1)).tolist()
    finite = bool(torch.isfinite(got).all() and torch.isfinite(ref).all())
    frac = sum(agree) / len(agree)
    ok = finite and max(rel_max) <= bound and frac >= min_agree
    return {"rel_max": rel_max, "rel_mean": rel_mean, "argmax_agree": agree, "agree_fraction": frac,
            "worst_rel_max": max(rel_max), "mean_rel_mean": sum(rel_mean) / len(rel_mean), "finite": finite,
            "bound": bound, "min_agree": min_agree, "verdict": "PASS" if ok else "FAIL"}


def report(res: dict[str, Any], prefill: int) -> str:
    lines = ["pos  phase    max_rel     mean_rel    argmax"]
    for i, (a, b, c) in enumerate(zip(res["rel_max"], res["rel_mean"], res["argmax_agree"])):
        lines.append(f"{i:4d} {'prefill' if i < prefill else 'decode ':7s}  {a:.3e}  {b:.3e}  {'ok' if c else 'DIFF'}")
    lines.append(f"{res['verdict']}: worst max_rel {res['worst_rel_max']:.3e} (bound {res['bound']:.1e}), mean "
                 f"rel {res['mean_rel_mean']:.3e}, argmax agreement {res['agree_fraction']:.3f} "
                 f"(needs {res['min_agree']:.2f}){'' if res['finite'] else ', NON-FINITE logits'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)  # several threads on a shared CPU slow these small ops twentyfold
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inference", required=True, help="the official inference/ folder (model.py, engram.py, ...)")
    ap.add_argument("--checkpoint", help="a released-format checkpoint folder")
    ap.add_argument("--make-tiny", metavar="OUT", help="write a tiny released-format checkpoint to OUT and exit")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prefill", type=int, help="prefill length (default tokens // 2)")
    ap.add_argument("--precision", choices=("fp32", "release"), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bound", type=float, help="max relative error allowed per position")
    ap.add_argument("--min-agree", type=float, help="argmax agreement needed (fraction)")
    ap.add_argument("--as-released-decode", action="store_true",
                    help="run the official decode steps exactly as released (stale index keys, see the notes)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the second official run that measures the summation-order noise floor")
    ap.add_argument("--json", help="also write the per-position results to this file")
    a = ap.parse_args(argv)
    if a.make_tiny:
        from oracle_v41_tiny import make_tiny

        names = make_tiny(import_official(a.inference), a.make_tiny, a.seed)
        print(f"wrote {len(names)} tensors, config.json and tokenizer.json to {a.make_tiny}")
        return 0
    if not a.checkpoint:
        ap.error("--checkpoint is required (or --make-tiny OUT)")
    if a.tokens < 2:
        ap.error("--tokens must be at least 2")
    prefill = a.prefill if a.prefill is not None else max(1, a.tokens // 2)
    if not 1 <= prefill <= a.tokens:
        ap.error(f"--prefill must be in 1..{a.tokens}")
    vocab = _config(a.checkpoint).get("text_config", _config(a.checkpoint)).get("vocab_size", 259)
    tokens = token_ids(a.tokens, int(vocab), a.seed)
    notes: list[str] = []
    ref = run_official(a.inference, a.checkpoint, tokens, prefill, a.precision, notes, a.as_released_decode)
    for n in notes:
        print(f"note: {n}")
    try:
        got = run_dsv4rt(a.checkpoint, tokens, prefill, a.precision)
    except Exception as exc:  # the candidate failing is a result, not a crash of the oracle
        print(f"FAIL: dsv4rt could not run this checkpoint: {type(exc).__name__}: {exc}")
        return 2
    bound, agree = BOUNDS[a.precision]
    res = compare(ref, got, a.bound if a.bound is not None else bound, a.min_agree if a.min_agree is not None
                  else agree)
    print(report(res, prefill))
    if not a.no_floor:
        alt = run_official(a.inference, a.checkpoint, tokens, prefill, a.precision, [], a.as_released_decode, True)
        fl = compare(ref, alt, res["bound"], res["min_agree"])
        res["floor"] = {k: fl[k] for k in ("rel_max", "worst_rel_max", "mean_rel_mean", "agree_fraction")}
        print(f"noise floor (the official model against itself with float64-accumulated GEMM / attention "
              f"products): worst max_rel {fl['worst_rel_max']:.3e}, mean rel {fl['mean_rel_mean']:.3e}, argmax "
              f"agreement {fl['agree_fraction']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(res, precision=a.precision, tokens=tokens.tolist(), prefill=prefill), f, indent=1)
    return 0 if res["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
