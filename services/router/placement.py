"""Pure placement: an immutable snapshot of executors + a request -> executors in preference order.

    rank(snapshot, adapter_id, prefix_holder=None, key=None, adapter_load=0) -> [address, ...]

The executors together are one adapter cache, so the adapter space is partitioned over them:

- **Home.** Each adapter has a preference order over the executors, rendezvous (HRW) hashing of
  (adapter id, address): its home is the first. Executors joining or leaving move only the adapters
  whose home they are (1/N of them).
- **Bounded load** (Mirrokni et al., consistent hashing with bounded loads). An executor is full when
  it carries at least `BOUND` x the fleet's mean load (in requests, counting this one; never less than
  MIN_CAP) and at least its batch (room()): the request walks on down its adapter's order to the
  first executor that is not full. Below a full batch, one more request joins the running batch and
  queues for nothing, while spilling it would copy its adapter into a second executor's tiers and
  evict something there: the partition holds until an executor really queues.
- **As many executors as its load needs.** An adapter with `adapter_load` requests in flight needs
  ceil((adapter_load + 1) / per-executor bound) executors: a hot adapter spreads over the first few
  of its order, chosen among them by load minus a bonus for already holding the adapter (device >
  host > disk), and comes home when it cools (its width falls back to one).
- **Base-only requests** need no adapter: they go by load, minus a bonus for the executor that last
  served the longest matching prompt prefix (prefix affinity: its KV blocks are cached there), ties
  hashed on the prompt's first chunk so different system prompts spread.

prefix_chunks() keys a prompt's prefix as a chain of hashes of its 64-byte chunks (after the adapter
id, since an adapter changes the K/V), and PrefixIndex remembers which executor last served each
chain, so the longest match wins; among an adapter's candidates the prefix holder gets the same bonus.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# tier -> bonus in "load units" (one unit = one full batch of queued work)
TIER_BONUS = {1: 1.0, 2: 0.6, 3: 0.3}   # ADAPTER_TIER_DEVICE, _HOST, _DISK
PREFIX_BONUS = 0.5      # for the executor that last served the longest matching prompt prefix
PREFIX_CHUNK = 64       # bytes of prompt per prefix hash: ~16 tokens of text, or 16 token ids
PREFIX_CHUNKS = 64      # prefix hashes kept per request (its first 4 KiB)
BOUND = 1.25            # an executor is full at BOUND x the mean load (bounded-load hashing's c)
MIN_CAP = 4             # ...and never below this many requests: at near-idle load one request (or a
                        # status poll that still counts a finished one) must not push an adapter off
                        # its home; an executor batches a few more requests at almost no cost


@dataclass(frozen=True, slots=True)
class ExecutorView:
    """What the router knows of one executor at one moment."""

    address: str
    healthy: bool
    running: int = 0
    waiting: int = 0
    max_batch_size: int = 1
    adapters: dict[str, int] = field(default_factory=dict)   # adapter_id -> best tier held
    inflight: int = 0       # requests this router has sent there and not yet seen finish

    @property
    def requests(self) -> int:
        """Requests it carries: what it reported, or what this router knows it sent, if more."""
        return max(self.running + self.waiting, self.inflight)

    @property
    def load(self) -> float:
        """Queued work in units of full batches."""
        return self.requests / max(self.max_batch_size, 1)


def _hash(adapter_id: str, address: str) -> float:
    digest = hashlib.blake2b(f"{adapter_id}|{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def score(view: ExecutorView, adapter_id: str, prefix_holder: str | None = None,
          key: str | None = None) -> float:
    """Lower is better: load, minus a bonus for holding the adapter and one for having served the
    prompt's prefix, plus a small stable hash of key (default: the adapter id)."""
    bonus = TIER_BONUS.get(view.adapters.get(adapter_id, 0), 0.0) if adapter_id else 0.0
    if prefix_holder is not None and view.address == prefix_holder:
        bonus += PREFIX_BONUS
    return view.load - bonus + 0.01 * _hash(adapter_id if key is None else key, view.address)


def bound(snapshot: Sequence[ExecutorView]) -> int:
    """Requests at which a healthy executor counts as full: ceil(BOUND x mean load with this one)."""
    healthy = [v for v in snapshot if v.healthy]
    if not healthy:
        return 1
    total = sum(v.requests for v in healthy) + 1
    return max(MIN_CAP, math.ceil(BOUND * total / len(healthy)))


def room(view: ExecutorView, cap: int) -> int:
    """Requests at which this executor counts as full: the fleet's bound, but never below its batch
    (until then a request joins the running batch and waits for nothing, while a request sent
    elsewhere pulls its adapter into a second executor's tiers and evicts something there; the
    Gateway API Inference Extension's picker likewise keeps LoRA affinity until a queue forms)."""
    return max(cap, view.max_batch_size)


def home_order(snapshot: Sequence[ExecutorView], key: str) -> list[ExecutorView]:
    """The healthy executors in key's rendezvous order: its home first."""
    return sorted((v for v in snapshot if v.healthy), key=lambda v: -_hash(key, v.address))


def width(adapter_load: int, cap: int) -> int:
    """Executors an adapter with adapter_load requests in flight needs (this request included)."""
    return max(1, math.ceil((adapter_load + 1) / max(cap, 1)))


def rank(snapshot: list[ExecutorView], adapter_id: str, prefix_holder: str | None = None,
         key: str | None = None, adapter_load: int = 0) -> list[str]:
    """Healthy executors best-first, then unhealthy ones (tried last, in case the view is stale).

    prefix_holder: the executor that last served this prompt's longest known prefix (PrefixIndex);
    key: what ties are hashed on (default the adapter id; see tie_key); adapter_load: requests for
    this adapter in flight now (not counting this one)."""
    rest = sorted((v for v in snapshot if not v.healthy), key=lambda v: _hash(adapter_id, v.address))
    if not adapter_id:
        healthy = sorted((v for v in snapshot if v.healthy),
                         key=lambda v: score(v, adapter_id, prefix_holder, key))
        return [v.address for v in healthy + rest]
    order = home_order(snapshot, adapter_id)
    cap = bound(snapshot)
    n = min(width(adapter_load, room(order[0], cap)) if order else 1, len(order))
    open_ = [v for v in order if v.requests < room(v, cap)]
    chosen = open_[:n] or order[:n]     # everyone full: the adapter's own first n, by load
    pos = {v.address: i for i, v in enumerate(order)}
    chosen.sort(key=lambda v: (score(v, adapter_id, prefix_holder) if n > 1 else 0.0, pos[v.address]))
    picked = {v.address for v in chosen}
    return [v.address for v in chosen] + [v.address for v in order if v.address not in picked] \
        + [v.address for v in rest]


def prefix_chunks(adapter_id: str, prompt: str, token_ids: Sequence[int] = ()) -> list[bytes]:
    """The chained hashes of the prompt's full PREFIX_CHUNK-byte chunks (UTF-8 text, or the token ids
    as 4-byte words when there is no text), at most PREFIX_CHUNKS, seeded with the adapter id: two
    prompts share the first k hashes exactly when they share their first k chunks and adapter."""
    data = prompt.encode() if prompt else struct.pack(f"<{len(token_ids)}I", *token_ids)
    chain = hashlib.blake2b(b"adapter:" + adapter_id.encode(), digest_size=8).digest()
    hashes = []
    for i in range(min(len(data) // PREFIX_CHUNK, PREFIX_CHUNKS)):
        chain = hashlib.blake2b(chain + data[i * PREFIX_CHUNK:(i + 1) * PREFIX_CHUNK], digest_size=8).digest()
        hashes.append(chain)
    return hashes


def tie_key(adapter_id: str, chunks: Sequence[bytes]) -> str:
    """What rank breaks ties on: the adapter id (an adapter keeps landing where it loaded), or for a
    base-only request its prompt's first chunk (each system prompt keeps landing on one executor)."""
    return adapter_id if adapter_id or not chunks else chunks[0].hex()


class PrefixIndex:
    """Which executor last served each prefix hash (prefix_chunks), least recently used first out."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._where: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._where)

    def lookup(self, chunks: Sequence[bytes]) -> tuple[str | None, int]:
        """(executor, chunks matched) for the longest prefix of chunks served before; (None, 0)."""
        for i in range(len(chunks) - 1, -1, -1):
            address = self._where.get(chunks[i])
            if address is not None:
                self._where.move_to_end(chunks[i])
                return address, i + 1
        return None, 0

    def record(self, chunks: Sequence[bytes], address: str) -> None:
        """address served a prompt with these chunks: it holds their KV blocks now."""
        for h in chunks:
            self._where[h] = address
            self._where.move_to_end(h)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)

    def forget(self, address: str) -> None:
        """address went away (or restarted): its prefixes are no longer cached anywhere known."""
        for h in [h for h, a in self._where.items() if a == address]:
            del self._where[h]
