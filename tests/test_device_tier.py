"""The device tier (--device-cache-bytes) on CPU: a second page pool filled by copy from the host
arena, so the fill/pin/evict logic CUDA runs (there over a side stream) runs in CI.

A mixed batch read from device pages matches transformers+peft, and GetStatus reports the DEVICE
tier; the residency keeps the device tier a subset of the host tier: an adapter evicted from the
device tier stays in the host arena (its next use is a copy, not a load), one evicted from the host
leaves both, and a pinned adapter is never taken from either. The 40-through-4 arena test with a
device tier lives in test_engine_arena.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import TINY
from test_engine_oracle import adapter_roots, check_against_oracle, engine_for, make_requests, run
from test_residency import CountingSource, root  # noqa: F401  (fixtures)

from services.common.errors import ResourceExhausted
from services.common.gen.openlora.v1 import executor_pb2
from services.executor.adapters.arena import ArenaLayout, HostArena
from services.executor.adapters.device import DevicePool
from services.executor.adapters.reader import read_adapter
from services.executor.adapters.residency import Residency
from services.executor.model.loader import read_config
from services.executor.servicer import ExecutorServicer

__all__ = ["adapter_roots"]   # a module fixture, used below


def test_a_batch_read_from_the_device_tier_matches_transformers_peft(model_dirs, adapter_roots):
    adapters = adapter_roots["llama"]
    names = sorted(p.name for p in adapters.iterdir())
    e = engine_for(model_dirs["llama"], adapters, device_cache_bytes=4 << 20)
    assert e.runner.pool is e.device_pool and e.device_pool is not e.arena
    for name in names:
        assert e.load_adapter(name, 0) == (1, "device")
    assert e.load_adapter(names[0], 0, tier="host") == (1, "host")
    requests = make_requests("llama", names, TINY["llama"].vocab)
    try:
        out = run(e, [r for r, _ in requests])
        st = e.status()
        reply = asyncio.run(ExecutorServicer(e, "x").GetStatus(executor_pb2.GetStatusRequest(), None))
    finally:
        e.stop()
    check_against_oracle(model_dirs["llama"], adapters, out, requests)
    dev = next(t for t in st.tier_stats if t.tier == "device")
    host = next(t for t in st.tier_stats if t.tier == "host")
    assert dev.adapters == host.adapters == len(names) and dev.loads == len(names) and dev.evictions == 0
    assert 0 < dev.bytes_used == host.bytes_used <= dev.bytes_capacity == st.device_cache_bytes
    assert dev.hits >= len(requests) - 2      # every adapter request after the loads found it placed
    assert {a.tier for a in st.adapters} == {"device"}
    assert reply.device_cache_bytes == st.device_cache_bytes > 0
    assert reply.device_cache_used_bytes == dev.bytes_used
    d = next(t for t in reply.tier_stats if t.tier == executor_pb2.ADAPTER_TIER_DEVICE)
    assert d.adapters == len(names) and d.loads == len(names) and d.bytes_capacity == st.device_cache_bytes
    assert all(a.tier == executor_pb2.ADAPTER_TIER_DEVICE for a in reply.adapters)


def test_without_a_device_tier_status_reports_none(model_dirs, adapter_roots):
    e = engine_for(model_dirs["llama"], adapter_roots["llama"])
    try:
        assert e.device_pool is None and e.runner.pool is e.arena
        name = sorted(p.name for p in adapter_roots["llama"].iterdir())[0]
        assert e.load_adapter(name, 0) == (1, "host")
        st = e.status()
    finally:
        e.stop()
    assert st.device_cache_bytes == st.device_cache_used_bytes == 0
    dev = next(t for t in st.tier_stats if t.tier == "device")
    assert (dev.adapters, dev.bytes_capacity, dev.loads) == (0, 0, 0)


# -- the residency over two tiers -------------------------------------------------------------

@pytest.fixture
def tiers(llama_dir, root):  # noqa: F811
    """tiers(host_n, device_n, **kw) -> a Residency whose arena holds host_n rank-4 adapters and
    whose device pool (CPU) holds device_n."""
    _, cfg = read_config(llama_dir)
    made = []

    def build(host_n: float, device_n: float, **kw) -> Residency:
        layout = ArenaLayout.for_model(cfg)
        probe = HostArena(layout, 64 << 20, torch.float32)
        per = probe.pages_needed(read_adapter(root / "a0", cfg, 16)) * probe.page_bytes
        arena = HostArena(layout, int(host_n * per), torch.float32)
        pool = DevicePool(layout, int(device_n * per), torch.float32, torch.device("cpu"))
        res = Residency(arena, CountingSource(root), cfg, 16, device=pool, **kw)
        made.append(res)
        return res

    yield build
    for r in made:
        r.close()


def placed(res: Residency) -> dict[str, str]:
    return {a: tier for a, _, tier, _ in res.placements()}


def same_weights(res: Residency, lease) -> bool:
    """The device pages hold exactly the host pages' weights, module by module."""
    held = res._held[lease.key]
    for lm in range(len(res.arena.layout.shapes)):
        if int(held.entry.meta[lm, 1]) == 0:
            continue
        a, b = res.arena.read_back(held.entry, lm)
        da, db = res.device.read_back(lease.entry, lm)
        if not (torch.equal(a, da) and torch.equal(b, db)):
            return False
    return True


def test_a_device_eviction_keeps_the_host_copy_and_its_next_use_is_a_copy(tiers):
    res = tiers(4, 2, policy="lru")
    for name in ("a0", "a1", "a2"):
        lease = res.preload(name, 0)
        assert lease.entry is res._held[lease.key].dev     # the kernel reads the device pages
    assert placed(res) == {"a0": "host", "a1": "device", "a2": "device"}
    assert (res.dev.evictions, res.host.evictions, res.host.loads, res.dev.loads) == (1, 0, 3, 3)
    reads = len(res.source.reads)
    lease = res.acquire("a0", 0).result(10)          # a host hit, copied back to the device
    assert lease.source_tier == "host" and len(res.source.reads) == reads and same_weights(res, lease)
    assert placed(res) == {"a0": "device", "a1": "host", "a2": "device"}
    assert res.dev.loads == 4 and res.host.loads == 3
    res.release(lease)
    assert res.device_stats()["adapters"] == 2 and res.device_stats()["bytes_used"] <= \
        res.device.capacity_bytes


def test_a_host_eviction_leaves_both_tiers_and_the_pages_are_reused_cleanly(tiers):
    res = tiers(2, 2, policy="lru")
    for name in ("a0", "a1", "a2"):
        res.preload(name, 0)
    assert placed(res) == {"a1": "device", "a2": "device"}    # a0 left the host: the device too
    assert res.host.evictions == 1 and res.dev.evictions == 1
    lease = res.acquire("a0", 0).result(10)                   # a fresh load into reused pages
    assert lease.source_tier == "disk" and same_weights(res, lease)
    want = read_adapter(res.source.root / "a0", res.cfg, 16)
    lm = res.arena.layout.lm(0, "q_proj")
    a, b = res.device.read_back(lease.entry, lm)
    torch.testing.assert_close(a, want.weights[(0, "q_proj")][0], rtol=0, atol=0)
    torch.testing.assert_close(b, want.weights[(0, "q_proj")][1], rtol=0, atol=0)
    res.release(lease)


def test_a_pinned_adapter_stays_on_the_device_and_a_placement_waits_for_room(tiers):
    res = tiers(4, 1, wait_s=5)
    a = res.acquire("a0", 0).result(10)
    fut = res.acquire("a1", 0)             # loaded into the host, waits for device room
    time.sleep(0.3)
    assert not fut.done() and placed(res) == {"a0": "device", "a1": "host"}
    res.release(a)
    b = fut.result(10)
    assert placed(res) == {"a0": "host", "a1": "device"} and same_weights(res, b)
    res.release(b)


def test_a_device_tier_full_of_pinned_adapters_gives_resource_exhausted(tiers):
    res = tiers(4, 1, wait_s=0.5)
    a = res.acquire("a0", 0).result(10)
    with pytest.raises(ResourceExhausted, match="--device-cache-bytes"):
        res.acquire("a1", 0).result(10)
    assert placed(res) == {"a0": "device", "a1": "host"}   # the host copy stays for a retry
    assert res._held[("a1", 1)].pins == 0                  # the failed placement gave its pin back
    res.release(a)
    res.release(res.acquire("a1", 0).result(10))


def test_max_device_adapters_caps_the_device_tier(tiers):
    res = tiers(4, 4, max_device_adapters=2, policy="lru")
    for name in ("a0", "a1", "a2"):
        res.preload(name, 0)
    assert placed(res) == {"a0": "host", "a1": "device", "a2": "device"}


def test_unload_frees_device_and_host_pages(tiers):
    res = tiers(4, 4)
    res.preload("a0", 0)
    lease = res.acquire("a1", 0).result(10)
    res.unload("a0")
    res.unload("a1")                                        # in use: goes at its release
    assert placed(res) == {} and res.device.used_bytes == lease.entry.nbytes
    res.release(lease)
    assert res.device.used_bytes == 0 and res.arena.used_bytes == 0
    assert res.device_stats()["adapters"] == 0


def test_a_superseded_version_goes_first_from_both_tiers_however_hot(tiers):
    res = tiers(3, 2)
    for name in ("a0", "a1", "a0", "a0", "a0", "a2"):      # a0 the hottest by far
        res.preload(name, 0)
    assert placed(res) == {"a0": "device", "a1": "host", "a2": "device"}
    res.set_latest("a0", 2)                                 # a new version exists: v1 is superseded
    res.preload("a1", 0)                                    # device room: a0 v1 goes, not a2
    assert placed(res) == {"a0": "host", "a1": "device", "a2": "device"}
    res.preload("a3", 0)                                    # host room: a0 v1 goes again
    assert set(placed(res)) == {"a1", "a2", "a3"}
