"""Per-request sampling: top-k / top-p masks, greedy rows, seeded reproducibility, incremental text."""
import math

import torch

from dsv4rt.model.tokenizer import ByteTokenizer
from dsv4rt.serve.sampling import SamplingParams, TextStream, apply_top_k, apply_top_p, make_generator, sample_batch

NEG = float("-inf")


def test_top_k_keeps_the_k_largest_per_row_and_disables_on_0_and_minus_1():
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    out = apply_top_k(x, torch.tensor([2, 1, 0]))
    assert out[0].tolist() == [NEG, 5.0, NEG, 4.0]
    assert out[1].tolist() == [4.0, NEG, NEG, NEG]
    assert out[2].tolist() == x[2].tolist()
    assert torch.equal(apply_top_k(x, torch.tensor([-1, -1, 99])), x)


def test_top_p_keeps_the_smallest_nucleus_and_always_the_top_token():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.9, 0.05, 0.03, 0.02]])
    x = probs.log()
    out = apply_top_p(x, torch.tensor([0.8, 0.7, 0.01]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]     # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(out[1]).tolist() == [False, False, True, True]     # 0.5 + 0.3 reaches 0.7
    assert torch.isfinite(out[2]).tolist() == [True, False, False, False]    # the top token stays
    assert torch.equal(apply_top_p(x, torch.ones(3)), x)


def test_greedy_rows_take_the_argmax_whatever_else_shares_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0)]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    assert gens[0] is None and gens[1] is not None
    out = sample_batch(logits, params, gens)
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())


def _draws(seed, n=20, top_k=-1, top_p=1.0):
    p = SamplingParams(temperature=0.9, seed=seed, top_k=top_k, top_p=top_p)
    gen = make_generator(p, torch.device("cpu"))
    logits = torch.randn(n, 40, generator=torch.Generator().manual_seed(7))
    return [sample_batch(logits[i:i + 1], [p], [gen])[0] for i in range(n)], logits


def test_seeded_sampling_is_reproducible_and_differs_between_seeds():
    a, _ = _draws(123)
    b, _ = _draws(123)
    c, _ = _draws(124)
    assert a == b and a != c


def test_sampled_tokens_respect_top_k():
    got, logits = _draws(5, n=40, top_k=3)
    for i, t in enumerate(got):
        assert t in logits[i].topk(3).indices.tolist()


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]]).repeat(4000, 1)
    p = SamplingParams(temperature=1.0, seed=0)
    g = make_generator(p, torch.device("cpu"))
    counts = torch.bincount(torch.tensor(sample_batch(logits, [p] * 4000, [g] * 4000)), minlength=3).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def _ids(text):
    return ByteTokenizer().encode(text)[1:]


def test_text_stream_holds_split_multibyte_characters_until_complete():
    ts = TextStream(ByteTokenizer())
    pieces = [ts.push(t)[0] for t in _ids("aé€b")]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "aé€b" == ts.text
    assert pieces[1] == "" and pieces[2] == "é"                               # é is two bytes


def test_text_stream_truncates_before_a_stop_string_and_holds_back_its_prefix():
    ts = TextStream(ByteTokenizer(), ("END",))
    out, stopped = [], False
    for t in _ids("abcENxEND tail"):
        d, stopped = ts.push(t)
        out.append(d)
        if stopped:
            break
    assert stopped and ts.text == "abcENx" and "".join(out) == "abcENx"
    assert out[3:5] == ["", ""]                                              # "E", "EN" held back


def test_text_stream_flush_releases_a_partial_stop_prefix():
    ts = TextStream(ByteTokenizer(), ("xyz",))
    for t in _ids("abxy"):
        ts.push(t)
    assert ts.text == "ab" and ts.flush() == "xy" and ts.text == "abxy"
