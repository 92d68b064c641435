"""AdapterCache edge cases: timeouts, unload while in use, twin loads (no servers)."""

from __future__ import annotations

import time

import pytest
import torch

from services.common.errors import Unavailable
from services.executor.adapters.cache import AdapterCache, LocalDirSource
from services.executor.adapters.pool import AdapterPool
from services.executor.model.loader import read_config


class SlowSource(LocalDirSource):
    def __init__(self, root, delay: float):
        super().__init__(root)
        self.delay = delay

    def resolve(self, adapter_id, version):
        time.sleep(self.delay)
        return super().resolve(adapter_id, version)


@pytest.fixture
def cache_factory(llama_dir, make_adapter, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    for name in ("a", "b"):
        make_adapter(rank=4).rename(root / name)
    _, cfg = read_config(llama_dir)
    made = []

    def make(delay: float = 0.0, slots: int = 2, **kw) -> AdapterCache:
        pool = AdapterPool(cfg, slots, 8, torch.float32, torch.device("cpu"))
        cache = AdapterCache(pool, SlowSource(root, delay), cfg, 8, **kw)
        made.append(cache)
        return cache

    yield make
    for c in made:
        c.close()


def _slots(cache):
    return [(s.key, s.pins) if s else None for s in cache._slots]


def test_preload_timeout_is_unavailable_and_leaks_no_pin(cache_factory):
    cache = cache_factory(delay=0.5)
    with pytest.raises(Unavailable, match="did not load within"):
        cache.preload("a", 0, timeout=0.1)
    deadline = time.monotonic() + 5
    while not cache.residency() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.residency() == [("a", 1, 0)]      # loaded, and not left pinned


def test_unload_while_in_use_then_reload_leaves_nothing_behind(cache_factory):
    cache = cache_factory()
    lease = cache.acquire("a", 0).result(10)          # a request holds "a"
    cache.unload("a")
    assert cache.residency() == []                   # hidden at once, freed when released
    second = cache.acquire("a", 0).result(10)         # a new request loads it again
    cache.release(lease.slot)
    cache.release(second.slot)
    cache.unload("a")
    assert cache.residency() == [] and all(s is None for s in cache._slots)


def test_twin_loads_share_one_slot(cache_factory):
    cache = cache_factory(delay=0.2)
    futs = [cache.acquire("a", 0), cache.acquire("a", 1)]
    leases = [f.result(10) for f in futs]
    assert leases[0].slot == leases[1].slot
    for lease in leases:
        cache.release(lease.slot)


def test_waiting_for_a_slot_is_bounded(cache_factory):
    from services.common.errors import ResourceExhausted
    cache = cache_factory(slots=1, slot_wait_s=0.3)
    held = cache.acquire("a", 0).result(10)
    with pytest.raises(ResourceExhausted, match="slots"):
        cache.acquire("b", 0).result(10)
    cache.release(held.slot)
    lease = cache.acquire("b", 0).result(10)           # free now: it loads
    cache.release(lease.slot)


# -- mutants the suite used to let through ------------------------------------------------------------

def test_a_slot_rewritten_by_an_adapter_with_fewer_targets_keeps_nothing_of_the_old_one(llama_dir,
                                                                                     make_adapter):
    """AdapterPool.write clears the slot first: an adapter on q,k,v,o evicted for one on q only must
    leave k, v and o at rank 0 (a no-op clear left the old adapter's k/v/o deltas active: silently
    wrong output for the new adapter)."""
    from services.executor.adapters.reader import read_adapter
    _, cfg = read_config(llama_dir)
    pool = AdapterPool(cfg, 2, 8, torch.float32, torch.device("cpu"))
    wide = read_adapter(make_adapter(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj")), cfg, 8)
    narrow = read_adapter(make_adapter(rank=2, targets=("q_proj",)), cfg, 8)
    pool.write(1, wide)
    pool.write(1, narrow)
    for layer in range(cfg.layers):
        assert int(pool.stacks[layer]["q_proj"].ranks[1]) == 2
        for module in ("k_proj", "v_proj", "o_proj"):
            s = pool.stacks[layer][module]
            assert int(s.ranks[1]) == 0 and float(s.scalings[1]) == 0.0, (layer, module)
    pool.clear(1)
    assert all(int(pool.stacks[layer][m].ranks[1]) == 0 for layer in range(cfg.layers)
               for m in pool.stacks[layer])


@pytest.mark.parametrize("touch_again, evicted", [("a", "b"), ("b", "a")])
def test_a_full_cache_evicts_the_least_recently_used_idle_slot(cache_factory, tmp_path, make_adapter,
                                                               touch_again, evicted):
    """Two slots hold a and b; one of them is used again; loading a third evicts the other (the least
    recently used), never the one just used."""
    cache = cache_factory(slots=2)
    root = cache.source.root
    make_adapter(rank=4).rename(root / "c")
    for name in ("a", "b", touch_again):
        cache.release(cache.acquire(name, 0).result(10))
        time.sleep(0.002)       # distinct last-use stamps on a coarse clock
    cache.release(cache.acquire("c", 0).result(10))
    held = {key for key, _, _ in cache.residency()}
    assert held == {touch_again, "c"} and evicted not in held
