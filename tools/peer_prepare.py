"""Make a dsv4rt synthetic checkpoint loadable by llama.cpp's converter (used by tools/peer_bench.sh).

``python tools/peer_prepare.py CKPT_DIR`` adds what the converter reads besides config.json and the
safetensors: a ``tokenizer.json`` and a ``tokenizer_config.json``. The presets ship no tokenizer (they use
a byte tokenizer built in); the converter needs a Hugging Face one. At the released vocabulary size
(129,280: flash-slice) the tokenizer is the released V4 layout of tests/serve/v4_tokenizer.py (control
tokens at their released ids); below it (tiny: 259 ids) it is the same byte-level layout cut to the model's
vocabulary: ids 0 / 1 / 2 = BOS / EOS / pad, then the 256 bytes (byte b -> id b + 3, as the presets'
byte tokenizer). llama.cpp also needs at least one BPE merge: ``a a -> aa`` takes the id of byte 0xFF (which
no UTF-8 text contains). Weights and config.json are not touched.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layout():
    """tests/serve/v4_tokenizer.py (the V4 layout), loaded by path: tools/ is not a package."""
    path = os.path.join(ROOT, "tests", "serve", "v4_tokenizer.py")
    spec = importlib.util.spec_from_file_location("v4_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _byte_tokenizer(path: str, size: int, lay) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    special = {t: i for t, i in lay.V4_IDS.items() if i < lay.BYTE_OFFSET}
    vocab = dict(special)
    vocab.update({c: b + lay.BYTE_OFFSET for b, c in enumerate(lay._byte_chars())})
    if len(vocab) != size:
        raise SystemExit(f"peer_prepare: vocabulary {size}: expected {len(vocab)} (3 specials + 256 bytes) "
                         f"or the released {lay.VOCAB}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in special])
    tok.save(path)


def _one_merge(path: str, lay) -> None:
    """llama.cpp refuses a BPE vocabulary without merges ("cannot find tokenizer merges"): give the
    tokenizer one, ``a a -> aa``, in the slot of byte 0xFF, which no UTF-8 text contains."""
    from tokenizers import Tokenizer

    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    slot = vocab.pop(lay._byte_chars()[0xFF])
    vocab["aa"] = slot
    tj["model"]["merges"] = [["a", "a"]]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    ids = Tokenizer.from_file(path).encode("aab").ids
    if ids != [slot, ord("b") + lay.BYTE_OFFSET]:
        raise SystemExit(f"peer_prepare: the merge did not take: 'aab' -> {ids}")


def prepare(ckpt: str) -> None:
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    size = cfg.get("text_config", cfg)["vocab_size"]
    lay = _layout()
    path = os.path.join(ckpt, "tokenizer.json")
    if size == lay.VOCAB:
        lay.build_tokenizer_json(path, lay.V4_IDS, size)
    else:
        _byte_tokenizer(path, size, lay)
    _one_merge(path, lay)
    names = {i: t for t, i in lay.V4_IDS.items()}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[0], "eos_token": names[1],
          "pad_token": names[2], "add_bos_token": True, "add_eos_token": False, "model_max_length": 1 << 20}
    with open(os.path.join(ckpt, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, ensure_ascii=False, indent=1)
    print(f"peer_prepare: {ckpt}: tokenizer.json ({size} ids) and tokenizer_config.json written")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/peer_prepare.py CKPT_DIR")
    prepare(sys.argv[1])
