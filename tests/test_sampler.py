"""Sampler: greedy, seeds, top-k/top-p, repetition penalty, raw logprobs; StopText."""

from __future__ import annotations

import pytest
import torch

from services.executor.sampler import (
    SamplingOptions,
    SamplingRow,
    StopText,
    _draw,
    _filter_rows,
    make_generator,
    sample,
)


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


def _filter(logits, top_k, top_p):
    return _filter_rows(logits[None], [top_k], [top_p])[0]


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


@pytest.mark.parametrize("edge", [
    dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.0), dict(top_k=0),
    dict(repetition_penalty=0.0), dict(seed=-(2**63)), dict(seed=2**64 - 1), dict(min_new_tokens=0),
    dict(min_new_tokens=4, max_new_tokens=4), dict(min_new_tokens=9, max_new_tokens=0),
    dict(presence_penalty=-2.0), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0),
    dict(frequency_penalty=2.0), dict(top_logprobs=0), dict(top_logprobs=20), dict(stop_token_ids=(0,)),
])
def test_every_limit_itself_is_valid(edge):
    """Each bound is inclusive: a value exactly at it is accepted."""
    assert SamplingOptions(**edge).problems() == []


@pytest.mark.parametrize("past, bad", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=-0.01), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=-0.01), "repetition_penalty"), (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=2**64), "seed"), (dict(stop=("ok", "")), "stop"), (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(min_new_tokens=5, max_new_tokens=4), "min_new_tokens (5)"),
    (dict(presence_penalty=-2.01), "presence_penalty"), (dict(frequency_penalty=2.01), "frequency_penalty"),
    (dict(presence_penalty=float("inf")), "presence_penalty"),
    (dict(top_logprobs=-1), "top_logprobs"), (dict(top_logprobs=21), "top_logprobs"),
    (dict(stop_token_ids=(3, -1)), "got -1"),
])
def test_just_past_each_limit_is_a_clear_problem(past, bad):
    problems = SamplingOptions(**past).problems()
    assert problems and bad in problems[0], problems


@pytest.mark.parametrize("kw, history, prompt_len, special", [
    (dict(), [1, 2], 2, False),                                   # greedy: the raw argmax
    (dict(temperature=0.5), [], 0, True),
    (dict(repetition_penalty=1.0), [1], 1, False),                # 1 is off, as 0 is
    (dict(repetition_penalty=1.2), [1], 1, True),
    (dict(presence_penalty=0.5), [1, 2], 2, False),               # nothing generated yet
    (dict(presence_penalty=0.5), [1, 2, 3], 2, True),
    (dict(frequency_penalty=-0.5), [1, 2, 3], 2, True),
    (dict(min_new_tokens=2), [1, 2, 3], 2, True),                 # one generated, two asked: masked
    (dict(min_new_tokens=1), [1, 2, 3], 2, False),                # reached: EOS may come
])
def test_which_rows_need_more_than_the_argmax(kw, history, prompt_len, special):
    r = SamplingRow(SamplingOptions(**kw), None, history, prompt_len, held_back=(7,))
    assert bool(r.special) is special
    assert r.masked == (() if not special or "min_new_tokens" not in kw else (7,))


def test_a_held_back_token_is_never_drawn_until_min_new_tokens():
    logits = torch.tensor([[0.0, 1.0, 9.0]])             # 2 (say EOS) is far the most likely
    r = SamplingRow(SamplingOptions(min_new_tokens=2), None, [5, 1], 1, held_back=(2,))
    assert sample(logits, [r])[0] == [1]
    r.history.append(1)                                    # two generated now
    assert sample(logits, [r])[0] == [2]


def _draws(logits: torch.Tensor, opts: list[dict], n: int) -> torch.Tensor:
    """n draws for each row of logits [R, V] under its options, one _draw call over R * n rows (each
    with its own seeded generator) -> counts [R, V]."""
    rows = [row(seed=1000 * i + j, **o) for i, o in enumerate(opts) for j in range(n)]
    got = _draw(logits.repeat_interleave(n, dim=0), rows).view(len(opts), n)
    return torch.zeros(len(opts), logits.shape[1]).scatter_add_(1, got, torch.ones(len(opts), n))


def _want(logits: torch.Tensor, opts: list[dict]) -> torch.Tensor:
    temps = torch.tensor([o["temperature"] for o in opts])[:, None]
    return torch.softmax(_filter_rows(logits / temps, [o.get("top_k", 0) for o in opts],
                                      [o.get("top_p", 0.0) for o in opts]), dim=-1)


def test_sampled_rows_follow_their_distributions():
    """Every sampled row of a batch is drawn at once (inverse CDF, one uniform per row from its own
    generator): each row's empirical frequencies match softmax(filter(logits / temperature)), tokens
    of probability 0 (masked, filtered) are never drawn, and rows with different temperatures,
    top-k and top-p in one batch each keep their own."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, generator=g) * 2
    logits[:, 7] = float("-inf")                                   # impossible everywhere
    opts = [dict(temperature=1.0), dict(temperature=0.5, top_k=3), dict(temperature=2.0, top_p=0.6),
            dict(temperature=1.3, top_k=5, top_p=0.9)]
    want = _want(logits, opts)
    n = 20000
    freq = _draws(logits, opts, n) / n
    assert torch.all(freq[want == 0] == 0)                         # never a token it may not take
    assert torch.allclose(freq, want, atol=0.015), (freq, want)    # 20000 draws: sd <= 0.0036
    for i, o in enumerate(opts):                                   # one row's filter = the batch's row
        one = _filter(logits[i] / o["temperature"], o.get("top_k", 0), o.get("top_p", 0.0))
        assert torch.equal(torch.isinf(one), want[i] == 0)


def test_long_rows_candidates_and_their_fallbacks(monkeypatch):
    """A vocabulary of several blocks (the two-level inverse CDF, a padded last block) and filters
    decided among the best CANDIDATES tokens or not: a top-p that a peaked row reaches inside them,
    one that a flat row does not (the full sort), a top-k whose k-th value ties past the candidates
    (the full sort), and a top-k larger than CANDIDATES. Each row's draws follow its distribution
    and never leave its kept set; the mass of its best 8 tokens and of the rest match. (BLOCK and
    CANDIDATES are shrunk so that the test stays small.)"""
    from services.executor import sampler
    monkeypatch.setattr(sampler, "BLOCK", 64)
    monkeypatch.setattr(sampler, "CANDIDATES", 32)
    full_sorts = []
    monkeypatch.setattr(sampler, "_filter_rows",
                        lambda x, k, p: full_sorts.append(len(k)) or _filter_rows(x, k, p))
    vocab = 3 * 64 + 5
    g = torch.Generator().manual_seed(1)
    peaked = torch.randn(vocab, generator=g) * 4
    flat = torch.randn(vocab, generator=g) * 0.05
    tied = torch.randn(vocab, generator=g)
    tied[torch.randperm(vocab, generator=g)[:32 + 30]] = 5.0   # ties past the edge (top-k 52 + 1 here)
    masked = torch.randn(vocab, generator=g)
    masked[::3] = float("-inf")
    logits = torch.stack([peaked, flat, tied, peaked, masked, flat])
    opts = [dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, top_p=0.95),
            dict(temperature=1.0, top_k=10), dict(temperature=0.7, top_k=32 + 20),
            dict(temperature=1.0), dict(temperature=1.0)]
    want = _want(logits, opts)
    n = 6000
    counts = _draws(logits, opts, n)
    assert full_sorts == [2 * n]                   # the flat top-p rows and the tied top-k rows only
    assert torch.all(counts[want == 0] == 0)
    best = want.argsort(-1, descending=True)[:, :8]
    for i in range(len(opts)):
        got = counts[i, best[i]] / n
        assert torch.allclose(got, want[i, best[i]], atol=0.02), (i, got, want[i, best[i]])
        rest = 1 - got.sum()
        assert abs(rest - (1 - want[i, best[i]].sum())) < 0.03, i


def test_one_softmax_serves_logprobs_and_unit_temperature_draws():
    """sample_with_top reads logsumexp off one softmax of the raw logits and draws temperature-1
    rows from it: the logprobs are log_softmax's (float64 reference) at a 152k vocabulary, and each
    seeded row picks what softmax(logits / T) with the same generator picks, beside rows at other
    temperatures, a greedy row and a penalised row (which take their own paths)."""
    from services.executor.sampler import _inverse_cdf, sample_with_top
    torch.manual_seed(3)
    logits = torch.randn(6, 152064) * 6
    kinds = [dict(temperature=1.0, seed=1), dict(temperature=1.0, seed=2), dict(temperature=0.7, seed=3),
             dict(), dict(temperature=1.0, seed=4, repetition_penalty=1.3), dict(temperature=1.0, seed=5)]
    for mix in (kinds, [k for k in kinds if k.get("temperature") == 1.0 and len(k) == 2]):
        rows = [row(**k) for k in mix]
        for r in rows:
            r.history = [7, 8]
        tokens, lps, _ = sample_with_top(logits[:len(mix)], rows)
        exact = torch.log_softmax(logits[:len(mix)].double(), -1)
        assert lps == pytest.approx([exact[i, t].item() for i, t in enumerate(tokens)], abs=2e-5)
        for i, k in enumerate(mix):
            if k.get("temperature") == 1.0 and len(k) == 2:     # plain temperature-1 rows
                want = _inverse_cdf(torch.softmax(logits[i:i + 1] / 1.0, -1), [row(**k)]).item()
                assert tokens[i] == want
            elif not k:
                assert tokens[i] == int(logits[i].argmax())
