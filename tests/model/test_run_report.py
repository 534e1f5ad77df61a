"""`dsv4rt run`'s prefill / decode report: one sequence as before; a batch per sequence and in total."""
import io
import re

from dsv4rt.cli import main
from dsv4rt.model.generate import GenerationResult
from dsv4rt.model.runner import _timings


def test_a_batch_is_reported_per_sequence_and_in_total():
    # prompts of 6 and 7 tokens, 32 generated each: 6 x 2 prefilled together, the 7th token in a decode step
    res = GenerationResult([[1] * 32, [2] * 32], prompt_tokens=13, prefill_s=0.5, decode_s=2.0, decode_steps=32)
    out = io.StringIO()
    _timings(res, [[0] * 6, [0] * 7], out)
    text = out.getvalue()
    assert "prefill  12 tokens (2 sequences x 6, one batch) in 0.500 s = 24.0 tok/s in total; 1 more prompt" in text
    assert "decode   32 steps x 2 sequences = 64 tokens in 2.000 s = 32.0 tok/s in total, 16.0 tok/s per " \
        "sequence" in text
    assert "sequence 1: prompt 6 tokens (6 prefilled, 0 in decode steps), 32 generated" in text
    assert "sequence 2: prompt 7 tokens (6 prefilled, 1 in decode steps), 32 generated" in text
    assert "total: prompts 13 tokens, 64 generated" in text


def test_run_with_two_prompts_prints_both_sequences(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSV4RT_CACHE_DIR", str(tmp_path))
    assert main(["run", "--backend", "cpu", "--prompt", "a", "--prompt", "bcd", "--max-new-tokens", "3",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^prefill  4 tokens \(2 sequences x 2, one batch\)", out, re.M), out
    assert re.search(r"^  sequence 2: prompt 4 tokens \(2 prefilled, 2 in decode steps\), 3 generated", out, re.M)
