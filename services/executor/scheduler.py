"""Continuous batching: which sequences run this step, and how many tokens each.

    sched.add(seq); batch = sched.schedule(); ...forward...; sched.advance(batch, sampled)

Every step: running sequences first, oldest first (decode = 1 token; an unfinished prompt continues
in chunks), then waiting ones are admitted while the batch, max_prefill_tokens and KV blocks allow.
Decode tokens never wait on the prefill budget, and prefill always gets its budget, so neither
starves. When KV blocks run out the newest running sequence is preempted by recompute: its blocks
are freed and it goes back to the front of the queue with its tokens so far, to be prefilled again.
The step's sequences are sorted by adapter slot so each adapter's tokens form one segment.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from services.executor.kv_cache import KVBlockAllocator, blocks_needed

_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    seq_id: str
    token_ids: list[int]          # prompt, then generated tokens
    prompt_len: int
    slot: int = -1                # adapter slot, -1 = base model
    num_computed: int = 0         # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    arrival: int = field(default_factory=lambda: next(_arrival))
    preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Scheduled:
    seq: Sequence
    num_new: int                  # computes token_ids[num_computed : num_computed + num_new]
    samples: bool = field(init=False)   # the step reaches the end of the sequence's tokens

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed + self.num_new == self.seq.num_tokens


@dataclass
class Batch:
    items: list[Scheduled]        # sorted by (slot, arrival)
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.items)


class Scheduler:
    def __init__(self, allocator: KVBlockAllocator, block_size: int, max_batch_size: int,
                 max_prefill_tokens: int):
        self.allocator, self.block_size = allocator, block_size
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # in arrival order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Finish or abort: frees its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks = []

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        extra = blocks_needed(seq.num_computed + num_new, self.block_size) - len(seq.blocks)
        if extra <= 0:
            return True
        if not self.allocator.can_allocate(extra):
            return False
        seq.blocks.extend(self.allocator.allocate(extra))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> Batch:
        budget = self.max_prefill_tokens
        items: list[Scheduled] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:          # preempted for an older sequence below
                continue
            n = seq.num_tokens - seq.num_computed
            if n > 1:                             # an unfinished (chunked or recomputed) prompt
                n = min(n, budget)
                if n == 0:
                    continue
            while not self._grow(seq, n):
                victim = self.running[-1]
                preempted.append(victim)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                items.append(Scheduled(seq, n))
                if n > 1:
                    budget -= n
        while (self.waiting and not preempted and budget > 0
               and len(self.running) < self.max_batch_size):
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.running.sort(key=lambda q: q.arrival)   # a re-admitted preempted one keeps its age
            items.append(Scheduled(seq, n))
            budget -= n
        items.sort(key=lambda s: (s.seq.slot, s.seq.arrival))
        return Batch(items, preempted)

    def advance(self, batch: Batch) -> None:
        """After the forward pass: the scheduled tokens' K/V are now in the cache."""
        for item in batch.items:
            item.seq.num_computed += item.num_new
