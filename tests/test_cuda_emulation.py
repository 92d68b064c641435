"""The CUDA kernels (cpp/cuda), host code included, run on CPU threads against the references.

build.build_cuda_emulation() compiles cpp/cuda/*.cu as plain C++ over cpp/cuda/emulation.h, where a
launch runs its blocks one after another with one std::thread per CUDA thread (barriers for
__syncthreads, a two-phase exchange for warp shuffles): torch.ops.openlora_emu.{lora_paged_add_,
paged_attention_decode[_async], rms_norm, add_rms_norm, silu_mul, rotary} on CPU tensors. This checks
the kernels' indexing, shuffles, shared memory and bounds on a machine without a GPU, and that bad
index values never read or write out of bounds (each op's bad-index tests); what it cannot check
(memory model, timing) the *_cuda tests of test_lora_paged.py, test_paged_attention.py and
test_layer_ops.py do where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from test_paged_attention import call, dense, make_case

from services.executor import ops
from services.executor.ops import build, lora_paged_add_ref, paged_attention_decode_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=6e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}


@pytest.fixture(scope="module")
def emu():
    build.build_cuda_emulation()
    return torch.ops.openlora_emu


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("shape", [(8, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_kernel_matches_reference(emu, dtype, shape, window):
    """Contexts of 1..300 keys (one warp's worth, a block edge, many blocks), scattered blocks, GQA 2 and 3,
    MQA and a sliding window."""
    c = make_case([1, 17, 300, 33], 16, *shape, dtype, "cpu", seed=5)
    got = call(emu.paged_attention_decode, c, 0.125, window)
    assert got.shape == c["q"].shape and got.dtype == dtype
    tol = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}}.get(dtype, TOL[dtype])
    torch.testing.assert_close(got, call(paged_attention_decode_ref, c, 0.125, window), **tol)
    torch.testing.assert_close(got, call(dense, c, 0.125, window), **tol)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_async_matches_reference(emu, dtype, window):
    c = make_case([1, 17, 300, 33], 16, 8, 4, dtype, "cpu", seed=8)
    got = call(emu.paged_attention_decode_async, c, 0.125, window)
    torch.testing.assert_close(got, call(paged_attention_decode_ref, c, 0.125, window), **TOL[dtype])


def test_paged_attention_async_bounds_bad_values_on_the_device(emu):
    """Unchecked values never read out of bounds: a context past its table is clipped to the table, a
    key in a block outside the cache is skipped, and a sequence with no key left gets zeros."""
    c = make_case([20, 20, 20], 16, 4, 2, torch.float32, "cpu", seed=9)  # tables of 3 blocks
    good = call(paged_attention_decode_ref, c, 0.1, 0)
    c["context_lens"] = torch.tensor([20, 500, 20], dtype=torch.int32)
    c["block_tables"][2] = 10_000                  # sequence 2: no block in the cache
    got = call(emu.paged_attention_decode_async, c, 0.1, 0)
    torch.testing.assert_close(got[0], good[0])
    assert got[1].isfinite().all()                # 48 keys: the table's 3 blocks, the 3rd unused
    torch.testing.assert_close(got[2], torch.zeros_like(got[2]))


@pytest.mark.parametrize("head_dim", [8, 72, 256])
def test_paged_attention_head_dims_and_strided_cache(emu, head_dim):
    """Head dims below one warp, not a multiple of 32, and the largest supported; K and V interleaved
    in one cache tensor (non-contiguous views)."""
    c = make_case([9, 40], 5, 4, 2, torch.float32, "cpu", head_dim=head_dim, strided=True, seed=6)
    got = call(emu.paged_attention_decode, c, 0.3, 0)
    # the oracle in float64: an fp32 reference is itself ~1e-5 off at D = 256 on some CPUs (AMD EPYC)
    c64 = {k: v.double() if v.is_floating_point() else v for k, v in c.items()}
    want = call(paged_attention_decode_ref, c64, 0.3, 0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_paged_attention_bad_input_is_refused(emu):
    c = make_case([20], 16, 4, 2, torch.float32, "cpu")
    c["block_tables"][0, 1] = 99
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 1\] = 99 is out of range"):
        call(emu.paged_attention_decode, c, 0.1, 0)
    c = make_case([4], 16, 4, 2, torch.float32, "cpu", head_dim=264)
    with pytest.raises(RuntimeError, match="head dim D = 264 must be <= 256"):
        call(emu.paged_attention_decode, c, 0.1, 0)


# -- the decoder layer's elementwise ops (cpp/cuda/layer_ops.cu) ---------------------------------------

def assert_rounded_like(got, want, exact_bf16=True):
    """As tests/test_layer_ops.py: bf16 bit for bit where the op is elementwise, two ulps for the
    norms (their fp32 sums run in another order); fp16 within an ulp or two; fp32 a few ulps."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16 and exact_bf16:
        assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} differ"
    else:
        tol = {torch.float32: 1e-6, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}[got.dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=1e-6)


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("rows, n", [(1, 512), (64, 512), (7, 1376), (3, 5), (0, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_kernels_match_reference(emu, dtype, rows, n):
    from services.executor.ops import add_rms_norm_ref, rms_norm_ref
    x = randn(rows, n, dtype=dtype, seed=1, scale=3.0)
    res, w = randn(rows, n, dtype=dtype, seed=2), randn(n, dtype=dtype, seed=3) + 1
    assert_rounded_like(emu.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), exact_bf16=False)
    (y, h), (y_ref, h_ref) = emu.add_rms_norm(x, res, w, 1e-5), add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(h, h_ref)         # the residual stream is exactly eager's x + residual
    assert_rounded_like(y, y_ref, exact_bf16=False)


@pytest.mark.parametrize("rows, n", [(7, 1376), (1, 5), (0, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_kernel_matches_reference(emu, dtype, rows, n):
    from services.executor.ops import silu_mul_ref
    gate, up = randn(rows, n, dtype=dtype, seed=4, scale=4.0), randn(rows, n, dtype=dtype, seed=5)
    assert_rounded_like(emu.silu_mul(gate, up), silu_mul_ref(gate, up))


@pytest.mark.parametrize("rows, heads, head_dim", [(1, 8, 64), (64, 4, 64), (5, 3, 6), (0, 2, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kernel_matches_reference(emu, dtype, rows, heads, head_dim):
    from services.executor.ops import rotary_ref
    x = randn(rows, heads, head_dim, dtype=dtype, seed=6)
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat((pos * inv, pos * inv), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    assert_rounded_like(emu.rotary(x, cos, sin), rotary_ref(x, cos, sin))


def test_layer_ops_bad_input_names_the_argument(emu):
    with pytest.raises(RuntimeError, match=r"weight must be \[8\]"):
        emu.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="gate must be float32, bfloat16 or float16 on CUDA"):
        emu.silu_mul(torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must be even"):
        emu.rotary(torch.ones(2, 1, 7), torch.ones(2, 7), torch.ones(2, 7))


# -- the adapter arena's op (cpp/cuda/lora_paged.cu) ---------------------------------------------------

@pytest.mark.parametrize("page_elems", [0, 7, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_paged_kernel_matches_reference(emu, dtype, page_elems):
    """Mixed ranks {1, 8, 16, 64} and base-only segments, short and long (past one 8-token block),
    pages of any size (rows spanning pages), against the reference; a bad page id reads as zeros."""
    from test_lora_paged import place, random_adapter, tiny_cfg

    from services.executor.adapters.arena import ArenaLayout, HostArena
    from services.executor.ops import lora_paged_add_ref
    cfg = tiny_cfg()
    layout = ArenaLayout.for_model(cfg, page_elems)
    arena = HostArena(layout, 4 * 1024 * 1024, dtype)
    entries = [place(arena, random_adapter(cfg, r, seed=r)) for r in (1, 8, 16, 64)]
    order, counts = [0, None, 1, 2, 3], [3, 2, 1, 19, 9]
    indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    batch = arena.batch([entries[i] if i is not None else None for i in order])
    g = torch.Generator().manual_seed(1)
    for module in ("q_proj", "down_proj", "v_proj"):
        d_out, d_in = cfg.module_shape(module)
        lm = layout.lm(1, module)
        x = torch.randn(sum(counts), d_in, generator=g).to(dtype)
        y0 = torch.randn(sum(counts), d_out, generator=g).to(dtype)
        got, want = y0.clone(), y0.clone()
        emu.lora_paged_add_(got, x, batch.arena, batch.page_index, batch.seg_meta, batch.seg_scalings,
                            lm, indptr)
        lora_paged_add_ref(want, x, batch.arena, batch.page_index, batch.seg_meta, batch.seg_scalings,
                           lm, indptr)
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_lora_paged_kernel_reads_bfloat16_pages_under_float32(emu):
    """--lora-dtype bfloat16 on a float32 model: the kernel widens each page value as it reads it, so it
    equals the reference over the same pages at fp32's tolerance."""
    from test_lora_paged import place, random_adapter, tiny_cfg

    from services.executor.adapters.arena import ArenaLayout, HostArena
    from services.executor.ops import lora_paged_add_ref
    cfg = tiny_cfg()
    layout = ArenaLayout.for_model(cfg, 40)
    arena = HostArena(layout, 4 * 1024 * 1024, torch.bfloat16)
    entries = [place(arena, random_adapter(cfg, r, seed=r)) for r in (1, 16, 64)]
    counts = [3, 19, 9]
    indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    batch = arena.batch(entries)
    g = torch.Generator().manual_seed(2)
    for module in ("q_proj", "down_proj"):
        d_out, d_in = cfg.module_shape(module)
        lm = layout.lm(0, module)
        x = torch.randn(sum(counts), d_in, generator=g)
        y0 = torch.randn(sum(counts), d_out, generator=g)
        got, want = y0.clone(), y0.clone()
        emu.lora_paged_add_(got, x, batch.arena, batch.page_index, batch.seg_meta, batch.seg_scalings,
                            lm, indptr)
        lora_paged_add_ref(want, x, batch.arena, batch.page_index, batch.seg_meta, batch.seg_scalings,
                           lm, indptr)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="arena must have x's dtype"):   # only bf16 pages under fp32 x
        emu.lora_paged_add_(got.bfloat16(), x.bfloat16(), batch.arena.float(), batch.page_index,
                            batch.seg_meta, batch.seg_scalings, 0, indptr)


# -- bad index values: the CUDA ops never read or write out of bounds ---------------------------------

def _paged_case(dtype=torch.float32, seed=3):
    """T = 10 tokens in 3 segments (ranks 4, 0, 3) over 2 (layer, module)s; lm 1 is served."""
    g = torch.Generator().manual_seed(seed)
    T, d_in, d_out, P = 10, 24, 40, 16
    ca, cb = -(-d_in // P), -(-d_out // P)
    ranks = [4, 0, 3]
    pages, meta = [], torch.zeros(3, 2, 2, dtype=torch.int32)
    for gi, r in enumerate(ranks):
        meta[gi, 1] = torch.tensor([len(pages), r], dtype=torch.int32)
        pages += list(range(len(pages), len(pages) + r * (ca + cb)))
    return dict(y=torch.randn(T, d_out, generator=g).to(dtype), x=torch.randn(T, d_in, generator=g).to(dtype),
                arena=torch.randn(len(pages) + 2, P, generator=g).to(dtype),
                page_index=torch.tensor(pages, dtype=torch.int32), seg_meta=meta,
                seg_scalings=torch.tensor([[1.0, 0.5], [1.0, 2.0], [1.0, 1.5]]), lm=1,
                seg_indptr=torch.tensor([0, 3, 5, 10], dtype=torch.int32))


PAGED = ("y", "x", "arena", "page_index", "seg_meta", "seg_scalings", "lm", "seg_indptr")


def _paged_run(fn, c, **change):
    c = {**c, **change}
    y = c["y"].clone()
    fn(*[y if k == "y" else c[k] for k in PAGED])
    return y


def _guarded(c):
    """The case's y, x and arena inside bigger buffers filled with a canary: anything the kernel reads
    out of bounds is NaN (and shows in y), anything it writes out of bounds changes the canary."""
    out = {}
    for k in ("y", "x", "arena"):
        t = c[k]
        buf = torch.full((t.numel() + 2 * 4096,), float("nan"), dtype=t.dtype)
        buf[4096:4096 + t.numel()] = t.flatten()
        out[k] = (buf, buf[4096:4096 + t.numel()].view(t.shape))
    return out


def test_lora_paged_bad_segment_bounds_touch_rows_0_to_T_only(emu):
    """seg_indptr past T (the issue's [0, T + 4]), below 0, or decreasing: the kernel clips each
    segment's rows to [0, T); nothing outside y's and x's memory is read or written."""
    c = _paged_case()
    T = c["x"].shape[0]
    for indptr in ([0, 3, 5, T + 4], [-6, 3, 5, T], [0, 8, 5, T], [0, T + 100, T + 200, T + 300]):
        g = _guarded(c)
        y_buf, y = g["y"]
        emu.lora_paged_add_(y, g["x"][1], g["arena"][1], c["page_index"], c["seg_meta"], c["seg_scalings"],
                            1, torch.tensor(indptr, dtype=torch.int32))
        assert not y.isnan().any(), indptr                 # nothing read outside x, arena
        assert y_buf[:4096].isnan().all() and y_buf[4096 + y.numel():].isnan().all(), indptr  # nor written
        clipped = torch.tensor([min(max(v, 0), T) for v in indptr], dtype=torch.int32)
        torch.testing.assert_close(y, _paged_run(lora_paged_add_ref, c, seg_indptr=clipped), **TOL[torch.float32])


def test_lora_paged_bad_page_ids_offsets_and_ranks_add_nothing_of_theirs(emu):
    """A page id outside the arena reads as zeros; an offset or rank running past page_index's end, a
    negative offset or rank, or a rank above the kernel's shared memory (CUDA_MAX_LORA_RANK) adds nothing
    for that segment (never a clipped, partial update); the other segments are exact."""
    c = _paged_case()
    good = _paged_run(lora_paged_add_ref, c)
    for gi, (off, r) in [(0, (0, 10_000)), (0, (-3, 4)), (2, (10_000, 3)), (0, (0, -2)),
                         (0, (0, ops.CUDA_MAX_LORA_RANK + 1))]:
        meta = c["seg_meta"].clone()
        meta[gi, 1] = torch.tensor([off, r], dtype=torch.int32)
        g = _guarded(c)
        y_buf, y = g["y"]
        emu.lora_paged_add_(y, g["x"][1], g["arena"][1], c["page_index"], meta, c["seg_scalings"], 1,
                            c["seg_indptr"])
        assert not y.isnan().any() and y_buf[:4096].isnan().all() and y_buf[4096 + y.numel():].isnan().all()
        rows = slice(int(c["seg_indptr"][gi]), int(c["seg_indptr"][gi + 1]))
        torch.testing.assert_close(y[rows], c["y"][rows])             # that segment: base only
        others = torch.ones(y.shape[0], dtype=torch.bool)
        others[rows] = False
        torch.testing.assert_close(y[others], good[others], **TOL[torch.float32])
    pages = c["page_index"].clone()
    pages[0] = 10**6                                                  # one page of A's row 0
    g = _guarded(c)
    y_buf, y = g["y"]
    emu.lora_paged_add_(y, g["x"][1], g["arena"][1], pages, c["seg_meta"], c["seg_scalings"], 1, c["seg_indptr"])
    assert not y.isnan().any()
    arena = torch.cat([c["arena"], torch.zeros(1, c["arena"].shape[1])])
    zeros = pages.clone()
    zeros[0] = arena.shape[0] - 1                                     # the same call with a zero page
    torch.testing.assert_close(y, _paged_run(lora_paged_add_ref, c, arena=arena, page_index=zeros),
                               **TOL[torch.float32])


def test_lora_paged_largest_rank_it_holds_is_exact(emu):
    c = _paged_case()
    r, (ca, cb) = ops.CUDA_MAX_LORA_RANK, (2, 3)
    g = torch.Generator().manual_seed(5)
    arena = torch.randn(r * (ca + cb), 16, generator=g) * 0.1
    meta = torch.tensor([[[0, 0], [0, r]]], dtype=torch.int32)
    args = dict(arena=arena, page_index=torch.arange(r * (ca + cb), dtype=torch.int32), seg_meta=meta,
                seg_scalings=torch.tensor([[1.0, 0.25]]), seg_indptr=torch.tensor([0, 10], dtype=torch.int32))
    torch.testing.assert_close(_paged_run(emu.lora_paged_add_, c, **args), _paged_run(lora_paged_add_ref, c, **args),
                               **TOL[torch.float32])


def test_cuda_max_lora_rank_is_the_kernels_and_the_executor_refuses_more_on_cuda():
    source = (build.CPP_DIR / "cuda" / "lora_paged.cu").read_text()
    assert f"constexpr int kMaxRank = {ops.CUDA_MAX_LORA_RANK};" in source
    from services.common.config import ConfigError
    ops.check_max_lora_rank("cuda", ops.CUDA_MAX_LORA_RANK)
    ops.check_max_lora_rank("cpu", 4 * ops.CUDA_MAX_LORA_RANK)       # the CPU kernel holds any rank
    with pytest.raises(ConfigError, match="max-lora-rank.*must be <= 256 on CUDA"):
        ops.check_max_lora_rank("cuda", ops.CUDA_MAX_LORA_RANK + 1)


def test_lora_paged_refuses_tensors_on_another_device(emu):
    """Every tensor must be on y's device (a CPU arena is not read through a host pointer on CUDA)."""
    c = _paged_case()
    for name in ("x", "arena", "page_index", "seg_meta", "seg_scalings", "seg_indptr"):
        with pytest.raises(RuntimeError, match=f"{name} must be on y's device"):
            _paged_run(emu.lora_paged_add_, c, **{name: c[name].to("meta")})


@pytest.mark.parametrize("case", ["lm", "dtype", "seg_meta", "indptr_dtype"])
def test_lora_paged_bad_shapes_are_refused_before_any_launch(emu, case):
    c = _paged_case()
    change, text = {
        "lm": (dict(lm=2), r"lm = 2 is out of range \[0, LM = 2\)"),
        "dtype": (dict(arena=c["arena"].double()), "arena must have x's dtype"),
        "seg_meta": (dict(seg_meta=c["seg_meta"][:2]), "seg_meta must be a contiguous"),
        "indptr_dtype": (dict(seg_indptr=c["seg_indptr"].long()), "seg_indptr must be"),
    }[case]
    with pytest.raises(RuntimeError, match=text):
        _paged_run(emu.lora_paged_add_, c, **change)


def test_paged_attention_bad_values_are_refused_or_bounded(emu):
    """The checked op raises for every bad value, naming it; the async op (no host copy) bounds it: a
    negative context reads nothing, a table entry outside the cache is skipped, never read."""
    c = make_case([20, 9], 16, 4, 2, torch.float32, "cpu", seed=11)
    good = call(paged_attention_decode_ref, c, 0.1, 0)
    bad = {**c, "context_lens": torch.tensor([20, -5], dtype=torch.int32)}
    with pytest.raises(RuntimeError, match="context_lens"):
        call(emu.paged_attention_decode, bad, 0.1, 0)
    got = call(emu.paged_attention_decode_async, bad, 0.1, 0)
    torch.testing.assert_close(got[0], good[0])
    torch.testing.assert_close(got[1], torch.zeros_like(got[1]))
    tables = c["block_tables"].clone()
    tables[0, 0] = -7
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 0\] = -7"):
        call(emu.paged_attention_decode, {**c, "block_tables": tables}, 0.1, 0)
    got = call(emu.paged_attention_decode_async, {**c, "block_tables": tables}, 0.1, 0)
    assert got.isfinite().all()
    torch.testing.assert_close(got[1], good[1])
    with pytest.raises(RuntimeError, match="block_tables"):
        call(emu.paged_attention_decode, {**c, "block_tables": c["block_tables"].long()}, 0.1, 0)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "silu_mul", "rotary"])
def test_layer_ops_bad_shapes_are_refused_before_any_launch(emu, op):
    """The layer ops take no index values; every shape a launch would index past is refused."""
    calls = {
        "rms_norm": lambda: emu.rms_norm(torch.ones(3, 8), torch.ones(9), 1e-6),
        "add_rms_norm": lambda: emu.add_rms_norm(torch.ones(3, 8), torch.ones(2, 8), torch.ones(8), 1e-6),
        "silu_mul": lambda: emu.silu_mul(torch.ones(3, 8), torch.ones(3, 7)),
        "rotary": lambda: emu.rotary(torch.ones(3, 2, 8), torch.ones(2, 8), torch.ones(3, 8)),
    }
    with pytest.raises(RuntimeError):
        calls[op]()
