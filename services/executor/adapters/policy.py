"""Which adapter a full tier evicts: GDSF (cost-aware, frequency with ageing) or plain LRU.

    policy = make_policy("gdsf")
    policy.touch(key, size, cost)        # a hit, or an insertion (cost: seconds to reload it)
    victim = policy.victim(candidates)   # the one to evict among the evictable (unpinned) keys
    policy.remove(key)                   # it was evicted (GDSF remembers its frequency)
    policy.forget(key)                   # it is gone for good (deleted, unusable): nothing kept

GDSF (Greedy-Dual-Size-Frequency, Cherkasova 1998): priority = L + frequency * cost / size. An
evicted key's priority becomes the clock L, so keys not touched since sink below newly touched ones
(ageing); a key that is expensive to reload (it came from the registry, not the disk) or small stays
longer than a cheap or large one with the same frequency. Frequencies also halve every `halve_every`
touches, so yesterday's hot adapter does not squat forever. An evicted key's frequency is remembered
(a bounded ghost table, halved with the rest): a hot adapter pushed out once, say while it was pinned
by nothing for a moment, comes back with its frequency instead of as a stranger, so it is not evicted
again at once (plain GDSF forgets it and thrashes the hottest adapters whose reload is cheap).
Pure: table-tested without servers.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Protocol


class EvictionPolicy(Protocol):
    def touch(self, key: Hashable, size: int, cost: float) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def forget(self, key: Hashable) -> None: ...
    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None: ...


class LRUPolicy:
    """Least recently touched first."""

    def __init__(self) -> None:
        self._clock = itertools.count()
        self._last: dict[Hashable, int] = {}

    def touch(self, key: Hashable, size: int = 1, cost: float = 1.0) -> None:
        self._last[key] = next(self._clock)

    def remove(self, key: Hashable) -> None:
        self._last.pop(key, None)

    forget = remove          # LRU keeps nothing of an evicted key either

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        return min(candidates, key=lambda k: self._last.get(k, -1), default=None)


class GDSFPolicy:
    """Lowest L + frequency * cost / size first (ties: least recently touched)."""

    def __init__(self, halve_every: int = 4096, ghosts: int = 4096) -> None:
        self.clock_l = 0.0
        self.halve_every = halve_every
        self.ghosts = ghosts
        self._ghost: OrderedDict[Hashable, float] = OrderedDict()   # evicted key -> its frequency
        self._touches = 0
        self._freq: dict[Hashable, float] = {}
        self._value: dict[Hashable, float] = {}      # cost / size, per key
        self._prio: dict[Hashable, float] = {}
        self._order = itertools.count()
        self._last: dict[Hashable, int] = {}

    def touch(self, key: Hashable, size: int = 1, cost: float = 1.0) -> None:
        self._touches += 1
        if self.halve_every and self._touches % self.halve_every == 0:
            self._freq = {k: f / 2 for k, f in self._freq.items()}
            self._ghost = OrderedDict((k, f / 2) for k, f in self._ghost.items() if f >= 1.0)
        if key not in self._freq:
            self._freq[key] = self._ghost.pop(key, 0.0)
        self._freq[key] += 1.0
        self._value[key] = max(cost, 1e-9) / max(size, 1)
        self._prio[key] = self.clock_l + self._freq[key] * self._value[key]
        self._last[key] = next(self._order)

    def remove(self, key: Hashable) -> None:
        prio = self._prio.pop(key, None)
        if prio is not None:       # evicted: the clock rises to its priority (ageing), but never past
            # a key still held: a victim chosen among the unpinned few can rank above keys pinned at
            # the time, and a clock above those would make every new key outrank the hottest ones
            self.clock_l = max(self.clock_l, min(prio, min(self._prio.values(), default=prio)))
        freq = self._freq.pop(key, None)
        if freq is not None and self.ghosts:
            self._ghost[key] = freq
            self._ghost.move_to_end(key)
            while len(self._ghost) > self.ghosts:
                self._ghost.popitem(last=False)
        self._value.pop(key, None)
        self._last.pop(key, None)

    def forget(self, key: Hashable) -> None:
        """Drop a key without ageing the others and forget its frequency (an unload, not an eviction)."""
        self._ghost.pop(key, None)
        self._prio.pop(key, None)
        self._freq.pop(key, None)
        self._value.pop(key, None)
        self._last.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        return min(candidates, key=lambda k: (self._prio.get(k, float("-inf")), self._last.get(k, -1)),
                   default=None)


POLICIES = {"gdsf": GDSFPolicy, "lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"eviction policy must be one of {sorted(POLICIES)}, got {name!r}") from None


def simulate(trace: Iterable[Hashable], capacity: int, policy: EvictionPolicy,
             size: dict | None = None, cost: dict | None = None) -> float:
    """Hit rate of `policy` over `trace` with room for `capacity` units (size 1 each by default)."""
    held: dict[Hashable, int] = {}
    used = hits = total = 0
    for key in trace:
        total += 1
        s = (size or {}).get(key, 1)
        c = (cost or {}).get(key, 1.0)
        if key in held:
            hits += 1
            policy.touch(key, s, c)
            continue
        if s > capacity:       # can never fit: a miss that evicts nothing (as the arena refuses it)
            continue
        while used + s > capacity:      # s fits once enough is evicted: held is never empty here
            v = policy.victim(held)
            used -= held.pop(v)
            policy.remove(v)
        held[key] = s
        used += s
        policy.touch(key, s, c)
    return hits / total if total else 0.0
