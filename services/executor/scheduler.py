"""Continuous batching: which sequences run this step, and how many tokens each.

    sched.add(seq); batch = sched.schedule(); ...forward, sample...; sched.advance(batch)

Every step: running sequences first, oldest first (decode = 1 token; an unfinished prompt continues
in chunks), then waiting ones are admitted while the batch, max_prefill_tokens and KV blocks allow.
Decode tokens never wait on the prefill budget, and prefill always gets its budget, so neither
starves. When KV blocks run out, cold adapters give back the KV blocks they borrowed (the unified
KV/adapter pool, `reclaim`); then the newest running sequence is preempted by recompute: its blocks
are freed and it goes back to the front of the queue with its tokens so far, to be prefilled again.
The step's sequences are sorted by adapter slot so each adapter's tokens form one segment.

Prefix caching (prefix_caching=True): every full block a sequence computes is registered under the
hash of its tokens, all tokens before it and the sequence's cache_key (adapter and version: an
adapter changes the K/V). A sequence admitted with no K/V yet (new, or preempted) first takes the
cached blocks of its longest registered prefix and computes only the rest, always at least its last
token, whose logits it needs.

Speculative decoding (speculator set, see spec_decode.py): once the step's batch is chosen, decoding
sequences get drafts while the speculator's room allows and free KV blocks hold them (a draft never
preempts anything). A drafting sequence computes its last token plus the draft as one short chunk,
with logits at each position (model_runner.py attends each position as a decode query of its own);
advance() then keeps the K/V of the accepted tokens only: the rejected positions are rolled back
(num_computed stops after the last accepted token, blocks holding nothing but rejected positions are
freed) and blocks are registered with the prefix cache only once every
token in them is accepted and appended.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.executor.kv_cache import KVBlockAllocator, block_hash, blocks_needed
from services.executor.spec_decode import SpecState, Speculator

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
    cache_key: str = ""           # what its K/V depend on besides the tokens: adapter@version
    block_hashes: list[bytes] = field(default_factory=list)   # of its first full blocks
    num_registered: int = 0       # its first blocks registered with the prefix cache
    prompt_logits: bool = False   # wants every prompt position's logits (prompt logprobs): no cached prefix
    spec: SpecState | None = None  # its speculation state (None: it never drafts)

    def hashes(self, n: int, block_size: int) -> list[bytes]:
        """The hashes of its first n full blocks (computed once, kept)."""
        hs = self.block_hashes
        while len(hs) < n:
            i = len(hs)
            hs.append(block_hash(hs[-1] if hs else b"", self.cache_key,
                                 self.token_ids[i * block_size:(i + 1) * block_size]))
        return hs[:n]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Scheduled:
    seq: Sequence
    num_new: int                  # computes (token_ids + draft)[num_computed : num_computed + num_new]
    samples: bool = field(init=False)   # the step reaches the end of the sequence's tokens
    draft: list[int] = field(default_factory=list)   # speculated tokens after token_ids, verified
    accepted: int = 0             # how many of the draft the sampler accepted (set before advance)

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
                 max_prefill_tokens: int, prefix_caching: bool = False,
                 speculator: Speculator | None = None):
        self.allocator, self.block_size = allocator, block_size
        self.speculator = speculator
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.prefix_caching = prefix_caching
        self.prefix_hit_tokens = 0    # prompt (or recomputed) tokens taken from the prefix cache
        self.prefill_tokens = 0       # prompt (or recomputed) tokens run through the model
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # in arrival order
        # the unified KV/adapter pool: reclaim(n) evicts cold adapters from lent KV blocks until n
        # blocks are free -> whether they are; tried before any sequence is preempted or left waiting
        self.reclaim: Callable[[int], bool] | None = None

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
        seq.num_registered = 0

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """A sequence with no K/V: hold the cached blocks of its longest registered prefix."""
        if not self.prefix_caching or seq.blocks or seq.prompt_logits:
            return
        full = (seq.num_tokens - 1) // self.block_size     # the last token is always computed
        seq.blocks = self.allocator.lookup(seq.hashes(full, self.block_size))
        seq.num_computed = len(seq.blocks) * self.block_size
        seq.num_registered = len(seq.blocks)

    def _grow(self, seq: Sequence, num_new: int, may_reclaim: bool = True) -> bool:
        extra = blocks_needed(seq.num_computed + num_new, self.block_size) - len(seq.blocks)
        if extra <= 0:
            return True
        if not self.allocator.can_allocate(extra) and not (
                may_reclaim and self.reclaim is not None and self.reclaim(extra)):
            return False
        try:
            seq.blocks.extend(self.allocator.allocate(extra))
        except MemoryError:       # the unified pool lent the blocks meanwhile (another thread)
            return False
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
            self._take_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, n):
                self._free(seq)                           # give the cached prefix back for now
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.running.sort(key=lambda q: q.arrival)   # a re-admitted preempted one keeps its age
            items.append(Scheduled(seq, n))
            self.prefix_hit_tokens += seq.num_computed
            budget -= n
        if self.speculator is not None and items:
            self._add_drafts(items)
        items.sort(key=lambda s: (s.seq.slot, s.seq.arrival))
        return Batch(items, preempted)

    def _add_drafts(self, items: list[Scheduled]) -> None:
        """Drafts for the batch's decoding sequences, oldest first, within the speculator's room."""
        room = self.speculator.room(len(items), sum(s.num_new for s in items))
        for item in items:
            if room <= 0:
                break
            seq = item.seq
            if seq.spec is None or item.num_new != 1 or not item.samples:
                continue
            draft = self.speculator.propose(seq.token_ids, seq.spec, room)
            if draft and self._grow(seq, 1 + len(draft), may_reclaim=False):
                item.draft, item.num_new = draft, 1 + len(draft)
                room -= len(draft)

    def advance(self, batch: Batch) -> None:
        """After the forward pass (and the sampler, which sets each item's `accepted`): the scheduled
        tokens' K/V are now in the cache, a draft's rejected positions rolled back, and the blocks
        filled with appended tokens are registered with the prefix cache."""
        for item in batch.items:
            seq = item.seq
            if not seq.blocks:            # finished (failed) while its output was sampled
                continue
            decodes = item.samples and seq.num_tokens > seq.prompt_len   # its last: a generated token
            if not item.draft:
                self.prefill_tokens += item.num_new - decodes
            seq.num_computed += item.num_new - (len(item.draft) - item.accepted)
            keep = blocks_needed(seq.num_computed + 1, self.block_size)
            if item.draft and len(seq.blocks) > keep:   # blocks only rejected positions reached
                self.allocator.free(seq.blocks[keep:])
                del seq.blocks[keep:]
            if self.prefix_caching:       # accepted drafts are appended after this: register later
                full = min(seq.num_computed, seq.num_tokens) // self.block_size
                if full > seq.num_registered:
                    hashes = seq.hashes(full, self.block_size)
                    for i in range(seq.num_registered, full):
                        self.allocator.register(seq.blocks[i], hashes[i])
                    seq.num_registered = full
