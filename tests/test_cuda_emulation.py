"""The CUDA kernels (cpp/cuda), host code included, run on CPU threads against the references.

build.build_cuda_emulation() compiles cpp/cuda/*.cu as plain C++ over cpp/cuda/emulation.h, where a
launch runs its blocks one after another with one std::thread per CUDA thread (barriers for
__syncthreads, a two-phase exchange for warp shuffles): torch.ops.openlora_emu.{lora_linear,
paged_attention_decode} on CPU tensors. This checks the kernels' indexing, shuffles, shared memory,
rank bounds and the host's short/long split and alignment choices on a machine without a GPU; what it
cannot check (memory model, timing) the *_cuda tests of test_kernel.py and test_paged_attention.py do
where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from test_kernel import ARGS, LAYOUTS, TOL, make_args
from test_paged_attention import call, dense, make_case

from services.executor.ops import build, lora_linear_ref, paged_attention_decode_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emu():
    build.build_cuda_emulation()
    return torch.ops.openlora_emu


def lora_args(args):
    return [args[k] for k in ARGS]


# (d_in, d_out, r_max): 16-byte loads for every dtype; for fp32 only (bf16/fp16 rows of 100, 40 and
# 12 elements are not whole 16-byte vectors); for none (d_in = 70)
LORA_DIMS = [(64, 48, 16), (100, 75, 40), (70, 33, 12)]


@pytest.mark.parametrize("dims", LORA_DIMS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_kernels_match_reference(emu, dtype, layout, dims):
    """Short segments (<= 8 tokens: the shrink/expand kernels) and long ones (cuBLAS's GEMMs on a GPU,
    here ATen's), slot -1, ranks 0, 1, 3, 7, r_max / 2 and r_max; the weights past each rank are NaN."""
    args = make_args(*LAYOUTS[layout], *dims, True, dtype, "cpu")
    y = emu.lora_linear(*lora_args(args))
    assert not y.isnan().any()
    torch.testing.assert_close(y, lora_linear_ref(*lora_args(args)), **TOL[dtype])


@pytest.mark.parametrize("dims", LORA_DIMS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_async_kernels_match_reference(emu, dtype, layout, dims):
    """lora_linear_async (no host copy): every segment, 130 tokens included, through the kernels: 64
    tokens of a segment per block (grid z), 8 at a time within it."""
    args = make_args(*LAYOUTS[layout], *dims, True, dtype, "cpu")
    y = emu.lora_linear_async(*lora_args(args))
    assert not y.isnan().any()
    torch.testing.assert_close(y, lora_linear_ref(*lora_args(args)), **TOL[dtype])


@pytest.mark.parametrize("T", [1, 64, 65, 1000])
def test_lora_linear_async_one_long_segment_spreads_over_the_grid(emu, T):
    """One adapter, one segment of T tokens (a prefill): ceil(T / 64) blocks of the grid's z each take
    64 of its tokens (it used to be one block walking all T); block edges at 64 and 65 included."""
    g = torch.Generator().manual_seed(T)
    d_in, d_out, r_max = 64, 48, 16
    x = torch.randn(T, d_in, generator=g)
    weight = torch.randn(d_out, d_in, generator=g) / 8
    lora_a = torch.randn(2, r_max, d_in, generator=g)
    lora_b = torch.randn(2, d_out, r_max, generator=g)
    scalings, ranks = torch.tensor([0.5, 2.0]), torch.tensor([16, 5], dtype=torch.int32)
    indptr, slots = torch.tensor([0, T], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    args = (x, weight, None, lora_a, lora_b, scalings, ranks, indptr, slots)
    want = lora_linear_ref(x.double(), weight.double(), None, lora_a.double(), lora_b.double(),
                           scalings, ranks, indptr, slots)
    torch.testing.assert_close(emu.lora_linear_async(*args).double(), want, rtol=1e-5, atol=1e-4)


def test_lora_linear_async_bounds_bad_indices_on_the_device(emu):
    """Unchecked indices never read out of bounds: a slot past S or below -1 leaves its segment at the
    base layer, a rank past r_max is read as r_max, and starts below 0 or ends past T are clipped."""
    args = make_args([3, 2, 4, 5], [0, 1, 2, 3], 64, 48, 16, True, torch.float32, "cpu", seed=7)
    good = lora_linear_ref(*lora_args(args))
    base = torch.addmm(args["bias"], args["x"], args["weight"].t())
    args["seg_slots"] = torch.tensor([0, 99, 2, -5], dtype=torch.int32)   # 99 >= S, -5 < -1
    args["ranks"] = args["ranks"].clone()
    args["ranks"][0] = 1000                      # slot 0's rank is r_max: read as r_max, the same
    y = emu.lora_linear_async(*lora_args(args))
    assert not y.isnan().any()
    torch.testing.assert_close(y[:3], good[:3])
    torch.testing.assert_close(y[3:5], base[3:5])            # slot 99: base only
    torch.testing.assert_close(y[5:9], good[5:9])
    torch.testing.assert_close(y[9:], base[9:])              # slot -5: base only
    args["seg_slots"] = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    args["seg_indptr"] = torch.tensor([-4, 3, 5, 9, 40], dtype=torch.int32)  # starts < 0, ends > T
    y = emu.lora_linear_async(*lora_args(args))
    torch.testing.assert_close(y, good)                      # clipped to [0, 3) ... [9, 14)


def test_lora_linear_every_short_length_and_misaligned_rows(emu):
    """Segments of 1..9 tokens (9 is long) in one call, with x and lora_a starting 4 bytes past a
    16-byte boundary, so the kernels fall back to scalar loads."""
    lens, slots = [1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 5, 0, 1, 2, 3]
    args = make_args(lens, slots, 64, 40, 16, False, torch.bfloat16, "cpu", seed=3)
    for name in ("x", "lora_a"):
        t = args[name]
        shifted = torch.empty(t.numel() + 2, dtype=t.dtype)[2:].view(t.shape)
        shifted.copy_(t)
        assert shifted.data_ptr() % 16 != 0
        args[name] = shifted
    y = emu.lora_linear(*lora_args(args))
    torch.testing.assert_close(y, lora_linear_ref(*lora_args(args)), **TOL[torch.bfloat16])


def test_lora_linear_large_r_max_takes_the_gemm_path(emu):
    """r_max above the shared-memory bound of the expand kernel: every segment goes to the GEMMs."""
    args = make_args([1, 3, 20], [0, 3, 5], 16, 24, 1030, True, torch.float32, "cpu", seed=4)
    y = emu.lora_linear(*lora_args(args))
    torch.testing.assert_close(y, lora_linear_ref(*lora_args(args)), **TOL[torch.float32])


def test_lora_linear_bad_input_is_refused_before_any_launch(emu):
    args = make_args(*LAYOUTS["mixed"], 64, 48, 16, True, torch.float32, "cpu")
    args["seg_slots"] = args["seg_slots"].clone()
    args["seg_slots"][2] = 6
    with pytest.raises(RuntimeError, match=r"seg_slots\[2\] = 6 is out of range"):
        emu.lora_linear(*lora_args(args))


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
