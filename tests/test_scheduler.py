"""Scheduler: token budget, batch size, chunked prefill, preemption by recompute, slot order,
prefix caching."""

from __future__ import annotations

from services.executor.kv_cache import KVBlockAllocator
from services.executor.scheduler import Scheduler, Sequence


def seq(name, n, slot=-1):
    return Sequence(name, list(range(n)), n, slot=slot)


def step(s: Scheduler, sampled_token=7):
    """schedule + pretend forward: sampled sequences get one token."""
    b = s.schedule()
    samples = [i.samples for i in b.items]
    s.advance(b)
    for item, smp in zip(b.items, samples, strict=False):
        if smp:
            item.seq.token_ids.append(sampled_token)
    return b


def test_prefill_budget_chunks_and_decode_goes_first():
    s = Scheduler(KVBlockAllocator(100), 4, max_batch_size=8, max_prefill_tokens=10)
    a, b = seq("a", 6), seq("b", 9)
    s.add(a), s.add(b)
    b1 = step(s)
    assert [(i.seq.seq_id, i.num_new, i.samples) for i in b1.items] == [("a", 6, True), ("b", 4, False)]
    b2 = step(s)       # a decodes (1, outside the budget), b continues its prompt
    assert [(i.seq.seq_id, i.num_new, i.samples) for i in b2.items] == [("a", 1, True), ("b", 5, True)]
    b3 = step(s)
    assert [(i.seq.seq_id, i.num_new) for i in b3.items] == [("a", 1), ("b", 1)]


def test_max_batch_size():
    s = Scheduler(KVBlockAllocator(100), 4, max_batch_size=2, max_prefill_tokens=100)
    for i in range(4):
        s.add(seq(f"s{i}", 3))
    assert len(step(s).items) == 2 and len(s.waiting) == 2
    s.remove(s.running[0])
    assert [i.seq.seq_id for i in step(s).items] == ["s1", "s2"]


def test_sorted_by_adapter_slot():
    s = Scheduler(KVBlockAllocator(100), 4, max_batch_size=8, max_prefill_tokens=100)
    for name, slot in [("x", 3), ("y", -1), ("z", 0), ("w", 3)]:
        s.add(seq(name, 2, slot))
    assert [i.seq.seq_id for i in step(s).items] == ["y", "z", "x", "w"]


def test_preemption_by_recompute_and_blocks_accounting():
    alloc = KVBlockAllocator(4)                     # 16 tokens of KV
    s = Scheduler(alloc, 4, max_batch_size=8, max_prefill_tokens=100)
    old, new = seq("old", 7), seq("new", 7)
    s.add(old), s.add(new)
    step(s)                                          # 2 + 2 blocks
    assert alloc.num_free == 0
    assert not step(s).preempted                     # 8th token still fits in 2 blocks
    b = step(s)                                      # old needs a 3rd block: new is preempted
    assert [q.seq_id for q in b.preempted] == ["new"]
    assert [i.seq.seq_id for i in b.items] == ["old"]
    assert new.num_computed == 0 and not new.blocks and s.waiting[0] is new
    assert new.token_ids[-2:] == [7, 7] and len(new.token_ids) == 9   # keeps its generated tokens
    s.remove(old)
    b = step(s)
    assert [(i.seq.seq_id, i.num_new, i.samples) for i in b.items] == [("new", 9, True)]
    s.remove(new)
    assert alloc.num_free == 4


def test_waiting_does_not_jump_a_request_that_does_not_fit():
    alloc = KVBlockAllocator(3)
    s = Scheduler(alloc, 4, max_batch_size=8, max_prefill_tokens=100)
    s.add(seq("a", 8)), s.add(seq("big", 9)), s.add(seq("small", 1))
    b = step(s)
    assert [i.seq.seq_id for i in b.items] == ["a"]   # FIFO: small waits behind big


def cached(blocks=100, max_prefill_tokens=100):
    alloc = KVBlockAllocator(blocks)
    return alloc, Scheduler(alloc, 4, max_batch_size=8, max_prefill_tokens=max_prefill_tokens,
                            prefix_caching=True)


def test_a_later_sequence_takes_the_cached_blocks_of_its_prefix():
    alloc, s = cached()
    first = Sequence("a", list(range(10)), 10)             # blocks [0..3] [4..7] + 2 tokens
    s.add(first)
    step(s)
    assert alloc.num_cached == 2                             # its two full blocks, registered
    second = Sequence("b", list(range(8)) + [50, 51, 52], 11)
    same = Sequence("c", list(range(10)), 10)
    other_key = Sequence("d", list(range(10)), 10, cache_key="sql@1")
    for q in (second, same, other_key):
        s.add(q)
    b = step(s)
    got = {i.seq.seq_id: (i.num_new, i.seq.blocks[:2]) for i in b.items}
    assert got["b"] == (3, first.blocks[:2])                 # 8 tokens taken, 3 computed
    assert got["c"] == (2, first.blocks[:2])
    assert got["d"][0] == 10 and got["d"][1] != first.blocks[:2]   # another adapter: no sharing
    assert s.prefix_hit_tokens == 16
    assert s.prefill_tokens == 10 + 3 + 2 + 10              # the prompts' tokens, less those taken
    step(s)
    assert s.prefill_tokens == 25                            # decode steps add none
    for q in (first, second, same, other_key):
        s.remove(q)
    assert alloc.num_free == 100


def test_the_last_token_is_always_computed():
    _, s = cached()
    s.add(Sequence("a", list(range(8)), 8))
    step(s)                                                  # 2 full blocks registered
    again = Sequence("b", list(range(8)), 8)
    s.add(again)
    b = step(s)
    assert [(i.num_new, i.samples) for i in b.items if i.seq is again] == [(4, True)]   # 1 block taken
    assert again.num_computed == 8


def test_a_preempted_sequence_gets_back_what_is_left_of_its_blocks():
    alloc, s = cached(blocks=4)                              # 16 tokens of KV
    old, new = Sequence("old", list(range(7)), 7), Sequence("new", list(range(100, 107)), 7)
    s.add(old), s.add(new)
    step(s), step(s)                                         # 8 tokens each: 2 + 2 full blocks
    b = step(s)                                              # old needs a 3rd: new is preempted,
    assert [q.seq_id for q in b.preempted] == ["new"]        # and its last block is evicted for old
    s.remove(old)
    b = step(s)
    assert [(i.seq.seq_id, i.num_new) for i in b.items] == [("new", 5)]   # its first block is back
    assert s.prefix_hit_tokens == 4
    s.remove(new)
    assert alloc.num_free == 4


def test_a_prefix_hit_that_cannot_grow_is_given_back():
    alloc, s = cached(blocks=3)
    s.add(a := Sequence("a", list(range(9)), 9))             # 3 blocks, 2 registered
    step(s)
    s.add(b := Sequence("b", list(range(8)) + [1, 2, 3, 4], 12))      # 2 cached + 1 more: no room
    step(s)
    assert b in s.waiting and not b.blocks and b.num_computed == 0
    s.remove(a)
    step(s)
    assert b in s.running and b.num_computed >= 8
    s.remove(b)
    assert alloc.num_free == 3
