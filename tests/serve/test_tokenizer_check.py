"""Tokenizers against the model: ``--tokenizer PATH`` (a file or a folder) for run and serve, a named error
instead of an IndexError when a tokenizer.json has ids beyond the model's vocabulary, and
``decode(skip_special_tokens=True)`` dropping role and think tokens, which DeepSeek marks non-special."""
import os
import re
import shutil

import pytest

from dsv4rt.cli import main
from dsv4rt.errors import CheckpointError
from dsv4rt.model.config import preset
from dsv4rt.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

V4_CFG = preset("tiny", vocab_size=129280, extra={})


def test_tokenizer_path_file_or_folder(v4_tokenizer_json, tmp_path):
    by_file = load_tokenizer(V4_CFG, None, v4_tokenizer_json)
    by_folder = load_tokenizer(V4_CFG, None, os.path.dirname(v4_tokenizer_json))
    assert isinstance(by_file, HFTokenizer) and by_file.path == by_folder.path == v4_tokenizer_json
    assert by_file.max_id == 129279 and by_file.size == 129280
    assert by_file.encode("Hi") == [0, 75, 108]
    # --tokenizer wins over the checkpoint's tokenizer.json; without either a preset keeps its byte tokenizer
    assert load_tokenizer(V4_CFG, str(tmp_path), v4_tokenizer_json).path == v4_tokenizer_json
    assert isinstance(load_tokenizer(preset("tiny")), ByteTokenizer)
    with pytest.raises(CheckpointError, match="the folder has no tokenizer.json"):
        load_tokenizer(V4_CFG, None, str(tmp_path))
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_tokenizer(V4_CFG, None, str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json"):
        load_tokenizer(V4_CFG, None, str(tmp_path / "bad.json"))


def test_ids_beyond_the_vocabulary_are_a_named_error(v4_tokenizer_json):
    with pytest.raises(CheckpointError) as ei:
        load_tokenizer(preset("tiny"), None, v4_tokenizer_json)
    msg = str(ei.value)
    assert "ids up to 129279 (129280 tokens)" in msg and "vocabulary has 259 ids" in msg and "--tokenizer" in msg
    # a tokenizer may stop below the model's vocabulary (padded embeddings), but must hold BOS and EOS
    padded = preset("tiny", vocab_size=140000, extra={})
    assert load_tokenizer(padded, None, v4_tokenizer_json).max_id == 129279
    with pytest.raises(CheckpointError, match="eos_token_id 135000 is no token of this tokenizer"):
        load_tokenizer(padded.replace(eos_token_id=135000), None, v4_tokenizer_json)


def test_decode_skips_every_control_token(v4_tokenizer_json):
    tok = HFTokenizer(v4_tokenizer_json, 0, 1)
    ids = tok.encode("<｜User｜>Hi<｜Assistant｜><think>hm</think>Yes<｜DSML｜tool_calls><｜end▁of▁sentence｜>")
    assert ids[:3] == [0, 128803, 75] and 128821 in ids and 128822 in ids and 128825 in ids
    assert tok.decode(ids) == "HihmYes<tool_calls>"
    assert tok.decode(ids, skip_special_tokens=False) == ("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>hm"
                                                          "</think>Yes<｜DSML｜tool_calls><｜end▁of▁sentence｜>")
    assert tok.token_id("<think>") == 128821 and tok.token_id("Hi") is None
    assert ByteTokenizer().token_id("<think>") is None


def test_run_names_the_mismatch(v4_tokenizer_json, tmp_path, capsys):
    """A checkpoint whose tokenizer.json outgrows its vocabulary: a usage error, not an IndexError."""
    from dsv4rt.model.synthetic import tiny_checkpoint

    ck = tmp_path / "tiny-with-v4-tokenizer"
    shutil.copytree(tiny_checkpoint(root=str(tmp_path / "cache")), ck)
    shutil.copy(v4_tokenizer_json, ck / "tokenizer.json")
    assert main(["run", "--checkpoint", str(ck), "--backend", "cpu", "--max-new-tokens", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"dsv4rt run: error: .*tokenizer.json: the tokenizer has ids up to 129279 \(129280 tokens\), "
                     r"but the model's vocabulary has 259 ids", err), err
    assert main(["run", "--preset", "tiny", "--tokenizer", v4_tokenizer_json, "--backend", "cpu", "--quiet"]) == 2
    assert "vocabulary has 259 ids" in capsys.readouterr().err


def test_run_and_serve_with_tokenizer_on_the_v4_vocabulary(v4_vocab_checkpoint, v4_tokenizer_json, capsys):
    assert main(["run", "--checkpoint", v4_vocab_checkpoint, "--tokenizer", v4_tokenizer_json, "--backend", "cpu",
                 "--prompt", "Hi", "--max-new-tokens", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "vocab 129280" in out and re.search(r"^prompt   'Hi' \(3 tokens\)", out, re.M), out
    from dsv4rt.serve.cli import ServeOptions, build_server

    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        build_server(ServeOptions(checkpoint=v4_vocab_checkpoint, backend="cpu", max_seqs=1, max_seq_len=256))
    with pytest.raises(CheckpointError, match="vocabulary has 259 ids"):
        build_server(ServeOptions(preset="tiny", backend="cpu", tokenizer=v4_tokenizer_json))
