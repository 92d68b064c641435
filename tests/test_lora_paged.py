"""torch.ops.openlora.lora_paged_add_ (adapters read in place from the host arena) against its
reference, against dense LoRA math in float64, and its argument checks; plus the arena's layout."""

from __future__ import annotations

import pytest
import torch

from services.executor import ops
from services.executor.adapters.arena import MIN_FAST_PAGE, ArenaLayout, HostArena, default_page_elems
from services.executor.adapters.reader import HostAdapter
from services.executor.model.llama import LORA_MODULES, ModelConfig
from services.executor.ops.memory import HUGE_PAGE, host_pages

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def tiny_cfg(hidden=48, intermediate=80, heads=4, kv_heads=2, layers=2) -> ModelConfig:
    return ModelConfig(arch="llama", vocab=64, hidden=hidden, intermediate=intermediate, layers=layers,
                       heads=heads, kv_heads=kv_heads, head_dim=hidden // heads, rms_eps=1e-6,
                       rope_theta=10000.0, rope_scaling=None, max_positions=128, tie_embeddings=False,
                       qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=None,
                       bos_token_id=None, eos_token_ids=())


def random_adapter(cfg: ModelConfig, rank: int, seed: int, skip=("v_proj",)) -> HostAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(cfg.layers):
        for module in LORA_MODULES:
            if module in skip:
                continue
            d_out, d_in = cfg.module_shape(module)
            a = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            b = torch.randn(d_out, rank, generator=g)
            weights[(layer, module)] = (a, b, 2.0 / rank)
    return HostAdapter(weights=weights, rank=rank)


def place(arena: HostArena, host: HostAdapter):
    ids = arena.allocate(arena.pages_needed(host))
    assert ids is not None
    return arena.write(ids, host)


def dense_delta(x, host: HostAdapter, layer, module):
    if (layer, module) not in host.weights:
        return torch.zeros(())
    a, b, s = host.weights[(layer, module)]
    return s * (x.double() @ a.double().T) @ b.double().T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_elems", [0, 7, 32])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_mixed_ranks_in_one_batch_match_dense_math(device, dtype, page_elems):
    """Ranks {1, 8, 16, 64} and base-only segments in one call, any page size (rows spanning pages,
    last page partly used); every (layer, module), including one the adapters skip. On CUDA the
    arena and tables are copied to the GPU and cpp/cuda/lora_paged.cu runs."""
    cfg = tiny_cfg()
    layout = ArenaLayout.for_model(cfg, page_elems)
    arena = HostArena(layout, 4 * 1024 * 1024, dtype)
    hosts = [random_adapter(cfg, r, seed=r) for r in (1, 8, 16, 64)]
    entries = [place(arena, h) for h in hosts]
    order = [0, None, 1, 2, 3, 1, None]            # segments: adapter index or base only
    counts = [3, 2, 1, 40, 5, 33, 4]           # 40 and 33: the GEMM path for long segments
    T = sum(counts)
    seg_indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    batch = arena.batch([entries[i] if i is not None else None for i in order])
    g = torch.Generator().manual_seed(0)
    for layer in range(cfg.layers):
        for module in LORA_MODULES:
            d_out, d_in = cfg.module_shape(module)
            lm = layout.lm(layer, module)
            x = torch.randn(T, d_in, generator=g).to(dtype)
            base = torch.randn(T, d_out, generator=g).to(dtype)
            y = base.clone().to(device)
            ops.lora_paged_add_(y, x.to(device), batch.arena.to(device), batch.page_index.to(device),
                                batch.seg_meta.to(device), batch.seg_scalings.to(device), lm,
                                seg_indptr.to(device))
            y = y.cpu()
            want = base.double().clone()
            row = 0
            for i, n in zip(order, counts, strict=False):
                if i is not None:
                    want[row:row + n] += dense_delta(x[row:row + n], hosts[i], layer, module)
                row += n
            torch.testing.assert_close(y.double(), want.to(dtype).double() if dtype != torch.float32
                                       else want, **TOL[dtype])
            ref = base.clone()
            ops.lora_paged_add_ref(ref, x, batch.arena, batch.page_index, batch.seg_meta,
                                   batch.seg_scalings, lm, seg_indptr)
            torch.testing.assert_close(y, ref, **TOL[dtype])


def test_work_is_the_true_rank_not_a_maximum():
    """Pages taken are exactly sum over modules of r * (ceil(d_in/P) + ceil(d_out/P)): no padding."""
    cfg = tiny_cfg()
    layout = ArenaLayout.for_model(cfg)
    arena = HostArena(layout, 4 * 1024 * 1024, torch.float32)
    for r in (1, 8, 64):
        host = random_adapter(cfg, r, seed=r, skip=())
        want = sum(r * sum(layout.chunks(layout.lm(layer, m))) for layer in range(cfg.layers) for m in LORA_MODULES)
        assert arena.pages_needed(host) == want
    before = arena.free_pages
    e = place(arena, random_adapter(cfg, 8, seed=1))
    assert arena.free_pages == before - e.pages.numel()
    arena.free(e)
    assert arena.free_pages == before


@pytest.mark.parametrize(("dims", "want"), [
    ((4096, 1024, 14336), 1024),        # Llama-3-8B: k/v's d_out
    ((8, 256, 384, 512, 768), 512),      # an MoE: the router's 8 and k/v's 256 are shorter than a fast page
    ((2048, 128, 512, 768), 512),       # Qwen3-30B-A3B: router 128, k/v 512
    ((64, 32, 172), 64),                # a test model: nothing is that long, so its smallest (>= 64)
    ((16, 8), 16),
])
def test_default_page_is_the_smallest_dimension_long_enough_to_stream(dims, want):
    """--arena-page-elems 0: a row shorter than MIN_FAST_PAGE (an MoE router's [experts]) takes a
    partly used page rather than shrinking every page to its length."""
    assert default_page_elems(list(dims)) == want
    assert MIN_FAST_PAGE == 512


def test_read_back_equals_what_was_written():
    cfg = tiny_cfg()
    layout = ArenaLayout.for_model(cfg, 7)
    arena = HostArena(layout, 1024 * 1024, torch.float32)
    host = random_adapter(cfg, 5, seed=3)
    e = place(arena, host)
    for (layer, module), (a, b, _) in host.weights.items():
        got_a, got_b = arena.read_back(e, layout.lm(layer, module))
        assert torch.equal(got_a, a) and torch.equal(got_b, b)


def test_freed_pages_are_reused_by_other_ranks_without_fragmentation():
    cfg = tiny_cfg()
    layout = ArenaLayout.for_model(cfg)
    small, big = random_adapter(cfg, 2, seed=1), random_adapter(cfg, 16, seed=2)
    arena = HostArena(layout, arena_bytes := arena_size(layout, big) * 1, torch.float32)
    assert arena_bytes and arena.allocate(arena.pages_needed(big)) is not None
    arena = HostArena(layout, arena_size(layout, big), torch.float32)
    smalls = []
    while (ids := arena.allocate(arena.pages_needed(small))) is not None:
        smalls.append(arena.write(ids, small))
    assert arena.allocate(arena.pages_needed(big)) is None
    for e in smalls[::2] + smalls[1::2]:     # freed in a scattered order
        arena.free(e)
    assert place(arena, big).pages.numel() == arena.pages_needed(big)


def arena_size(layout, host):
    elem = 4
    return layout.pages_needed(host) * layout.page_elems * elem


def _good_args(dtype=torch.float32):
    cfg = tiny_cfg()
    layout = ArenaLayout.for_model(cfg, 16)
    arena = HostArena(layout, 1024 * 1024, dtype)
    e = place(arena, random_adapter(cfg, 4, seed=1))
    batch = arena.batch([e, None])
    lm = layout.lm(0, "q_proj")
    d_out, d_in = cfg.module_shape("q_proj")
    return dict(y=torch.zeros(5, d_out, dtype=dtype), x=torch.randn(5, d_in).to(dtype), arena=batch.arena,
                page_index=batch.page_index, seg_meta=batch.seg_meta, seg_scalings=batch.seg_scalings,
                lm=lm, seg_indptr=torch.tensor([0, 3, 5], dtype=torch.int32))


def _call(a):
    ops.lora_paged_add_(a["y"], a["x"], a["arena"], a["page_index"], a["seg_meta"], a["seg_scalings"],
                        a["lm"], a["seg_indptr"])


BAD = {
    "x_dims": (lambda a: a.update(x=a["x"][0]), "x must be 2-D"),
    "y_rows": (lambda a: a.update(y=a["y"][:2]), "y must be [T, d_out]"),
    "arena_dtype": (lambda a: a.update(arena=a["arena"].double()), "arena must have x's dtype"),
    "page_index_dtype": (lambda a: a.update(page_index=a["page_index"].long()), "page_index must be"),
    "seg_meta_shape": (lambda a: a.update(seg_meta=a["seg_meta"][:1]), "seg_meta must be"),
    "seg_scalings_dtype": (lambda a: a.update(seg_scalings=a["seg_scalings"].double()), "seg_scalings must be"),
    "lm": (lambda a: a.update(lm=10_000), "lm = 10000 is out of range"),
    "indptr_end": (lambda a: a.update(seg_indptr=torch.tensor([0, 3, 4], dtype=torch.int32)),
                   "seg_indptr must end at T = 5"),
    "indptr_order": (lambda a: a.update(seg_indptr=torch.tensor([0, 6, 5], dtype=torch.int32)),
                     "seg_indptr must be non-decreasing"),
    "page_id": (lambda a: a["page_index"].fill_(10**8), "is out of range [0, num_pages"),
    "index_past_end": (lambda a: a["seg_meta"][0, a["lm"], 0].fill_(10**6), "past its length"),
    "negative_rank": (lambda a: a["seg_meta"][0, a["lm"], 1].fill_(-1), "has rank -1 < 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_name_the_argument(case):
    a = _good_args()
    change, text = BAD[case]
    change(a)
    with pytest.raises(RuntimeError, match=text.replace("[", r"\[")):
        _call(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    a = _good_args(dtype)
    torch.library.opcheck(torch.ops.openlora.lora_paged_add_.default,
                          (a["y"], a["x"], a["arena"], a["page_index"], a["seg_meta"], a["seg_scalings"],
                           a["lm"], a["seg_indptr"]))


def test_base_only_batch_adds_nothing():
    a = _good_args()
    a["seg_meta"].zero_()
    y0 = a["y"].clone()
    _call(a)
    assert torch.equal(a["y"], y0)


def test_host_pages_are_huge_page_aligned_and_hold_what_is_written():
    """ops.memory.host_pages (the arena's memory): contiguous, 2 MiB-aligned past one huge page,
    plain torch.empty below; the paged op reads it like any tensor."""
    big = host_pages((1100, 512), torch.float32)   # 2.1 MiB
    assert big.shape == (1100, 512) and big.is_contiguous() and big.data_ptr() % HUGE_PAGE == 0
    small = host_pages((3, 7), torch.bfloat16)
    assert small.shape == (3, 7) and small.dtype == torch.bfloat16
    src = torch.randn(1100, 512)
    big.copy_(src)
    assert torch.equal(big, src)
    cfg = tiny_cfg()
    layout = ArenaLayout.for_model(cfg, page_elems=16)
    arena = HostArena(layout, 4 << 20, torch.float32)
    assert arena.pages.data_ptr() % HUGE_PAGE == 0
    host = random_adapter(cfg, 8, seed=5)
    pb = arena.batch([place(arena, host)])
    x = torch.randn(3, cfg.hidden, dtype=torch.float32)
    y = torch.zeros(3, cfg.module_shape("q_proj")[0])
    ops.lora_paged_add_(y, x, pb.arena, pb.page_index, pb.seg_meta, pb.seg_scalings,
                        layout.lm(0, "q_proj"), torch.tensor([0, 3], dtype=torch.int32))
    torch.testing.assert_close(y.double(), dense_delta(x, host, 0, "q_proj"), rtol=1e-5, atol=1e-5)
