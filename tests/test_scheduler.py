"""Scheduler: token budget, batch size, chunked prefill, preemption by recompute, slot order."""

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
    for item, smp in zip(b.items, samples):
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
