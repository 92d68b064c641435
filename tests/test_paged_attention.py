"""torch.ops.openlora.paged_attention_decode against its reference and a plain per-sequence attention.

Each check is written once as _check_*(device) with a _cpu test and a skip-unless-CUDA _cuda test
(on CUDA the op runs its reference: there is no CUDA kernel yet).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.executor.ops import (
    paged_attention_decode,
    paged_attention_decode_async,
    paged_attention_decode_ref,
)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
D = 64


def make_case(ctx_lens, bs, heads, kv_heads, dtype, device, *, head_dim=D, scattered=True,
              strided=False, seed=0):
    """Random q and caches; each sequence gets its own blocks (shuffled when scattered), and table
    entries past the blocks a sequence needs are out of range (the op must not read them)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // bs) for c in ctx_lens]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + 3
    ids = torch.randperm(num_blocks, generator=g) if scattered else torch.arange(num_blocks)
    tables = torch.full((len(ctx_lens), max_blocks), num_blocks + 7, dtype=torch.int32)
    at = 0
    for n, k in enumerate(need):
        tables[n, :k] = ids[at:at + k].to(torch.int32)
        at += k
    shape = (num_blocks, bs, kv_heads, head_dim)
    if strided:  # one layer of a [layers, ...] cache with K and V interleaved: a non-contiguous view
        both = torch.randn(num_blocks, bs, 2, kv_heads, head_dim, generator=g).to(device, dtype)
        kc, vc = both[:, :, 0], both[:, :, 1]
        assert not kc.is_contiguous()
    else:
        kc = torch.randn(shape, generator=g).to(device, dtype)
        vc = torch.randn(shape, generator=g).to(device, dtype)
    q = torch.randn(len(ctx_lens), heads, head_dim, generator=g)
    return dict(q=q.to(device, dtype), k_cache=kc, v_cache=vc,
                block_tables=tables.to(device),
                context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device))


def dense(q, k_cache, v_cache, block_tables, context_lens, scale, window):
    """Per sequence: its keys gathered row by row, then F.scaled_dot_product_attention in float64 (an
    fp32 oracle can be further from the true value than the kernel)."""
    N, H, _ = q.shape
    bs, kvh = k_cache.shape[1:3]
    out = []
    for n in range(N):
        c = int(context_lens[n])
        lo = max(0, c - window) if window > 0 else 0
        rows = [(int(block_tables[n, t // bs]), t % bs) for t in range(lo, c)]
        k = torch.stack([k_cache[b, r] for b, r in rows]).double().repeat_interleave(H // kvh, 1)
        v = torch.stack([v_cache[b, r] for b, r in rows]).double().repeat_interleave(H // kvh, 1)
        o = F.scaled_dot_product_attention(q[n, :, None].double(), k.transpose(0, 1), v.transpose(0, 1),
                                           scale=scale)
        out.append(o[:, 0])
    return torch.stack(out).to(q.dtype)


def call(fn, c, scale, window):
    return fn(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["context_lens"], scale, window)


CTX = {"one": [1], "block_edges": [15, 16, 17, 32, 1], "long": [300, 7, 129], "batch64": None}
SHAPES = [(8, 4), (8, 8), (8, 1), (6, 2)]  # (heads, kv_heads): GQA 2, MHA, MQA, GQA 3


def _check_matches(device, dtype, ctx, bs, shape, window, scattered, strided):
    ctx_lens = CTX[ctx] or [40 + (7 * i) % 17 for i in range(64)]
    heads, kv_heads = shape
    c = make_case(ctx_lens, bs, heads, kv_heads, dtype, device, scattered=scattered, strided=strided)
    scale = D ** -0.5
    got = call(paged_attention_decode, c, scale, window)
    assert got.shape == c["q"].shape and got.dtype == dtype
    torch.testing.assert_close(got, call(paged_attention_decode_ref, c, scale, window), **TOL[dtype])
    torch.testing.assert_close(got, call(dense, c, scale, window), **TOL[dtype])


MATCH = [pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16]),
         pytest.mark.parametrize("ctx", list(CTX)),
         pytest.mark.parametrize("bs", [1, 16, 5]),
         pytest.mark.parametrize("shape", SHAPES),
         pytest.mark.parametrize("window", [0, 4, 20]),
         pytest.mark.parametrize("layout", ["scattered", "in_order", "strided"])]


def _matches(fn):
    for m in reversed(MATCH):
        fn = m(fn)
    return fn


@_matches
def test_matches_cpu(dtype, ctx, bs, shape, window, layout):
    _check_matches("cpu", dtype, ctx, bs, shape, window, layout != "in_order", layout == "strided")


@cuda_only
@_matches
def test_matches_cuda(dtype, ctx, bs, shape, window, layout):
    _check_matches("cuda", dtype, ctx, bs, shape, window, layout != "in_order", layout == "strided")


@cuda_only
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("ctx", list(CTX))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_async_matches_cuda(dtype, ctx, window):  # the executor's op on CUDA: no host copy of the tables
    ctx_lens = CTX[ctx] or [40 + (7 * i) % 17 for i in range(64)]
    c = make_case(ctx_lens, 16, 8, 4, dtype, "cuda")
    got = call(paged_attention_decode_async, c, D ** -0.5, window)
    tol = TOL.get(dtype, {"rtol": 5e-3, "atol": 5e-3})
    torch.testing.assert_close(got, call(paged_attention_decode_ref, c, D ** -0.5, window), **tol)


@pytest.mark.parametrize("head_dim", [8, 40, 128])
def test_head_dims_cpu(head_dim):  # D not a multiple of 16 exercises the masked tails
    c = make_case([3, 33], 16, 4, 2, torch.float32, "cpu", head_dim=head_dim)
    got = call(paged_attention_decode, c, 0.3, 0)
    torch.testing.assert_close(got, call(dense, c, 0.3, 0), **TOL[torch.float32])


@pytest.mark.parametrize("shape", [(28, 4), (16, 4), (32, 8), (128, 8), (16, 1)])
@pytest.mark.parametrize("n", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_groups_cpu(shape, n, dtype):
    """Query heads per kv head of 7 (4 + 2 + 1 in the register-tiled V sums), 4, 16; work items of one
    kv head (few sequences), of all of a sequence's kv heads, and of part of them (128 heads)."""
    ctx = [(37 * i) % 90 + 1 for i in range(n)]
    c = make_case(ctx, 16, *shape, dtype, "cpu", head_dim=72 if shape == (28, 4) else 128, seed=n)
    got = call(paged_attention_decode, c, 0.1, 0)
    torch.testing.assert_close(got, call(paged_attention_decode_ref, c, 0.1, 0), **TOL[dtype])


def test_large_scores_are_stable_cpu():  # online softmax must not overflow exp
    c = make_case([70], 16, 8, 4, torch.float32, "cpu")
    c["q"] *= 100
    got = call(paged_attention_decode, c, 1.0, 0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, call(dense, c, 1.0, 0), rtol=1e-4, atol=1e-4)


def test_empty_batch_cpu():
    c = make_case([5], 16, 8, 4, torch.float32, "cpu")
    c.update(q=c["q"][:0], block_tables=c["block_tables"][:0], context_lens=c["context_lens"][:0])
    assert call(paged_attention_decode, c, 0.1, 0).shape == (0, 8, D)


def _bad(c, **changes):
    return {**c, **changes}


BAD = {  # name -> (change to a good case, text the error must contain)
    "q_dims": (lambda c: _bad(c, q=c["q"][0]), "q must be 3-D"),
    "q_dtype": (lambda c: _bad(c, q=c["q"].double()), "q must be"),
    "k_cache_dtype": (lambda c: _bad(c, k_cache=c["k_cache"].bfloat16()), "k_cache must have q's dtype"),
    "k_cache_head_dim": (lambda c: _bad(c, k_cache=c["k_cache"][..., :32]), "k_cache must be"),
    "k_cache_last_dim": (lambda c: _bad(c, k_cache=c["k_cache"].transpose(2, 3).contiguous()
                                        .transpose(2, 3)), "k_cache must be contiguous in its last dim"),
    "v_cache_shape": (lambda c: _bad(c, v_cache=c["v_cache"][:-1]), "v_cache must have k_cache's shape"),
    "gqa": (lambda c: _bad(c, q=c["q"][:, :7].contiguous()), "multiple of k_cache's kv heads"),
    "block_tables_dtype": (lambda c: _bad(c, block_tables=c["block_tables"].long()), "block_tables must be int32"),
    "block_tables_rows": (lambda c: _bad(c, block_tables=c["block_tables"][:1]), "block_tables must be [N, max_blocks]"),
    "block_id": (lambda c: _bad(c, block_tables=c["block_tables"].index_fill(1, torch.tensor([0]), -1)),
                 "block_tables[0, 0] = -1 is out of range"),
    "context_lens_dtype": (lambda c: _bad(c, context_lens=c["context_lens"].long()), "context_lens must be int32"),
    "context_lens_zero": (lambda c: _bad(c, context_lens=torch.tensor([0, 5], dtype=torch.int32)),
                          "context_lens[0] = 0 must be in [1,"),
    "context_lens_long": (lambda c: _bad(c, context_lens=torch.tensor([3, 10_000], dtype=torch.int32)),
                          "context_lens[1] = 10000 must be in [1,"),
    "sliding_window": (None, "sliding_window must be >= 0"),
}
OP_ONLY = {"q_dtype", "k_cache_last_dim"}  # limits of the C++ kernel, not of the op's semantics


@pytest.mark.parametrize("fn", [paged_attention_decode, paged_attention_decode_ref], ids=["op", "ref"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_name_the_argument_cpu(fn, case):
    if fn is paged_attention_decode_ref and case in OP_ONLY:
        pytest.skip("the reference accepts this")
    c = make_case([20, 5], 16, 8, 4, torch.float32, "cpu")
    change, text = BAD[case]
    window = -1 if change is None else 0
    with pytest.raises((RuntimeError, ValueError), match=text.replace("[", r"\[").replace("(", r"\(")):
        call(fn, change(c) if change else c, 0.1, window)


def test_unread_blocks_are_not_checked_cpu():  # a window skips early blocks: their ids may be junk
    c = make_case([40], 8, 8, 4, torch.float32, "cpu")
    c["block_tables"][0, 0] = -5
    got = call(paged_attention_decode, c, 0.2, 16)
    torch.testing.assert_close(got, call(dense, c, 0.2, 16), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(dtype):
    c = make_case([1, 17, 40], 16, 8, 4, dtype, "cpu")
    torch.library.opcheck(torch.ops.openlora.paged_attention_decode.default,
                          (c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["context_lens"],
                           0.125, 0))
