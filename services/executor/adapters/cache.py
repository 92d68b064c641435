"""Which adapter lives in which device slot: an LRU over slots with pinning and single-flight loads.

    fut = cache.acquire("acme/sql", 0)   # Future[Lease]; done at once when resident
    lease = fut.result()                 # lease.slot is pinned: never evicted until release
    cache.release(lease.slot)

Loads run on background threads: resolve (AdapterSource) -> read + validate (pool.read_adapter) ->
wait for a slot that is free or unpinned (least recently used first) -> copy into it. Concurrent
acquires of one (adapter_id, version) share one load. Version 0 means latest: its resolution is
remembered for `latest_ttl_s` so hot adapters do not ask the source on every request.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import structlog

from services.common.errors import ResourceExhausted, Unavailable
from services.executor.adapters.pool import AdapterPool, read_adapter
from services.executor.adapters.source import AdapterSource, LocalDirSource, ResolvedAdapter
from services.executor.model.llama import ModelConfig

# the sources live in source.py (no torch); re-exported for callers that import them from here
__all__ = ["AdapterCache", "AdapterSource", "Lease", "LocalDirSource", "ResolvedAdapter"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Lease:
    slot: int
    version: int
    load_ms: float   # 0 when it was already resident


@dataclass
class _Slot:
    key: tuple[str, int]
    pins: int = 0
    last_used: float = 0.0
    loading: bool = True
    unload_pending: bool = False


@dataclass
class _Load:
    waiters: list[Future] = field(default_factory=list)


class AdapterCache:
    def __init__(self, pool: AdapterPool, source: AdapterSource, cfg: ModelConfig, max_rank: int,
                 *, latest_ttl_s: float = 5.0, workers: int = 4, slot_wait_s: float = 120.0):
        self.pool, self.source, self.cfg, self.max_rank = pool, source, cfg, max_rank
        self.latest_ttl_s = latest_ttl_s
        self.slot_wait_s = slot_wait_s
        self._cond = threading.Condition()
        self._slots: list[_Slot | None] = [None] * pool.num_slots
        self._by_key: dict[tuple[str, int], int] = {}
        self._latest: dict[str, tuple[int, float]] = {}
        self._loads: dict[tuple[str, int], _Load] = {}
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="adapter-load")
        self._closed = False

    # -- requests ----------------------------------------------------------------------------
    def acquire(self, adapter_id: str, version: int) -> Future:
        """Future[Lease] whose slot is pinned for the caller."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                fut.set_exception(Unavailable("executor is shutting down"))
                return fut
            slot = self._resident(adapter_id, version)
            if slot is not None:
                self._pin(slot)
                fut.set_result(Lease(slot, self._slots[slot].key[1], 0.0))
                return fut
            load = self._loads.get((adapter_id, version))
            if load is None:
                load = self._loads[(adapter_id, version)] = _Load()
                self._workers.submit(self._load, adapter_id, version, load)
            load.waiters.append(fut)
        return fut

    def release(self, slot) -> None:
        """Unpin a lease's slot (a Lease or its slot number)."""
        slot = getattr(slot, "slot", slot)
        with self._cond:
            s = self._slots[slot]
            s.pins -= 1
            s.last_used = time.monotonic()
            if s.pins == 0 and s.unload_pending:
                self._free(slot)
            self._cond.notify_all()

    def preload(self, adapter_id: str, version: int, timeout: float | None = None) -> Lease:
        """Blocking load into a slot (not left pinned); UNAVAILABLE if it takes over `timeout` s."""
        fut = self.acquire(adapter_id, version)
        try:
            lease = fut.result(timeout)
        except FutureTimeout:
            # the load goes on: give its pin back whenever it lands
            fut.add_done_callback(lambda f: f.exception() is None and self.release(f.result().slot))
            raise Unavailable(f"adapter {adapter_id!r} did not load within {timeout:.0f} s; "
                              "the load continues in the background, retry later") from None
        self.release(lease.slot)
        return lease

    def unload(self, adapter_id: str) -> None:
        """Drop every version of adapter_id; slots in use (or loading) go when their last user ends."""
        with self._cond:
            self._latest.pop(adapter_id, None)
            for slot, s in enumerate(self._slots):
                if s is None or s.key[0] != adapter_id:
                    continue
                if s.pins == 0 and not s.loading:
                    self._free(slot)
                else:
                    s.unload_pending = True
            self._cond.notify_all()

    def set_latest(self, adapter_id: str, version: int) -> None:
        """The registry says `version` is now adapter_id's latest (a change feed event)."""
        with self._cond:
            self._latest[adapter_id] = (version, time.monotonic())

    def residency(self) -> list[tuple[str, int, int]]:
        """(adapter_id, version, active requests) of every resident adapter."""
        with self._cond:
            return [(s.key[0], s.key[1], s.pins) for s in self._slots
                    if s is not None and not s.loading and not s.unload_pending]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._workers.shutdown(wait=False, cancel_futures=True)

    # -- internals (callers hold self._cond) -----------------------------------------------------
    def _resident(self, adapter_id: str, version: int) -> int | None:
        if version == 0:
            latest = self._latest.get(adapter_id)
            if latest is None or time.monotonic() - latest[1] > self.latest_ttl_s:
                return None
            version = latest[0]
        slot = self._by_key.get((adapter_id, version))
        if slot is None or self._slots[slot].unload_pending:
            return None
        return slot

    def _pin(self, slot: int) -> None:
        s = self._slots[slot]
        s.pins += 1
        s.last_used = time.monotonic()

    def _free(self, slot: int) -> None:
        s = self._slots[slot]
        if self._by_key.get(s.key) == slot:
            del self._by_key[s.key]
        self._slots[slot] = None
        self.pool.clear(slot)

    def _victim(self) -> int | None:
        free = [i for i, s in enumerate(self._slots) if s is None]
        if free:
            return free[0]
        idle = [(s.last_used, i) for i, s in enumerate(self._slots) if not s.loading and s.pins == 0]
        return min(idle)[1] if idle else None

    def _finish(self, key: tuple[str, int], load: _Load, slot: int, load_ms: float) -> None:
        for fut in load.waiters:
            self._pin(slot)
            fut.set_result(Lease(slot, self._slots[slot].key[1], load_ms))
        self._loads.pop(key, None)

    # -- the background load -----------------------------------------------------------------
    def _load(self, adapter_id: str, version: int, load: _Load) -> None:
        t0 = time.perf_counter()
        req_key = (adapter_id, version)
        try:
            resolved = self.source.resolve(adapter_id, version)
            key = (adapter_id, resolved.version)
            with self._cond:
                if version == 0:
                    self._latest[adapter_id] = (resolved.version, time.monotonic())
                slot = self._by_key.get(key)
                if slot is not None and not self._slots[slot].unload_pending:
                    self._finish(req_key, load, slot, 0.0)
                    return
            host = read_adapter(resolved.path, self.cfg, self.max_rank)
            with self._cond:
                deadline = time.monotonic() + self.slot_wait_s
                while True:
                    if self._closed:
                        raise Unavailable("executor is shutting down")
                    slot = self._by_key.get(key)
                    if slot is not None and not self._slots[slot].unload_pending:
                        self._finish(req_key, load, slot, 0.0)
                        return
                    twin = any(s is not None and s.key == key and s.loading and not s.unload_pending
                               for s in self._slots)   # the same version loading for another key
                    victim = None if twin else self._victim()
                    if victim is not None:
                        break
                    if time.monotonic() > deadline:
                        raise ResourceExhausted(
                            f"adapter {adapter_id!r}: all {len(self._slots)} device adapter slots "
                            f"stayed in use for {self.slot_wait_s:.0f} s; retry later or raise "
                            "--max-device-adapters")
                    self._cond.wait(1.0)      # every slot is in use (or a twin loads): wait
                if self._slots[victim] is not None:
                    log.info("adapter_evicted", adapter=self._slots[victim].key, slot=victim)
                    self._free(victim)
                self._slots[victim] = _Slot(key=key)
            try:
                self.pool.write(victim, host)
            except BaseException:
                with self._cond:
                    self._slots[victim] = None
                    self._cond.notify_all()
                raise
            load_ms = (time.perf_counter() - t0) * 1000
            with self._cond:
                self._slots[victim].loading = False
                if not self._slots[victim].unload_pending:
                    self._by_key[key] = victim
                self._finish(req_key, load, victim, load_ms)
                self._cond.notify_all()
            log.info("adapter_loaded", adapter=adapter_id, version=key[1], slot=victim,
                     load_ms=round(load_ms, 2))
        except BaseException as exc:  # every waiter learns why
            with self._cond:
                self._loads.pop(req_key, None)
                for fut in load.waiters:
                    if not fut.done():
                        fut.set_exception(exc)
