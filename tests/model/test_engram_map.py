"""The Engram token-class map (runtime/model/engram_map.py) on real tokenizers built with ``tokenizers``."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

tokenizers = pytest.importorskip("tokenizers")

from dsv4rt.errors import CheckpointError  # noqa: E402
from dsv4rt.model.engram_map import (BYTE_SPECIALS, check_class_count, engram_token_map,  # noqa: E402
                                     write_byte_tokenizer_json)
from dsv4rt.model.tokenizer import ByteTokenizer  # noqa: E402

OFFICIAL = os.environ.get("DSV4RT_V41_OFFICIAL")
"""A folder holding the official V4.1 ``engram.py`` (the user's ``inference/``): enables the cross-check."""


@pytest.fixture(scope="module")
def byte_json(tmp_path_factory):
    return write_byte_tokenizer_json(tmp_path_factory.mktemp("bytetok"))


def test_byte_tokenizer_json_matches_the_byte_tokenizer(byte_json):
    tok = tokenizers.Tokenizer.from_file(byte_json)
    assert tok.get_vocab_size(with_added_tokens=True) == 259
    for i, name in enumerate(BYTE_SPECIALS):
        assert tok.token_to_id(name) == i
    text = "Héllo, wörld!\n\t\u00a0z\x00\x7f"
    assert [0] + tok.encode(text).ids == ByteTokenizer().encode(text)
    assert tok.decode(ByteTokenizer().encode(text)[1:]) == text


def test_byte_map_classes(byte_json):
    m, n = engram_token_map(byte_json)
    assert m.dtype.is_floating_point is False and m.shape == (259,)
    b = lambda c: ord(c) + 3  # noqa: E731
    assert m[:3].tolist() == [0, 1, 2]                         # specials first, in id order
    assert m[b("A")] == m[b("a")] and m[b("Z")] == m[b("z")]   # Lowercase
    assert len({int(m[b(c)]) for c in " \t\n\r"}) == 1         # whitespace runs -> one space, kept
    assert m[b("\x0b")] != m[b(" ")] and m[b("\x0c")] != m[b("\x0b")]  # stripped to '' -> keyed by raw text
    high = m[0x80 + 3:0x100 + 3]
    assert len(set(high.tolist())) == 128                      # partial UTF-8 bytes keyed by their token string
    # 3 specials + 128 ASCII - 26 case pairs - 3 whitespace merges + 128 partial bytes
    assert n == 3 + 128 - 26 - 3 + 128 == int(m.max()) + 1
    ids = sorted(set(m.tolist()))
    assert ids == list(range(n))                               # dense, first-appearance numbering
    seen = -1
    for c in m.tolist():                                       # a new class is always the next number
        assert c <= seen + 1
        seen = max(seen, c)


def _bpe_tokenizer(tmp_path):
    """A small trained byte-level BPE plus added tokens, with case, accent, NFKC and whitespace variants."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = ["The", " The", "the", " the", "THE", "café", "cafe", "Café", "ﬁne", "fine", "   ", " ", "\n\n",
             "naïve", "日本語", "Straße"]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(BYTE_SPECIALS), show_progress=False)
    tok.train_from_iterator(words * 50, trainer)
    tok.add_tokens([AddedToken("<｜User｜>", normalized=False, special=False)])
    path = str(tmp_path / "bpe.json")
    tok.save(path)
    return tokenizers.Tokenizer.from_file(path), path


def _key_of(tok, m, text):
    ids = tok.encode(text).ids
    assert len(ids) == 1, (text, ids)
    return int(m[ids[0]])


def test_bpe_map_merges_normalised_forms(tmp_path):
    tok, path = _bpe_tokenizer(tmp_path)
    m, n = engram_token_map(tok)
    m2, n2 = engram_token_map(path)
    assert n == n2 and m.tolist() == m2.tolist()
    assert m.shape == (tok.get_vocab_size(with_added_tokens=True),)
    k = lambda t: _key_of(tok, m, t)  # noqa: E731
    assert k("The") == k(" the") == k("THE") == k(" The")       # strip + lowercase
    assert k("café") == k("cafe") == k("Café")                   # NFD + StripAccents
    assert k("ﬁne") == k("fine")                                  # NFKC
    assert k(" ") == k("   ") == k("\n\n")                         # one space survives the strip
    assert k("The") != k("fine") and k(" ") != k("The")
    user = tok.token_to_id("<｜User｜>")
    assert int(m[user]) not in {int(x) for x in m[:user]}         # its own class
    # a partial UTF-8 byte token is keyed by its raw token string: distinct per byte
    partial = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i], skip_special_tokens=False)]
    assert len(partial) > 50
    assert len({int(m[i]) for i in partial}) == len({tok.id_to_token(i) for i in partial})
    assert n == int(m.max()) + 1


def test_check_class_count_names_the_expected_count():
    check_class_count(99092, 99092)
    with pytest.raises(CheckpointError, match="expected 99092 classes") as e:
        check_class_count(230, 99092, "tiny/config.json")
    assert "230" in str(e.value) and "tiny/config.json" in str(e.value)


def test_bad_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        engram_token_map(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable"):
        engram_token_map(str(bad))
    with pytest.raises(CheckpointError, match="expected a tokenizers.Tokenizer"):
        engram_token_map(42)


def test_v4_layout_tokenizer_class_count(tmp_path):
    """tests/serve/v4_tokenizer.py's released-layout tokenizer (synthetic fillers, not the released vocabulary):
    3 specials + 227 byte classes + 127,741 distinct letter fillers + 1,280 distinct added tokens. The released
    V4.1 count (99092) needs the released tokenizer.json, which is not vendored."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serve"))
    try:
        import v4_tokenizer
    finally:
        sys.path.pop(0)
    path = v4_tokenizer.build_tokenizer_json(str(tmp_path / "v4.json"), v4_tokenizer.V41_IDS)
    m, n = engram_token_map(path)
    assert m.shape == (129280,)
    assert n == 3 + 227 + (128000 - 259) + 1280 == 129251


@pytest.mark.skipif(not OFFICIAL, reason="DSV4RT_V41_OFFICIAL (a folder with the official engram.py) is not set: "
                                         "the cross-check against the official build_compressed_token_map is SKIPPED")
def test_matches_the_official_map(tmp_path, byte_json):
    spec = importlib.util.spec_from_file_location("_v41_engram", os.path.join(OFFICIAL, "engram.py"))
    eng = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eng)

    class Fast:  # what transformers' fast tokenizer gives the official code
        def __init__(self, t):
            self.backend_tokenizer = t

        def __len__(self):
            return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    for tok in (tokenizers.Tokenizer.from_file(byte_json), _bpe_tokenizer(tmp_path)[0]):
        want, want_n = eng.build_compressed_token_map(Fast(tok))
        got, n = engram_token_map(tok)
        assert n == want_n and got.tolist() == want
