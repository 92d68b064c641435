"""Placement is a pure function of a snapshot and a request: table tests, no servers."""

import collections
import math
from dataclasses import replace

import pytest

from services.router.placement import (
    BOUND,
    MIN_CAP,
    PREFIX_CHUNK,
    PREFIX_CHUNKS,
    ExecutorView,
    PrefixIndex,
    bound,
    home_order,
    prefix_chunks,
    rank,
    room,
    tie_key,
    width,
)

DEVICE, HOST, DISK = 1, 2, 3


def view(addr, healthy=True, running=0, waiting=0, batch=8, **adapters):
    return ExecutorView(addr, healthy, running, waiting, batch,
                        {k.replace("_", "/"): v for k, v in adapters.items()})


def home(snapshot, adapter):
    return home_order(snapshot, adapter)[0].address


def test_adapters_partition_over_executors_by_home():
    """Idle fleet: every adapter goes to its own home, and the homes split the adapters evenly."""
    snapshot = [view(f"e{i}") for i in range(4)]
    firsts = {f"a{i}": rank(snapshot, f"a{i}")[0] for i in range(400)}
    assert all(firsts[a] == home(snapshot, a) for a in firsts)
    counts = collections.Counter(firsts.values())
    assert len(counts) == 4 and min(counts.values()) > 60          # ~100 each
    assert {rank(snapshot, "org/x")[0] for _ in range(10)} == {home(snapshot, "org/x")}


def test_leaving_executor_moves_only_its_own_adapters():
    four = [view(f"e{i}") for i in range(4)]
    three = four[:3]
    for i in range(200):
        before, after = rank(four, f"a{i}")[0], rank(three, f"a{i}")[0]
        assert after == before or before == "e3"


def test_residency_elsewhere_does_not_pull_an_adapter_from_its_home():
    """The partition wins over a stray copy: the home is not full, so it serves."""
    snapshot = [view("a"), view("b")]
    aid = next(f"x{i}" for i in range(100) if home(snapshot, f"x{i}") == "a")
    snapshot = [view("a", running=1), view("b", **{aid: DEVICE})]
    assert rank(snapshot, aid)[0] == "a"


@pytest.mark.parametrize("loads, expect_home", [
    ((0, 0), True),
    ((1, 0), True),       # near idle, one (perhaps already finished) request at home: still home
    ((4, 3), True),       # a little busier: still home (bound = ceil(1.25 * 8 / 2) = 5)
    ((6, 1), False),      # home at the bound: walk on to the next
    ((20, 30), True),     # both busy, home the less: home
])
def test_bounded_load_walks_past_a_full_home(loads, expect_home):
    names = ("a", "b")
    aid = next(f"x{i}" for i in range(100) if home([view(n) for n in names], f"x{i}") == "a")
    # batch 1: no batch room, the fleet's bound alone decides (see the batch-room test below)
    snapshot = [view("a", running=loads[0], batch=1), view("b", running=loads[1], batch=1)]
    assert (rank(snapshot, aid)[0] == "a") == expect_home
    assert bound(snapshot) == max(MIN_CAP, math.ceil(BOUND * (sum(loads) + 1) / 2))


def test_inflight_counts_as_load_before_the_status_says_so():
    v = view("a", running=1)
    assert replace(v, inflight=5).requests == 5 and replace(v, inflight=0).requests == 1


def test_hot_adapter_spreads_and_comes_home_when_it_cools():
    names = [f"e{i}" for i in range(4)]
    idle = [view(n) for n in names]
    aid = "org/hot"
    order = [v.address for v in home_order(idle, aid)]
    # busy fleet, 24 in flight: bound = ceil(1.25 * 25 / 4) = 8; the hot adapter has 12 in flight
    snapshot = [view(order[0], running=7, **{"org/hot": HOST}),
                view(order[1], running=5, **{"org/hot": HOST}),
                view(order[2], running=6), view(order[3], running=6)]
    assert width(12, bound(snapshot)) == 2
    # width 2: the less loaded of its first two executors; never one outside them
    picks = rank(snapshot, aid, adapter_load=12)
    assert picks[0] == order[1] and set(picks[:2]) == set(order[:2])
    # cooled down (nothing in flight for it): home again, though home is the busier of the two
    assert rank(snapshot, aid, adapter_load=0)[0] == order[0]
    # hotter: width 3, still preferring where it is held when loads are close
    assert width(20, bound(snapshot)) == 3
    assert rank(snapshot, aid, adapter_load=20)[0] in order[:3]


def test_width_grows_with_the_adapters_own_load():
    assert [width(n, 8) for n in (0, 6, 7, 8, 15, 16)] == [1, 1, 1, 2, 2, 3]
    assert [width(n, 5) for n in (3, 4, 5, 9, 10)] == [1, 1, 2, 2, 3]     # this request counts
    assert width(3, 0) == 4                                               # a zero bound is one


@pytest.mark.parametrize("snapshot, adapter, first", [
    # base-only: least loaded
    ([view("a", running=5), view("b", running=1), view("c", running=3)], "", "b"),
    # unhealthy executors are never first while a healthy one exists
    ([view("a", healthy=False, org_x=DEVICE), view("b", running=7)], "org/x", "b"),
    # a single executor takes everything, however busy
    ([view("a", running=100)], "org/x", "a"),
])
def test_rank_first_choice(snapshot, adapter, first):
    assert rank(snapshot, adapter)[0] == first


def test_rank_lists_every_executor_unhealthy_last():
    order = rank([view("a", healthy=False), view("b"), view("c")], "x")
    assert sorted(order[:2]) == ["b", "c"] and order[2] == "a"
    order = rank([view("a", healthy=False), view("b"), view("c")], "")
    assert sorted(order[:2]) == ["b", "c"] and order[2] == "a"


def test_empty_snapshot():
    assert rank([], "x") == []


# -- prefix affinity ----------------------------------------------------------------------------------

SYSTEM = "You are a helpful assistant for the accounts team. Answer briefly and cite the policy. " * 3


def test_prefix_chunks_share_exactly_the_shared_prefix():
    a = prefix_chunks("", SYSTEM + "What is the refund window?")
    b = prefix_chunks("", SYSTEM + "Who approves travel?")
    assert len(a) == len(SYSTEM.encode()) // PREFIX_CHUNK + (len(a) > len(SYSTEM.encode()) // PREFIX_CHUNK)
    shared = len(SYSTEM.encode()) // PREFIX_CHUNK
    assert a[:shared] == b[:shared] and shared >= 3
    assert prefix_chunks("org/x", SYSTEM) != prefix_chunks("", SYSTEM)[:len(prefix_chunks("org/x", SYSTEM))]
    assert prefix_chunks("", "short prompt") == []               # no full chunk: nothing to key
    ids = list(range(40))                                        # 16 ids a chunk when there is no text
    assert len(prefix_chunks("", "", ids)) == 2
    assert prefix_chunks("", "", ids)[0] == prefix_chunks("", "", ids[:16] + [9] * 30)[0]
    assert len(prefix_chunks("", "x" * 100_000)) == PREFIX_CHUNKS


def test_prefix_index_finds_the_longest_match_and_forgets():
    idx = PrefixIndex(capacity=1_000)
    long_, short = prefix_chunks("", SYSTEM + "a" * 200), prefix_chunks("", SYSTEM[:130])
    idx.record(short, "b")
    idx.record(long_, "a")               # a now holds every chunk of the longer prompt, short's too
    assert idx.lookup(long_) == ("a", len(long_))
    assert idx.lookup(prefix_chunks("", SYSTEM + "b" * 200)) == ("a", len(SYSTEM.encode()) // PREFIX_CHUNK)
    assert idx.lookup(prefix_chunks("", "z" * 300)) == (None, 0)
    idx.forget("a")
    assert idx.lookup(long_) == (None, 0) and len(idx) == 0


def test_prefix_index_evicts_least_recently_used():
    idx = PrefixIndex(capacity=4)
    first, second = prefix_chunks("", "p" * 128), prefix_chunks("", "q" * 128)   # 2 chunks each
    idx.record(first, "a")
    idx.record(second, "b")
    idx.lookup(first)                    # first's last chunk is now the most recent, its first the least
    idx.record(prefix_chunks("", "r" * 64), "c")
    assert len(idx) == 4 and idx.lookup(first[:1]) == (None, 0)
    assert idx.lookup(first) == ("a", 2) and idx.lookup(second) == ("b", 2)


@pytest.mark.parametrize("snapshot, adapter, holder, first", [
    # equal load: the executor holding the prompt's prefix
    ([view("a"), view("b")], "", "b", "b"),
    ([view("a"), view("b")], "", "a", "a"),
    # the holder is busier by more than the bonus: spread
    ([view("a"), view("b", running=8)], "", "b", "a"),
    # an unhealthy holder is never first
    ([view("a"), view("b", healthy=False)], "", "b", "a"),
])
def test_rank_prefers_the_prefix_holder(snapshot, adapter, holder, first):
    assert rank(snapshot, adapter, holder)[0] == first


def test_a_spread_adapter_prefers_its_prefix_holder():
    """Width 2 (hot): between its two executors, the one holding the prompt's prefix, though busier."""
    snapshot = [view("a", running=1, org_x=DEVICE), view("b", org_x=DEVICE)]
    assert rank(snapshot, "org/x", "a", adapter_load=12)[0] == "a"
    assert rank(snapshot, "org/x", "b", adapter_load=12)[0] == "b"


def test_base_only_prompts_spread_by_their_first_chunk():
    snapshot = [view(f"e{i}") for i in range(4)]
    firsts = {rank(snapshot, "", None, tie_key("", prefix_chunks("", f"system prompt {i} " * 8)))[0]
              for i in range(64)}
    assert len(firsts) == 4                         # different system prompts, different executors
    same = {rank(snapshot, "", None, tie_key("", prefix_chunks("", "system prompt 7 " * 8 + q)))[0]
            for q in ("a?", "b?", "c?")}
    assert len(same) == 1                           # one system prompt, one executor
    assert tie_key("org/x", prefix_chunks("org/x", SYSTEM)) == "org/x"   # adapters stick by adapter


@pytest.mark.parametrize("home_load, other_load, max_batch, expect_home", [
    (6, 1, 1, False),     # no batch room: the fleet's bound (5) decides, as before
    (6, 1, 16, True),     # below its batch (16): the home takes it; the partition holds
    (15, 0, 16, True),
    (16, 0, 16, False),   # its batch is full and it is above the bound: walk on
    (40, 30, 16, True),   # busy fleet: the bound (ceil(1.25 * 71 / 2) = 45) decides
    (52, 30, 16, False),  # at the bound (ceil(1.25 * 83 / 2) = 52)
])
def test_an_executor_with_batch_room_keeps_its_adapters(home_load, other_load, max_batch, expect_home):
    names = ("a", "b")
    aid = next(f"x{i}" for i in range(100) if home([view(n) for n in names], f"x{i}") == "a")
    snapshot = [replace(view("a", running=home_load), max_batch_size=max_batch),
                replace(view("b", running=other_load), max_batch_size=max_batch)]
    assert (rank(snapshot, aid)[0] == "a") == expect_home
    assert room(snapshot[0], bound(snapshot)) == max(bound(snapshot), max_batch)


@pytest.mark.parametrize("tier_first, tier_second", [
    (DEVICE, HOST), (DEVICE, DISK), (DEVICE, None), (HOST, DISK), (HOST, None), (DISK, None),
])
def test_a_spread_adapter_prefers_the_better_tier_at_equal_load(tier_first, tier_second):
    """Width 2, equal loads: the executor holding the adapter in the faster tier is chosen first
    (device > host > disk > not held), whichever of the two is its home."""
    aid = "org/hot"
    for swap in (False, True):
        tiers = (tier_second, tier_first) if swap else (tier_first, tier_second)
        snapshot = [view(n, running=6, **({"org/hot": t} if t else {})) for n, t in zip("ab", tiers, strict=True)]
        assert width(9, room(snapshot[0], bound(snapshot))) == 2
        assert rank(snapshot, aid, adapter_load=9)[0] == ("b" if swap else "a")


def test_prefix_index_lookup_of_no_chunks_finds_nothing():
    """A prompt shorter than one chunk has no chunks: nothing matched, whatever the index holds."""
    index = PrefixIndex()
    assert index.lookup([]) == (None, 0)
    index.record(prefix_chunks("", "x" * PREFIX_CHUNK), "e0")
    assert index.lookup([]) == (None, 0)


@pytest.mark.parametrize("differs_at", range(6))
def test_prefix_chunks_diverge_exactly_at_the_first_differing_chunk(differs_at):
    """Two prompts that differ only inside chunk k share exactly their first k hashes, for every k."""
    base = bytearray(b"".join(bytes([65 + i]) * PREFIX_CHUNK for i in range(6)))
    other = bytearray(base)
    other[differs_at * PREFIX_CHUNK + PREFIX_CHUNK // 2] ^= 1
    a, b = prefix_chunks("", base.decode()), prefix_chunks("", other.decode())
    assert len(a) == len(b) == 6
    assert [x == y for x, y in zip(a, b, strict=True)] == [i < differs_at for i in range(6)]


@pytest.mark.parametrize("loads, expect", [
    ((), 1),                       # no healthy executor: nothing to bound
    ((0, 0), MIN_CAP),             # near idle: never below MIN_CAP
    ((3, 3, 3, 3), 5),             # ceil(1.25 x (12 + this one) / 4) = 5, not 4: this request counts
    ((10, 10), 14),                # ceil(1.25 x 21 / 2)
    ((9, 10), 13),                 # ceil(1.25 x 20 / 2): an odd fleet total, plus this one
])
def test_bound_counts_this_request(loads, expect):
    assert bound([view(f"e{i}", running=n) for i, n in enumerate(loads)]) == expect


def test_requests_are_running_plus_waiting_and_a_bare_view_is_idle():
    assert view("a", running=3, waiting=2).requests == 5
    assert view("a", running=3, waiting=2).load == 5 / 8
    bare = ExecutorView("a", True)
    assert bare.requests == 0 and bare.load == 0 and bare.adapters == {}
    assert ExecutorView("a", True, waiting=2).requests == 2      # nothing running, two queued
    assert ExecutorView("a", True, running=2).requests == 2      # two running, none queued
    assert ExecutorView("a", True, running=2).load == 2.0        # a batch of one unless told


def test_width_is_measured_by_the_homes_batch():
    """An adapter's width comes from its home's room: a home with a 16-request batch serves 12 of its
    requests alone, though the next executor's batch is 4."""
    aid = "org/x"
    order = [v.address for v in home_order([view("a"), view("b")], aid)]
    snapshot = [replace(view(order[0], running=5), max_batch_size=16),
                replace(view(order[1], running=0), max_batch_size=4)]
    assert rank(snapshot, aid, adapter_load=11)[0] == order[0]      # width 1: home, though busier


def test_an_executor_without_the_adapter_gets_no_penalty_only_no_bonus():
    """Width 2: half a batch less load beats a disk copy (0.3 of a batch), and the executor holding
    nothing is scored by its load alone."""
    snapshot = [view("a", running=6), view("b", running=10, org_x=DISK)]
    assert width(11, room(snapshot[0], bound(snapshot))) == 2
    assert rank(snapshot, "org/x", adapter_load=11)[0] == "a"


def test_the_prefix_holder_is_matched_by_address_not_by_identity():
    """Addresses arrive as different string objects (status, config, DNS): equal is enough."""
    holder = "".join(["127.0.0.1:", "50052"])
    # the holder is a little busier: only the prefix bonus puts it first
    snapshot = [view("127.0.0.1:50051"), view("127.0.0.1:50052", running=1), view("127.0.0.1:50053")]
    assert rank(snapshot, "", holder)[0] == "127.0.0.1:50052"
    idx = PrefixIndex()
    chunks = prefix_chunks("", SYSTEM)
    idx.record(chunks, holder)
    for other in ("127.0.0.1:50051", "127.0.0.1:50053"):
        idx.record(prefix_chunks("", other * 10), other)
    idx.forget("".join(["127.0.0.1:", "50052"]))          # an equal string, another object
    assert idx.lookup(chunks) == (None, 0)
    for other in ("127.0.0.1:50051", "127.0.0.1:50053"):  # the others' prefixes are kept
        assert idx.lookup(prefix_chunks("", other * 10)) == (other, 2)


def test_a_prompt_sharing_only_its_first_chunk_matches_one_chunk():
    idx = PrefixIndex()
    idx.record(prefix_chunks("", "p" * 64 + "q" * 64), "a")
    assert idx.lookup(prefix_chunks("", "p" * 64 + "r" * 64)) == ("a", 1)


def test_the_tie_hash_never_outweighs_a_tier():
    """The hash term only breaks ties (< 0.01 of a batch): over many adapter ids, a device copy at
    equal load always wins over a host copy, and equal views always tie-break the same way."""
    for i in range(200):
        aid = f"org/a{i}"
        snapshot = [view("a", running=6, **{aid: HOST}), view("b", running=6, **{aid: DEVICE})]
        assert rank(snapshot, aid, adapter_load=9)[0] == "b"


def test_base_only_requests_are_tied_on_the_first_chunk_only():
    """One system prompt, long different questions: one executor (the key is the first chunk, not a
    later one the questions change)."""
    system = "You answer for the accounts team. " * 2                  # one full chunk, then more
    prompts = [system[:PREFIX_CHUNK] + f" question {i}: " + "why " * (20 + i) for i in range(12)]
    keys = {tie_key("", prefix_chunks("", p)) for p in prompts}
    assert keys == {prefix_chunks("", prompts[0])[0].hex()}
    snapshot = [view(f"e{i}") for i in range(4)]
    assert len({rank(snapshot, "", None, k)[0] for k in keys}) == 1
