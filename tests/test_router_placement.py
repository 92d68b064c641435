"""Placement is a pure function of a snapshot and a request: table tests, no servers."""

import pytest

from services.router.placement import (
    PREFIX_CHUNK,
    PREFIX_CHUNKS,
    ExecutorView,
    PrefixIndex,
    prefix_chunks,
    rank,
    tie_key,
)

DEVICE, HOST, DISK = 1, 2, 3


def view(addr, healthy=True, running=0, waiting=0, batch=8, **adapters):
    return ExecutorView(addr, healthy, running, waiting, batch,
                        {k.replace("_", "/"): v for k, v in adapters.items()})


@pytest.mark.parametrize("snapshot, adapter, first", [
    # the adapter is resident on b: go there even though b is a little busier
    ([view("a"), view("b", running=4, org_x=DEVICE)], "org/x", "b"),
    # b holds it but is swamped (3 full batches queued): spill to idle a
    ([view("a"), view("b", running=8, waiting=16, org_x=DEVICE)], "org/x", "a"),
    # device beats host beats disk at equal load
    ([view("a", org_x=DISK), view("b", org_x=DEVICE), view("c", org_x=HOST)], "org/x", "b"),
    ([view("a", org_x=DISK), view("c", org_x=HOST)], "org/x", "c"),
    # base-only: least loaded
    ([view("a", running=5), view("b", running=1), view("c", running=3)], "", "b"),
    # unhealthy executors are never first while a healthy one exists
    ([view("a", healthy=False, org_x=DEVICE), view("b", running=7)], "org/x", "b"),
])
def test_rank_first_choice(snapshot, adapter, first):
    assert rank(snapshot, adapter)[0] == first


def test_rank_lists_every_executor_unhealthy_last():
    order = rank([view("a", healthy=False), view("b"), view("c")], "x")
    assert sorted(order[:2]) == ["b", "c"] and order[2] == "a"


def test_an_unplaced_adapter_sticks_to_one_executor():
    snapshot = [view(f"e{i}") for i in range(4)]
    firsts = {rank(snapshot, "org/x")[0] for _ in range(10)}
    assert len(firsts) == 1
    spread = {rank(snapshot, f"adapter-{i}")[0] for i in range(64)}
    assert len(spread) == 4   # different adapters land on different executors


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
    # the adapter on device elsewhere outweighs the prefix (the adapter would have to load)
    ([view("a", org_x=DEVICE), view("b")], "org/x", "b", "a"),
    # both hold the adapter: the prefix holder, though a little busier
    ([view("a", running=2, org_x=DEVICE), view("b", org_x=DEVICE)], "org/x", "a", "a"),
    # an unhealthy holder is never first
    ([view("a"), view("b", healthy=False)], "", "b", "a"),
])
def test_rank_prefers_the_prefix_holder(snapshot, adapter, holder, first):
    assert rank(snapshot, adapter, holder)[0] == first


def test_base_only_prompts_spread_by_their_first_chunk():
    snapshot = [view(f"e{i}") for i in range(4)]
    firsts = {rank(snapshot, "", None, tie_key("", prefix_chunks("", f"system prompt {i} " * 8)))[0]
              for i in range(64)}
    assert len(firsts) == 4                         # different system prompts, different executors
    same = {rank(snapshot, "", None, tie_key("", prefix_chunks("", "system prompt 7 " * 8 + q)))[0]
            for q in ("a?", "b?", "c?")}
    assert len(same) == 1                           # one system prompt, one executor
    assert tie_key("org/x", prefix_chunks("org/x", SYSTEM)) == "org/x"   # adapters stick by adapter
