"""Sampler: greedy, seeds, top-k/top-p, repetition penalty, raw logprobs; StopText."""

from __future__ import annotations

import pytest
import torch

from services.executor.sampler import SamplingOptions, SamplingRow, StopText, _filter, make_generator, sample


def row(**kw):
    o = SamplingOptions(**kw)
    return SamplingRow(o, make_generator(o.seed, torch.device("cpu")) if o.temperature > 0 else None, [])


def test_greedy_and_raw_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    tokens, lps = sample(logits, [row(), row()])
    assert tokens == [1, 0]
    assert lps == pytest.approx(torch.log_softmax(logits, -1)[[0, 1], [1, 0]].tolist())


def test_seeded_rows_independent_of_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    alone = [sample(logits[2:3], [row(temperature=1.0, seed=5)])[0][0] for _ in range(1)]
    rows = [row(temperature=1.0, seed=s) for s in (1, 2, 5, 3)]
    seqs = [[], [], [], []]
    for _ in range(10):
        toks, _ = sample(logits, rows)
        for i, t in enumerate(toks):
            seqs[i].append(t)
    r = row(temperature=1.0, seed=5)
    solo = [sample(logits[2:3], [r])[0][0] for _ in range(10)]
    assert seqs[2] == solo and solo[0] == alone[0]


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(_filter(logits, 2, 0)).tolist() == [False, False, True, True]
    assert torch.isinf(_filter(logits, 0, 0.8)).tolist() == [False, False, True, True]
    assert torch.isinf(_filter(logits, 0, 0.81)).tolist() == [False, False, False, True]
    assert torch.isinf(_filter(logits, 0, 0.1)).tolist() == [False, True, True, True]


def test_top_k_1_is_greedy_even_when_sampling():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    for seed in range(5):
        assert sample(logits, [row(temperature=2.0, top_k=1, seed=seed)])[0] == [2]


def test_repetition_penalty_hf_rule():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    r = row(repetition_penalty=2.0)
    r.history = [0]
    tokens, lps = sample(logits, [r])
    assert tokens == [1]                                  # 2.0 / 2 < 1.9
    assert lps[0] == pytest.approx(float(torch.log_softmax(logits, -1)[0, 1]))


@pytest.mark.parametrize("opts, bad", [
    (SamplingOptions(temperature=-1), "temperature"), (SamplingOptions(top_p=2), "top_p"),
    (SamplingOptions(top_k=-2), "top_k"), (SamplingOptions(max_new_tokens=-1), "max_new_tokens"),
    (SamplingOptions(repetition_penalty=float("inf")), "repetition_penalty"),
    (SamplingOptions(seed=2**64), "seed"), (SamplingOptions(stop=("",)), "stop"),
])
def test_invalid_options(opts, bad):
    assert any(bad in p for p in opts.problems())


def test_valid_options():
    assert SamplingOptions(temperature=0.7, top_p=1, top_k=5, seed=2**64 - 1, stop=("x",),
                           repetition_penalty=1.1).problems() == []


@pytest.mark.parametrize("pieces, stops, streamed, final, stopped", [
    (["hel", "lo wor", "ld"], (), ["hel", "lo wor", "ld"], "hello world", False),
    (["hello", " wo", "rld"], ("wor",), ["hello", " ", ""], "hello ", True),
    (["ab", "cX", "Yd"], ("XY",), ["ab", "c", ""], "abc", True),
    (["ab", "cX", "Zd"], ("XY",), ["ab", "c", "XZd"], "abcXZd", False),
    (["xSTOP"], ("TO", "STOP"), ["x"], "x", True),
])
def test_stop_text(pieces, stops, streamed, final, stopped):
    s = StopText(stops)
    got = [s.push(p) for p in pieces]
    got[-1] += s.flush()
    assert got == streamed and s.text == final and s.stopped == stopped
    assert "".join(got) == final


def test_vanishing_temperature_is_greedy_not_an_error():
    logits = torch.randn(2, 50)
    rows = [SamplingRow(SamplingOptions(temperature=1e-45, seed=1),
                        make_generator(1, torch.device("cpu")), [1, 2]) for _ in range(2)]
    assert sample(logits, rows)[0] == logits.argmax(-1).tolist()
