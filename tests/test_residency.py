"""The residency owner and its eviction policies, without servers: eviction-order tables, pins,
single flight, unload while in use, latest served at once, failures isolated, memory stable."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from conftest import TINY

from services.common.errors import AdapterNotFound, ResourceExhausted
from services.executor.adapters.arena import ArenaLayout, HostArena
from services.executor.adapters.policy import GDSFPolicy, LRUPolicy, make_policy, simulate
from services.executor.adapters.residency import Residency
from services.executor.adapters.source import LocalDirSource
from services.executor.model.loader import read_config
from services.synthetic import AdapterSpec, write_adapter

# -- policies: who goes first -------------------------------------------------------------------

LRU_CASES = [  # (touches in order, candidates, expected victim)
    (["a", "b", "c"], ["a", "b", "c"], "a"),
    (["a", "b", "c", "a"], ["a", "b", "c"], "b"),
    (["a", "b", "c", "a", "b"], ["a", "b", "c"], "c"),
    (["a", "b", "c"], ["b", "c"], "b"),                 # a pinned: the next least recent
    (["a"], [], None),
    (["a", "b"], ["a", "new", "b"], "new"),           # a candidate never touched goes first
]


@pytest.mark.parametrize("touches,candidates,victim", LRU_CASES)
def test_lru_evicts_the_least_recently_used(touches, candidates, victim):
    p = LRUPolicy()
    for k in touches:
        p.touch(k)
    assert p.victim(candidates) == victim


GDSF_CASES = [  # (touches as (key, size, cost), candidates, expected victim)
    ([("a", 1, 1), ("b", 1, 1), ("a", 1, 1)], ["a", "b"], "b"),           # b used less
    ([("a", 1, 1), ("a", 1, 1), ("b", 1, 1)], ["a", "b"], "b"),           # recency alone does not save b
    ([("big", 10, 1), ("small", 1, 1)], ["big", "small"], "big"),       # same use: the larger goes
    ([("cheap", 1, 1), ("dear", 1, 50)], ["cheap", "dear"], "cheap"),   # registry-fetched stays
    ([("a", 1, 1), ("b", 1, 1), ("c", 1, 1)], ["a", "b", "c"], "a"),    # ties: least recent
]


@pytest.mark.parametrize("touches,candidates,victim", GDSF_CASES)
def test_gdsf_evicts_lowest_frequency_times_cost_per_byte(touches, candidates, victim):
    p = GDSFPolicy()
    for key, size, cost in touches:
        p.touch(key, size, cost)
    assert p.victim(candidates) == victim


def test_gdsf_remembers_an_evicted_keys_frequency():
    """A hot key evicted once (say it was reloaded cheaply from disk, and a registry-fetched stranger
    outranked it) comes back with its frequency: the next victim is a one-off, not the hot key again.
    Plain GDSF forgets it and evicts it at once, which is how the hottest adapters thrashed."""
    p = GDSFPolicy()
    for _ in range(10):
        p.touch("hot", 1, 1)
    p.remove("hot")                       # evicted
    p.touch("stranger", 1, 5)             # one use, dearer to reload
    p.touch("hot", 1, 1)                  # back: frequency 11, not 1
    assert p.victim(["hot", "stranger"]) == "stranger"
    forgetful = GDSFPolicy(ghosts=0)
    for _ in range(10):
        forgetful.touch("hot", 1, 1)
    forgetful.remove("hot")
    forgetful.touch("stranger", 1, 5)
    forgetful.touch("hot", 1, 1)
    assert forgetful.victim(["hot", "stranger"]) == "hot"


def test_gdsf_unload_forgets_the_frequency():
    """An unload (forget) is not an eviction: a re-registered adapter starts afresh."""
    p = GDSFPolicy()
    for _ in range(10):
        p.touch("x", 1, 1)
    p.forget("x")
    p.touch("y", 1, 1)
    p.touch("y", 1, 1)
    p.touch("x", 1, 1)
    assert p.victim(["x", "y"]) == "x"


def test_gdsf_ages_an_old_favourite_out():
    """A key hot long ago loses to fresh keys once the clock has risen past it (ageing)."""
    p = GDSFPolicy()
    for _ in range(5):
        p.touch("old", 1, 1)
    for i in range(12):          # a stream of new keys, each evicted in turn: the clock rises
        p.touch(f"n{i}", 1, 1)
        p.touch(f"n{i}", 1, 1)
        p.remove(p.victim([f"n{i}", "old"]) if i < 3 else f"n{i - 1}")
    p.touch("fresh", 1, 1)
    p.touch("fresh", 1, 1)
    assert p.victim(["old", "fresh"]) == "old"


def test_gdsf_beats_lru_on_a_skewed_trace():
    import random
    rng = random.Random(0)
    keys = list(range(256))
    weights = [1 / (k + 1) for k in keys]
    trace = rng.choices(keys, weights, k=20_000)
    gdsf, lru = simulate(trace, 48, GDSFPolicy()), simulate(trace, 48, LRUPolicy())
    assert gdsf > lru



def test_gdsf_halves_frequencies_every_n_touches_ghosts_too():
    """Every halve_every-th touch halves every frequency (the 2nd and 3rd time too), and the ghost
    table's with them (a ghost below one use before a halving is dropped by it)."""
    p = GDSFPolicy(halve_every=4)
    for k in ("a", "a", "a"):
        p.touch(k)
    p.remove("a")                              # a ghost of frequency 3
    p.touch("b")                               # touch 4: halve (ghost a 1.5), then b = 1
    assert p._freq == {"b": 1.0} and dict(p._ghost) == {"a": 1.5}
    for k in ("b", "b", "b", "c"):             # touches 5-8: b = 4, then halve at 8 (b 2, ghost a
        p.touch(k)                             # 0.75), then c = 1
    assert p._freq == {"b": 2.0, "c": 1.0} and dict(p._ghost) == {"a": 0.75}
    for k in ("c", "c", "c", "b"):             # touches 9-12: c = 4, halve at 12: b 1 -> 2, c 2,
        p.touch(k)                             # ghost a (0.75) dropped
    assert p._freq == {"b": 2.0, "c": 2.0} and dict(p._ghost) == {}


def test_gdsf_ghost_table_holds_exactly_its_size():
    p = GDSFPolicy(ghosts=2)
    for k in ("a", "b", "c"):
        p.touch(k)
        p.remove(k)
    assert list(p._ghost) == ["b", "c"]
    p.remove("never-touched")                  # nothing to remember: no ghost, no error
    assert list(p._ghost) == ["b", "c"]
    p.touch("never-touched")
    assert p._freq["never-touched"] == 1.0


@pytest.mark.parametrize("trace, capacity, size, expect", [
    ([], 4, None, 0.0),                                    # nothing asked: no hits, not a division
    (list("abab"), 2, None, 0.5),                          # two misses, then two hits
    (list("abcabc"), 2, None, 0.0),                        # a cycle one longer than the room: LRU-ish
    (list("aab"), 2, {"a": 2}, 1 / 3),                     # a fills the room; b evicts it
    (list("bigbig"), 3, {"b": 4}, 2 / 6),                  # b never fits; i and g hit once each
    (list("aaaa"), 1, {"a": 1}, 0.75),
    (list("aba"), 1, None, 0.0),                           # b evicts a: room for one means one
])
def test_simulate_counts_hits_exactly(trace, capacity, size, expect):
    assert simulate(trace, capacity, LRUPolicy(), size=size) == pytest.approx(expect)


def test_make_policy_names_the_choices():
    assert isinstance(make_policy("gdsf"), GDSFPolicy) and isinstance(make_policy("lru"), LRUPolicy)
    with pytest.raises(ValueError, match=r"one of \['gdsf', 'lru'\], got 'lfu'"):
        make_policy("lfu")


# -- the residency owner ------------------------------------------------------------------------

class CountingSource(LocalDirSource):
    def __init__(self, root, delay=0.0, gate: threading.Event | None = None):
        super().__init__(root)
        self.delay, self.gate, self.reads = delay, gate, []

    def read(self, adapter_id, version, reader):
        self.reads.append(adapter_id)
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        return super().read(adapter_id, version, reader)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("res-adapters")
    for i in range(6):
        write_adapter(r / f"a{i}", TINY["llama"], AdapterSpec(rank=4, seed=500 + i))
    write_adapter(r / "big", TINY["llama"], AdapterSpec(rank=16, seed=600))
    return r


@pytest.fixture
def make(llama_dir, root):
    _, cfg = read_config(llama_dir)
    made = []

    def build(n_adapters: float = 3, source=None, **kw) -> Residency:
        layout = ArenaLayout.for_model(cfg)
        probe = HostArena(layout, 64 << 20, torch.float32)
        from services.executor.adapters.reader import read_adapter
        per = probe.pages_needed(read_adapter(root / "a0", cfg, 16)) * probe.page_bytes
        arena = HostArena(layout, int(n_adapters * per), torch.float32)
        res = Residency(arena, source or CountingSource(root), cfg, 16, **kw)
        made.append(res)
        return res

    yield build
    for r in made:
        r.close()


def test_a_pinned_adapter_is_never_evicted_and_a_load_waits_for_room(make):
    res = make(2, wait_s=5)
    a, b = res.acquire("a0", 0).result(10), res.acquire("a1", 0).result(10)
    fut = res.acquire("a2", 0)                 # no room: both in use
    time.sleep(0.3)
    assert not fut.done()
    res.release(a)                             # a0 is now the only candidate
    c = fut.result(10)
    held = {a for a, _, _ in res.residency()}
    assert held == {"a1", "a2"} and res.host.evictions == 1
    res.release(b)
    res.release(c)


def test_a_full_arena_of_pinned_adapters_gives_resource_exhausted(make):
    res = make(1, wait_s=0.5)
    a = res.acquire("a0", 0).result(10)
    with pytest.raises(ResourceExhausted, match="--host-cache-bytes"):
        res.acquire("a1", 0).result(10)
    res.release(a)


def test_an_adapter_larger_than_the_arena_is_refused_at_once(make):
    res = make(1)
    with pytest.raises(ResourceExhausted, match="more than the whole host arena"):
        res.acquire("big", 0).result(10)


def test_eviction_takes_the_least_recently_used_not_the_most(make):
    res = make(3, policy="lru")
    for name in ("a0", "a1", "a2"):
        res.preload(name, 0)
    res.release(res.acquire("a0", 0).result(10))        # a0 used again: a1 is now the oldest
    res.preload("a3", 0)
    assert {a for a, _, _ in res.residency()} == {"a0", "a2", "a3"}


def test_single_flight_one_read_for_concurrent_acquires(make, root):
    gate = threading.Event()
    src = CountingSource(root, gate=gate)
    res = make(3, source=src)
    futs = [res.acquire("a0", 0) for _ in range(16)]
    gate.set()
    leases = [f.result(10) for f in futs]
    assert src.reads == ["a0"] and len({id(le.entry) for le in leases}) == 1
    assert res.residency() == [("a0", 1, 16)]
    for le in leases:
        res.release(le)
    assert res.residency() == [("a0", 1, 0)]


def test_unload_while_in_use_frees_pages_at_the_last_release(make):
    res = make(3)
    free0 = res.arena.free_pages
    lease = res.acquire("a0", 0).result(10)
    res.unload("a0")
    assert res.residency() == []                         # no new request finds it
    assert res.arena.free_pages < free0                  # but its pages are still read
    res.release(lease)
    assert res.arena.free_pages == free0


def test_a_failed_load_fails_only_its_own_requests(make):
    res = make(3)
    bad = res.acquire("missing", 0)
    good = res.acquire("a0", 0)
    with pytest.raises(AdapterNotFound):
        bad.result(10)
    res.release(good.result(10))


def test_latest_is_served_at_once_and_refreshed_in_the_background(make, root):
    src = CountingSource(root)
    res = make(3, source=src, latest_ttl_s=0.0)
    res.preload("a0", 0)
    slow = threading.Event()
    src.latest = lambda adapter_id: (slow.wait(120), 1)[1]     # a registry that hangs until told
    try:                                                       # stale, yet served while it hangs
        lease = res.acquire("a0", 0).result(60)
        assert not slow.is_set() and lease.version == 1
        res.release(lease)
    finally:
        slow.set()


def test_ten_thousand_load_unload_cycles_keep_memory_stable(make):
    res = make(3)

    def cycles(n):
        for _ in range(n):
            res.release(res.acquire("a0", 0).result(10))
            res.unload("a0")

    cycles(500)
    gc.collect()
    rss0 = _rss()
    cycles(10_000)
    gc.collect()
    assert _rss() <= rss0 * 1.05, (rss0, _rss())
    assert res.arena.free_pages == res.arena.num_pages and res.host.loads == 10_500


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_recently_confirmed_latest_reloads_without_asking_the_source(make, root):
    """Evicted, then wanted again within the TTL: the load asks for the version it knows."""
    src = CountingSource(root)
    asked = []
    orig = src.read
    src.read = lambda adapter_id, version, reader: (asked.append(version), orig(adapter_id, version, reader))[1]
    res = make(1, source=src, latest_ttl_s=60)
    res.preload("a0", 0)
    res.preload("a1", 0)          # evicts a0
    res.preload("a0", 0)
    assert asked == [0, 0, 1]


def test_gdsf_clock_never_passes_a_key_still_held():
    """A victim forced out while cheaper keys were pinned must not lift the clock above them: if it
    did, every new key would outrank the held hot key, and it would be the next victim."""
    p = GDSFPolicy()
    p.touch("cold", 1, 1)                        # priority 1, pinned when "busy" is evicted
    for _ in range(5):
        p.touch("hot", 1, 1)                     # priority 5, pinned too
    for _ in range(20):
        p.touch("busy", 1, 1)                    # priority 20, the only unpinned one
    p.remove(p.victim(["busy"]))
    assert p.clock_l == 1                        # not 20
    p.touch("oneoff", 1, 1)                      # clock + 1 = 2
    assert p.victim(["hot", "oneoff"]) == "oneoff"


def test_the_reload_cost_is_where_a_copy_is_now_not_what_the_last_load_took(make, root):
    """GDSF's cost for an arena entry: the disk tier's rate if a disk copy exists now, else the
    registry's, times its size; a hot adapter last reloaded from disk in 2 ms is not cheap to evict
    once its disk copy is gone."""
    on_disk: set = set()

    class TieredSource(CountingSource):
        def holds(self, adapter_id, version):
            return (adapter_id, version) in on_disk

    res = make(3, source=TieredSource(root))
    assert res._cost(("a0", 1), 1000) == 1e-3              # nothing observed yet: the fallback
    res._observe("disk", 0.002, 1000)
    res._observe("registry", 0.040, 1000)
    res._observe("host", 5.0, 1000)                         # not a source tier: ignored
    on_disk.add(("a0", 1))
    assert res._cost(("a0", 1), 1000) == pytest.approx(0.002)
    on_disk.clear()
    assert res._cost(("a0", 1), 1000) == pytest.approx(0.040)
    assert res._cost(("a0", 1), 2000) == pytest.approx(0.080)


def test_deleting_one_version_keeps_a_load_of_another_in_flight(make, root):
    gate = threading.Event()
    res = make(3, source=CountingSource(root, gate=gate))
    fut = res.acquire("a0", 0)                  # loading (resolves to v1) while v7 is deleted
    res.unload("a0", 7)
    gate.set()
    lease = fut.result(10)
    res.release(lease)
    assert res.residency() == [("a0", 1, 0)]    # kept: the deletion was of another version
    gate.clear()
    fut = res.acquire("a1", 0)
    res.unload("a1", 1)                         # the version being loaded: served, then gone
    gate.set()
    res.release(fut.result(10))
    assert [a for a, _, _ in res.residency()] == ["a0"]
