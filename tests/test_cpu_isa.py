"""One build carries the served CPU ops' hot loops (lora_paged_add_, paged attention, the layer ops) for
every instruction set (AVX-512 with and without AVX512_BF16, AVX2 + FMA, generic x86-64), and the one
in use is picked at run time. Every path this CPU can run is checked here against float64 (or the
op's reference); the others are skipped with the flags this CPU lacks (and forcing them must fail,
not crash). The objects carry the vector code they claim: ymm/zmm instructions where objdump exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.executor import ops

# What each path needs, as /proc/cpuinfo names the flags (cpp/cpu_isa.cpp asks __builtin_cpu_supports).
NEEDS = {
    "avx512_bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"},
    "avx2": {"avx2", "fma"},
    "generic": set(),
}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(scope="module", autouse=True)
def _cpp_kernels():
    if ops.ensure_built() != "cpp":
        pytest.skip("the C++ extension is not built (reference backend)")
    yield
    ops.set_cpu_kernels("auto")


@pytest.mark.parametrize("isa", list(NEEDS))
def test_forcing_a_path_this_cpu_lacks_fails_and_auto_picks_the_best(isa):
    missing = NEEDS[isa] - cpu_flags()
    if missing:
        with pytest.raises(RuntimeError, match="lacks"):
            ops.set_cpu_kernels(isa)
    else:
        ops.set_cpu_kernels(isa)
        assert ops.cpu_isa() == isa
    ops.set_cpu_kernels("auto")
    best = next(name for name, needs in NEEDS.items() if needs <= cpu_flags())
    assert ops.cpu_isa() == best
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        torch.ops.openlora.set_cpu_isa("sse9")


# -- the served ops (lora_paged_add_, paged attention, the layer ops): one table per instruction set ---

def paged_case(lens, ranks, d_in, d_out, P, dtype, seed=0):
    """Random arena pages and a page_index for len(lens) segments of the given ranks (0: base only) at
    lm = 1 of LM = 2 (lm 0 holds other ranks, which the call must not read)."""
    g = torch.Generator().manual_seed(seed)
    ca, cb = -(-d_in // P), -(-d_out // P)
    G, T = len(lens), sum(lens)
    num_pages = 3 + sum(r * (ca + cb) for r in ranks)
    ids, meta = [], torch.zeros(G, 2, 2, dtype=torch.int32)
    for gi, r in enumerate(ranks):
        meta[gi, 0] = torch.tensor([0, 1 + gi % 3], dtype=torch.int32)
        meta[gi, 1] = torch.tensor([len(ids), r], dtype=torch.int32)
        ids += torch.randint(0, num_pages, (r * (ca + cb),), generator=g).tolist()
    return {
        "y": torch.randn(T, d_out, generator=g).to(dtype),
        "x": torch.randn(T, d_in, generator=g).to(dtype),
        "arena": (torch.randn(num_pages, P, generator=g) * 0.3).to(dtype),
        "page_index": torch.tensor(ids or [0], dtype=torch.int32),
        "seg_meta": meta,
        "seg_scalings": torch.rand(G, 2, generator=g) * 2,
        "lm": 1,
        "seg_indptr": torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32),
    }


PAGED_ORDER = ("y", "x", "arena", "page_index", "seg_meta", "seg_scalings", "lm", "seg_indptr")


def check_paged_against_float64(case, dtype):
    y = case["y"].clone()
    ops.lora_paged_add_(*[y if k == "y" else case[k] for k in PAGED_ORDER])
    wide = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "seg_scalings"
                else v) for k, v in case.items()}
    ref = wide["y"].clone()
    ops.lora_paged_add_ref(*[ref if k == "y" else wide[k] for k in PAGED_ORDER])
    absolute = {k: (v.abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in wide.items()}
    magnitude = absolute["y"].clone()  # the same sums of |terms|
    ops.lora_paged_add_ref(*[magnitude if k == "y" else absolute[k] for k in PAGED_ORDER])
    d_in, r_max = case["x"].shape[1], int(case["seg_meta"][:, 1, 1].max())
    bound = (d_in + r_max + 4) * 2.0 ** -23 * magnitude  # fp32 rounding, worst case
    if dtype == torch.bfloat16:  # y rounded once to bf16
        bound = bound + 2.0 ** -8 * (ref.abs() + bound) * 1.05
    assert not y.isnan().any()
    excess = (y.double() - ref).abs() - bound
    assert (excess <= 0).all(), f"exceeds the bound by up to {float(excess.max())}"


def use_isa(isa):
    missing = NEEDS[isa] - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}: the {isa} path is built but cannot run here")
    ops.set_cpu_kernels(isa)
    assert ops.cpu_isa() == isa


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype, pages", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float32, torch.bfloat16)],
                         ids=["float32", "bfloat16", "bf16-pages"])
@pytest.mark.parametrize("isa", list(NEEDS))
def test_lora_paged_add_on_every_path_matches_float64(isa, dtype, pages, threads):
    """Segments of 1..70 tokens (every register tile shape and row block), ranks 1..64 and base-only
    segments, pages smaller and larger than a tile's columns, cut mid-row; one and two threads.
    bf16-pages: --lora-dtype bfloat16 with a float32 model, float32 x and y over bfloat16 pages widened
    as read; every product and sum is fp32's, so the fp32 bound holds against float64 math on the
    pages' values."""
    use_isa(isa)
    lens = [1, 2, 3, 4, 5, 7, 8, 9, 33, 70, 1, 12, 6]
    ranks = [1, 8, 0, 16, 64, 3, 5, 2, 7, 13, 0, 4, 17]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dims in [(33, 17, 8), (100, 75, 40), (64, 96, 16), (48, 700, 300), (300, 40, 512), (256, 512, 64)]:
            case = paged_case(lens, ranks, *dims, dtype)
            case["arena"] = case["arena"].to(pages)
            check_paged_against_float64(case, dtype)
    finally:
        torch.set_num_threads(old)
        ops.set_cpu_kernels("auto")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", list(NEEDS))
def test_lora_paged_add_work_items_with_empty_and_lone_segments(isa, threads):
    """Work items are (segment, 32-row block), each its shrink then its expand, prefetching the next
    item's first pages: empty segments (0 rows) between and at both ends, one item only (fewer items
    than threads), many blocks of one segment, and a next segment whose rank is below a tile's."""
    use_isa(isa)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens, ranks in [([0, 3, 0, 0, 1, 0], [4, 5, 9, 0, 2, 7]),   # empty segments around
                            ([1], [33]),                                 # one item
                            ([100, 2], [19, 1]),                         # 4 blocks, then a rank-1 one
                            ([0, 0], [8, 8])]:                           # nothing to do at all
            for dims in [(40, 24, 16), (512, 300, 128)]:
                check_paged_against_float64(paged_case(lens, ranks, *dims, torch.float32), torch.float32)
    finally:
        torch.set_num_threads(old)
        ops.set_cpu_kernels("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", list(NEEDS))
def test_paged_attention_on_every_path_matches_float64(isa, dtype):
    from tests.test_paged_attention import TOL, call, dense, make_case
    use_isa(isa)
    try:
        for ctx, bs, (heads, kv_heads), head_dim, window in [
                ([1, 15, 16, 17, 300], 16, (8, 4), 64, 0), ([40, 7, 129], 5, (6, 2), 72, 20),
                ([33, 64], 16, (8, 1), 128, 0), ([9, 70], 1, (4, 4), 20, 0)]:
            c = make_case(ctx, bs, heads, kv_heads, dtype, "cpu", head_dim=head_dim)
            scale = head_dim ** -0.5
            torch.testing.assert_close(call(ops.paged_attention_decode, c, scale, window),
                                       call(dense, c, scale, window), **TOL[dtype])
    finally:
        ops.set_cpu_kernels("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", list(NEEDS))
def test_layer_ops_on_every_path_match_their_references(isa, dtype):
    from tests.test_layer_ops import _check_norms, _check_rotary, _check_silu_mul
    use_isa(isa)
    try:
        for rows, n in [(1, 512), (7, 1376), (3, 5), (0, 16), (33, 100)]:
            _check_norms("cpu", dtype, rows, n)
            _check_silu_mul("cpu", dtype, rows, n)
        for rows, heads, head_dim in [(1, 8, 64), (33, 2, 128), (5, 3, 6), (4, 2, 40)]:
            _check_rotary("cpu", dtype, rows, heads, head_dim)
    finally:
        ops.set_cpu_kernels("auto")


def test_each_isa_object_holds_its_vector_instructions():
    """The per-ISA objects of the build hold what their flags promise (AVX2: ymm, no zmm; AVX-512: zmm;
    AVX512_BF16: vdpbf16ps; generic: neither), so a flag lost in build.py cannot go unnoticed."""
    import shutil
    import subprocess

    from services.executor.ops import build
    if shutil.which("objdump") is None:
        pytest.skip("no objdump")
    so = build.build()
    want = {"generic": (False, False, False), "avx2": (True, False, False), "avx512": (True, True, False),
            "avx512_bf16": (True, True, True)}
    for isa, (ymm, zmm, dpbf16) in want.items():
        text = subprocess.run(["objdump", "-d", str(so.parent / f"cpu_kernels_{isa}.o")], capture_output=True,
                              text=True, check=True).stdout
        assert ("ymm" in text, "zmm" in text, "vdpbf16ps" in text) == (ymm, zmm, dpbf16), isa
