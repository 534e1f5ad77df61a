"""`dsv4rt run` refuses flags that would do nothing, slices keep every layer kind and synthetic weights show
progress (the --check verdict has its own tests: test_check_verdict.py)."""
import io

import pytest

from dsv4rt.cli import main
from dsv4rt.model.config import preset
from dsv4rt.model.progress import ProgressSource
from dsv4rt.model.runner import slice_ratios
from dsv4rt.model.synthetic import SyntheticSource


@pytest.mark.parametrize("argv,needle", [
    (["run", "--layers", "2"], "--layers only shape --preset flash-slice"),
    (["run", "--experts", "8", "--preset", "tiny"], "--experts only shape --preset flash-slice"),
    (["run", "--prompt", "hi", "--prompt-len", "8"], "--prompt and --prompt-len exclude each other"),
])
def test_flags_that_do_nothing_are_refused(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("n,kinds", [(1, {4}), (2, {4, 128}), (3, {0, 4, 128}), (4, {0, 4, 128}), (6, {0, 4, 128})])
def test_short_flash_slices_keep_the_indexer_and_compressors(n, kinds):
    schedule = preset("flash").compress_ratios[:-1]
    got = slice_ratios(schedule, n)
    assert len(got) == n and set(got) == kinds
    if n >= 4:
        assert got == schedule[:n]


def test_synthetic_weights_advance_a_progress_line():
    cfg = preset("tiny")
    stream = io.StringIO()
    src = ProgressSource(SyntheticSource(cfg, 0, fast=True, mtp=False), "drawing synthetic weights", stream=stream)
    names = list(src.schema)
    for name in names:
        src.get(name)
    src.progress.close()
    text = stream.getvalue()
    assert "drawing synthetic weights" in text and f"{len(names)}/{len(names)} tensors" in text
    assert "100.0%" in text and src.cfg is cfg


def test_tiny_run_says_its_text_is_noise_and_check_passes(capsys):
    assert main(["run", "--backend", "cpu", "--max-new-tokens", "2", "--check", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "random weights, so the text is noise" in out and "verdict  PASS" in out and "tolerance" in out


def test_several_prompts_run_as_one_batch(capsys):
    assert main(["run", "--backend", "cpu", "--prompt", "Hi", "--prompt", "a longer prompt", "--max-new-tokens", "2",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "prompt 1 'Hi' (3 tokens)" in out and "prompt 2 'a longer prompt' (16 tokens)" in out
    assert "text 2" in out


def test_warmup_runs_the_prompts_once_untimed_before_the_timed_run(monkeypatch, capsys):
    import dsv4rt.model.runner as runner

    calls = []
    real = runner.generate

    def spy(model, prompts, max_new_tokens, *a, **k):
        calls.append(max_new_tokens)
        return real(model, prompts, max_new_tokens, *a, **k)

    monkeypatch.setattr(runner, "generate", spy)
    assert main(["run", "--prompt-len", "8", "--max-new-tokens", "3", "--warmup", "--quiet"]) == 0
    assert calls == [1, 3]                          # prefill + one token untimed, then the timed run
    calls.clear()
    assert main(["run", "--prompt-len", "8", "--max-new-tokens", "3", "--quiet"]) == 0
    assert calls == [3]
    assert "decode   2 tokens" in capsys.readouterr().out
