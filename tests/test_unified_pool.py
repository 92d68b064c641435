"""The unified KV/adapter pool (--unified-kv-adapter-pool, S-LoRA's unified paging), on CPU.

Adapter pages and KV blocks share one buffer: idle KV memory holds more adapters than the arena
alone (and a batch over them matches transformers+peft, so KV writes never touch lent blocks); when
KV demand grows, cold adapters give their blocks back before any sequence is preempted, and an
adapter a request uses is never taken. A lent block's pages are exactly that block's K and V.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from test_engine_oracle import oracle, run

from services.executor.adapters.arena import ArenaLayout
from services.executor.adapters.reader import read_adapter
from services.executor.adapters.residency import Residency
from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.executor.kv_cache import KVBlockAllocator, KVCache, bytes_per_block, unified_pool
from services.executor.model.loader import read_config
from services.synthetic import AdapterSpec, write_adapter

BLOCK = 4
MAX_LEN = 32                         # the lender keeps one full-length sequence's 8 blocks free
KV_BLOCKS = 40


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("unified")
    for i in range(11):
        write_adapter(r / f"u{i:02d}", TINY["llama"],
                      AdapterSpec(rank=2, alpha=8, targets=("q_proj", "v_proj"), seed=800 + i))
    return r


def adapter_bytes(llama_dir, root) -> int:
    _, cfg = read_config(llama_dir)
    layout = ArenaLayout.for_model(cfg)
    return layout.pages_needed(read_adapter(root / "u00", cfg, 8)) * layout.page_elems * 4


def engine(llama_dir, root, unified=True, host_adapters=2, device_adapters=0) -> Engine:
    per_block = bytes_per_block(2, BLOCK, 2, 16, torch.float32)
    cfg = ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32", max_lora_rank=8,
                         kv_block_size=BLOCK, max_model_len=MAX_LEN, max_prefill_tokens=64,
                         kv_cache_bytes=KV_BLOCKS * per_block, unified_kv_adapter_pool=unified,
                         host_cache_bytes=host_adapters * adapter_bytes(llama_dir, root), adapter_wait_s=20,
                         enable_prefix_caching=False,
                         device_cache_bytes=device_adapters * adapter_bytes(llama_dir, root))
    return Engine(cfg, LocalDirSource(root))


def request(i, name, prompt_len, n_new):
    g = torch.Generator().manual_seed(100 + i)
    prompt = torch.randint(2, TINY["llama"].vocab, (prompt_len,), generator=g).tolist()
    return GenerationRequest(f"r{i}", prompt_token_ids=prompt, adapter_id=name or "",
                             sampling=SamplingOptions(max_new_tokens=n_new, ignore_eos=True))


def check(llama_dir, root, out, reqs):
    for r in reqs:
        o = out[r.request_id]
        assert o["error"] is None, o["error"]
        want, lp = oracle(llama_dir, root / r.adapter_id if r.adapter_id else None, r.prompt_token_ids,
                          r.sampling.max_new_tokens)
        assert o["tokens"] == want, r.request_id
        torch.testing.assert_close(torch.tensor(o["logprobs"]), torch.tensor(lp), atol=1e-4, rtol=0)


def test_a_lent_blocks_pages_are_exactly_its_k_and_v():
    alloc = KVBlockAllocator(6)
    lender, pages, buf = unified_pool(alloc, layers=2, block_size=4, kv_heads=2, head_dim=16,
                                      dtype=torch.float32, device=torch.device("cpu"), page_elems=32,
                                      own_pages=5, reserve=2)
    kv = KVCache(layers=2, num_blocks=6, block_size=4, kv_heads=2, head_dim=16, dtype=torch.float32,
                 device=torch.device("cpu"), buffer=buf)
    assert lender.pages_per_block == 16 and lender.max_blocks() == 4
    for b in range(6):
        ids = lender.block_pages(b)
        assert {lender.block_of(p) for p in ids} == {b} and min(ids) >= 5
        pages[ids] = float(b + 1)
    for b in range(6):
        assert (kv.k[:, b] == b + 1).all() and (kv.v[:, b] == b + 1).all()
    assert (pages[:5] == 0).all()                                   # the pool's own pages untouched
    assert lender.lend(4) is not None and lender.lend(1) is None    # the reserve stays for sequences
    with pytest.raises(ValueError, match="--arena-page-elems"):
        unified_pool(alloc, layers=2, block_size=4, kv_heads=2, head_dim=16, dtype=torch.float32,
                     device=torch.device("cpu"), page_elems=48, own_pages=0, reserve=0)


def test_idle_kv_memory_holds_more_adapters_than_the_arena_alone(llama_dir, root):
    names = [f"u{i:02d}" for i in range(10)]
    plain = engine(llama_dir, root, unified=False)
    try:
        for n in names:
            plain.load_adapter(n, 0)
        plain_held = len(plain.adapters.residency())
    finally:
        plain.stop()
    e = engine(llama_dir, root)
    try:
        for n in names:
            assert e.load_adapter(n, 0) == (1, "host")
        st = e.status()
        assert len(st.adapters) == 10 > plain_held == 2
        assert st.unified_kv_adapter_pool and st.host_cache_bytes > e.config.host_cache_bytes
        borrowed = e.arena.borrowed_blocks
        assert borrowed > 0 and st.kv_blocks_free == KV_BLOCKS - borrowed
        reqs = [request(i, n, 3 + i % 3, 4) for i, n in enumerate(names)]
        out = run(e, reqs)
    finally:
        e.stop()
    check(llama_dir, root, out, reqs)


def test_with_a_device_tier_the_device_pool_is_what_borrows_kv_blocks(llama_dir, root):
    """The kernel's pool shares the KV's memory: with --device-cache-bytes that is the device pool
    (on CUDA, GPU memory next to the KV cache); the host arena keeps its own budget."""
    names = [f"u{i:02d}" for i in range(6)]
    e = engine(llama_dir, root, host_adapters=12, device_adapters=2)
    try:
        for n in names:
            assert e.load_adapter(n, 0) == (1, "device")
        st = e.status()
        assert e.runner.pool is e.device_pool and e.device_pool.borrowed_blocks > 0
        assert e.arena.borrowed_blocks == 0 and st.host_cache_bytes == e.config.host_cache_bytes
        assert {a.tier for a in st.adapters} == {"device"} and len(st.adapters) == 6
        assert st.device_cache_bytes > e.config.device_cache_bytes
        assert st.kv_blocks_free == KV_BLOCKS - e.device_pool.borrowed_blocks
        reqs = [request(i, n, 4, 3) for i, n in enumerate(names[:3])]
        out = run(e, reqs)
    finally:
        e.stop()
    check(llama_dir, root, out, reqs)


def test_kv_demand_takes_cold_adapters_back_before_preempting_and_never_a_used_one(
        llama_dir, root, monkeypatch):
    taken_in_use, preempted = [], []
    release = Residency._release_memory

    def watched(self, held):
        if held.pins:
            taken_in_use.append(held.key)
        release(self, held)

    monkeypatch.setattr(Residency, "_release_memory", watched)
    e = engine(llama_dir, root)
    preempt = e.scheduler._preempt
    e.scheduler._preempt = lambda seq: (preempted.append(seq.seq_id), preempt(seq))
    try:
        for i in range(10):                       # cold adapters fill most of the idle KV memory
            e.load_adapter(f"u{i:02d}", 0)
        borrowed = e.arena.borrowed_blocks
        assert borrowed >= 15, borrowed
        # the hot adapter's request and four base ones: 35 blocks, more than the 40 - borrowed free
        reqs = [request(0, "u10", 8, 20)] + [request(i, None, 12, 16) for i in range(1, 5)]
        out = run(e, reqs)
        st = e.status()
    finally:
        e.stop()
    assert not preempted and not taken_in_use
    host = next(t for t in st.tier_stats if t.tier == "host")
    assert host.evictions >= 5 and e.arena.borrowed_blocks < borrowed, (host, e.arena.borrowed_blocks)
    check(llama_dir, root, out, reqs)
