"""Pure placement: an immutable snapshot of executors + a request -> executors in preference order.

    rank(snapshot, adapter_id) -> [address, ...]   # first is the choice, the rest are failovers

Send a request where its adapter already is (device > host > disk), unless that executor is much
busier than the least busy one; otherwise spread by load, breaking ties with rendezvous hashing on the
adapter id so one adapter keeps landing on the same executor (it loads once, then stays warm).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# tier -> bonus in "load units" (one unit = one full batch of queued work)
TIER_BONUS = {1: 1.0, 2: 0.6, 3: 0.3}   # ADAPTER_TIER_DEVICE, _HOST, _DISK


@dataclass(frozen=True, slots=True)
class ExecutorView:
    """What the router knows of one executor at one moment."""

    address: str
    healthy: bool
    running: int = 0
    waiting: int = 0
    max_batch_size: int = 1
    adapters: dict[str, int] = field(default_factory=dict)   # adapter_id -> best tier held

    @property
    def load(self) -> float:
        """Queued work in units of full batches."""
        return (self.running + self.waiting) / max(self.max_batch_size, 1)


def _hash(adapter_id: str, address: str) -> float:
    digest = hashlib.blake2b(f"{adapter_id}|{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def score(view: ExecutorView, adapter_id: str) -> float:
    """Lower is better: load, minus a bonus for holding the adapter, plus a small stable hash."""
    bonus = TIER_BONUS.get(view.adapters.get(adapter_id, 0), 0.0) if adapter_id else 0.0
    return view.load - bonus + 0.01 * _hash(adapter_id, view.address)


def rank(snapshot: list[ExecutorView], adapter_id: str) -> list[str]:
    """Healthy executors best-first, then unhealthy ones (tried last, in case the view is stale)."""
    healthy = sorted((v for v in snapshot if v.healthy), key=lambda v: score(v, adapter_id))
    rest = sorted((v for v in snapshot if not v.healthy), key=lambda v: _hash(adapter_id, v.address))
    return [v.address for v in healthy + rest]
