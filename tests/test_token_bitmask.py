"""torch.ops.openlora.token_bitmask_fill (cpp/token_bitmask.cpp): structured outputs' token masks
applied to the logits in one pass, against its pure-PyTorch reference and a float64 per-token loop;
bad rows or masks get a clear error, never a write outside the output."""

from __future__ import annotations

import pytest
import torch

from services.executor import ops
from services.executor.ops import token_bitmask_fill_ref


def loop(logits: torch.Tensor, words: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The definition, token by token, in float64."""
    out = logits.double().clone()
    for j, r in enumerate(rows):
        for t in range(logits.shape[1]):
            if not (int(words[j, t // 32]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


def case(n, vocab, rows, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 5
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (len(rows), (vocab + 31) // 32), generator=g, dtype=torch.int64)
    words = words.to(torch.int32)
    if len(rows) > 1:                      # whole words allowed and whole words banned too
        words[0, ::3] = -1
        words[-1, 1::3] = 0
    return logits, words, rows


@pytest.fixture(scope="module", autouse=True)
def built():
    if ops.ensure_built() != "cpp":
        pytest.skip("the extension is not built (reference backend)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,vocab,rows", [(4, 1000, [2, 0]), (5, 64, [0, 1, 2, 3, 4]), (3, 33, [1]),
                                          (6, 1024, []), (1, 31, [0])])
def test_matches_the_per_token_definition_and_the_reference(dtype, n, vocab, rows):
    logits, words, rows = case(n, vocab, rows, seed=n * vocab)
    logits = logits.to(dtype)
    index = torch.tensor(rows, dtype=torch.long)
    got = ops.token_bitmask_fill(logits, words, index)
    want = loop(logits, words, rows).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(token_bitmask_fill_ref(logits, words, index), want)
    assert torch.equal(logits, case(n, vocab, rows, seed=n * vocab)[0].to(dtype))   # the input untouched


def test_a_noncontiguous_input_and_a_large_vocab():
    logits, words, rows = case(8, 152064, [7, 3, 5], seed=1)
    wide = torch.randn(8, 2 * 152064)[:, ::2]
    wide.copy_(logits)
    index = torch.tensor(rows)
    assert torch.equal(ops.token_bitmask_fill(wide, words, index), token_bitmask_fill_ref(logits, words, index))


@pytest.mark.parametrize("args,message", [
    (lambda: (torch.zeros(4, 64), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([4])), r"rows\[0\] = 4 is not a row"),
    (lambda: (torch.zeros(4, 64), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([-1])), r"rows\[0\] = -1 is not a row"),
    (lambda: (torch.zeros(4, 64), torch.zeros(2, 2, dtype=torch.int32), torch.tensor([1, 1])), "named twice"),
    (lambda: (torch.zeros(4, 65), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0])), "fewer than the vocab of 65"),
    (lambda: (torch.zeros(4, 64), torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0])), "words has 2 rows but rows names 1"),
    (lambda: (torch.zeros(4, 64), torch.zeros(1, 2, dtype=torch.int64), torch.tensor([0])), "words must be an int32"),
    (lambda: (torch.zeros(4, 64), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0.0])), "rows must be an int64"),
    (lambda: (torch.zeros(64), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0])), "logits must be 2-D"),
])
def test_bad_input_is_refused_with_a_clear_error(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.openlora.token_bitmask_fill.default(*args())


def test_the_reference_refuses_the_same_rows():
    for rows in ([4], [-1], [1, 1]):
        with pytest.raises(ValueError, match="distinct rows"):
            token_bitmask_fill_ref(torch.zeros(4, 64), torch.zeros(len(rows), 2, dtype=torch.int32), torch.tensor(rows))


def test_opcheck():
    logits, words, rows = case(4, 100, [3, 1], seed=3)
    torch.library.opcheck(torch.ops.openlora.token_bitmask_fill.default, (logits, words, torch.tensor(rows)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,vocab,rows", [(4, 1000, [2, 0]), (5, 64, [0, 1, 2, 3, 4]), (3, 33, [1]),
                                          (6, 1024, []), (8, 152064, [7, 3, 5])])
def test_in_place_fill_touches_only_the_banned_tokens_of_the_named_rows(dtype, n, vocab, rows):
    """token_bitmask_fill_ (the sampler zeroes a grammar row's forbidden tokens in its softmax with
    it): the per-token definition with `value` instead of -inf, in place, other rows bit-identical."""
    logits, words, rows = case(n, vocab, rows, seed=vocab + n)
    t = logits.to(dtype)
    index = torch.tensor(rows, dtype=torch.long)
    want = loop(t, words, rows)
    want = torch.where(torch.isneginf(want) & ~torch.isneginf(t.double()), torch.zeros_like(want), want).to(dtype)
    got = t.clone()
    assert ops.token_bitmask_fill_(got, words, index, 0.0) is None
    assert torch.equal(got, want)
    ref = t.clone()
    ops.token_bitmask_fill_ref_(ref, words, index, 0.0)
    assert torch.equal(ref, want)


@pytest.mark.parametrize("args,message", [
    (lambda: (torch.zeros(4, 64), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([4])), r"rows\[0\] = 4 is not a row"),
    (lambda: (torch.zeros(4, 64), torch.zeros(2, 2, dtype=torch.int32), torch.tensor([1, 1])), "named twice"),
    (lambda: (torch.zeros(4, 65), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0])), "fewer than the vocab of 65"),
    (lambda: (torch.zeros(4, 64), torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0])), "words has 2 rows but rows names 1"),
    (lambda: (torch.zeros(4, 128)[:, ::2], torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0])), "contiguous"),
    (lambda: (torch.zeros(4, 64), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0.0])), "rows must be an int64"),
])
def test_in_place_bad_input_is_refused_and_nothing_written(args, message):
    t, words, rows = args()
    before = t.clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.openlora.token_bitmask_fill_.default(t, words, rows, -1.0)
    assert torch.equal(t, before)


def test_in_place_opcheck():
    logits, words, rows = case(4, 100, [3, 1], seed=5)
    torch.library.opcheck(torch.ops.openlora.token_bitmask_fill_.default, (logits, words, torch.tensor(rows), 0.0))
