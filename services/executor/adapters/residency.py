"""The one owner of adapter residency: which adapter@version lives in which tier, and the loads.

    res = Residency(arena, source, model_cfg, max_rank, device=pool)   # device: a DevicePool or None
    fut = res.acquire("acme/sql", 0)     # Future[Lease]; done at once when the kernel's pool holds it
    lease = fut.result()                 # lease.entry: the pages the kernel reads, pinned until release
    res.release(lease)

Tiers, on CPU and CUDA alike: the device pool (device.DevicePool: accelerator memory on CUDA, a second
host pool on CPU with --device-cache-bytes) <- the pinned host arena <- the disk tier <- the registry
behind the source. Without a device pool (CPU) the kernel reads the arena in place. The device tier
holds a subset of the host tier's adapters, in the same page layout.

A host miss loads on a background thread: source.read (disk, else the registry, digest-checked) ->
parse + validate (reader.read_adapter) -> pages in the arena, evicting unpinned adapters by the
policy (GDSF by default) until they fit. A device miss copies the arena's pages into the device pool
on a placement thread (evicting unpinned device placements), waits there for the copy, then hands
out the lease: the request waits outside the batch, the running batch never waits for a copy. A
lease pins its adapter in every tier it is in. Concurrent acquires share one load and one placement.
Version 0 (latest) is served at once from a resident copy; when its resolution is older than
`latest_ttl_s` it is re-resolved in the background (a registry change feed updates it at once
through set_latest). A version no longer the latest goes first when a tier needs room; a deleted one
(unload) leaves every tier at once, or at its last release when requests use it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import structlog

from services.common.errors import ResourceExhausted, Unavailable
from services.common.peft_format import WEIGHTS_FILE
from services.executor.adapters.arena import ArenaEntry, HostArena, PackedAdapter
from services.executor.adapters.policy import make_policy
from services.executor.adapters.reader import read_adapter
from services.executor.adapters.source import UnusableCopy
from services.executor.model.llama import ModelConfig

log = structlog.get_logger(__name__)

Key = tuple[str, int]
_DEVICE_COST_PER_BYTE = 1e-10   # a device placement's reload is a host->device copy: uniform cost


@dataclass(frozen=True)
class Lease:
    key: Key
    entry: ArenaEntry       # the pages the kernel reads (the device pool's, else the arena's)
    load_ms: float          # 0 when it was already resident
    source_tier: str        # where it came from: "device" or "host" (hits), "disk" or "registry"
    held: object = field(default=None, compare=False, repr=False)

    @property
    def version(self) -> int:
        return self.key[1]

    @property
    def slot(self) -> int:  # the batch sort key (unique per placement)
        return self.entry.uid


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


@dataclass(eq=False)
class _Held:
    key: Key
    entry: ArenaEntry                 # its host arena pages
    pins: int = 0
    dev: ArenaEntry | None = None     # its device pool pages, once their copy has landed
    placing: list | None = None       # (future, load_ms, tier) waiting for a device placement
    draining: bool = False            # unloaded or deleted while in use: freed at its last release


@dataclass
class _Load:
    waiters: list[tuple[Future, bool]] = field(default_factory=list)   # (future, wants the device)


class Residency:
    def __init__(self, arena: HostArena, source, cfg: ModelConfig, max_rank: int, *,
                 device=None, max_device_adapters: int = 0,
                 policy: str = "gdsf", latest_ttl_s: float = 5.0, workers: int = 4,
                 wait_s: float = 120.0, on_load: Callable[[str, float], None] | None = None,
                 write_back: bool = True, write_back_queue: int = 8):
        self.arena, self.source, self.cfg, self.max_rank = arena, source, cfg, max_rank
        self.device = device                     # DevicePool or None (the kernel reads the arena)
        self.max_device_adapters = max_device_adapters
        self.latest_ttl_s, self.wait_s = latest_ttl_s, wait_s
        self.on_load = on_load
        self.host = TierCounters()
        self.dev = TierCounters()
        self._policy = make_policy(policy)
        self._dev_policy = make_policy(policy)
        self._dev_count = 0
        self._cond = threading.Condition()
        self._held: dict[Key, _Held] = {}
        self._draining: dict[int, _Held] = {}   # unloaded while in use: freed at their last release
        self._load_cost: dict[Key, float] = {}  # seconds the last load took (GDSF's fallback cost)
        self._rate: dict[str, float] = {}       # source tier -> seconds per byte to load (moving average)
        self._holds = getattr(source, "holds", None)   # (id, version) -> on the disk tier now?
        self._latest: dict[str, tuple[int, float]] = {}
        self._refreshing: set[str] = set()
        self._loads: dict[Key, _Load] = {}
        # unload stamps (id, version) (version 0: every version) with the epoch it happened in: a load
        # or write-back started before it does not keep what it brings
        self._epoch = 0
        self._unloaded: dict[Key, int] = {}
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="adapter-load")
        self._placer = ThreadPoolExecutor(2, thread_name_prefix="adapter-device")
        self._closed = False
        # an evicted adapter the disk no longer holds is written back there (its packed image), so
        # the host and disk tiers hold different adapters and a reload is a disk read, not a fetch
        self._write_back = getattr(source, "write_back", None) if write_back and self._holds else None
        self._write_back_queue = write_back_queue
        self._writing = 0                        # write-backs queued or running
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="adapter-write-back")
        set_covered = getattr(source, "set_covered", None)
        if set_covered is not None:   # the disk tier evicts what the arena holds first
            set_covered(self._held.__contains__)

    @property
    def kernel_pool(self):
        """The pages the kernel reads: the device pool, else the host arena."""
        return self.device if self.device is not None else self.arena

    # -- requests ----------------------------------------------------------------------------
    def acquire(self, adapter_id: str, version: int, device: bool = True) -> Future:
        """Future[Lease], pinned for the caller until release(lease). device=False: the host tier
        is enough (LoadAdapter(HOST)); the lease's entry is then the arena's."""
        fut: Future = Future()
        to_device = device and self.device is not None
        with self._cond:
            if self._closed:
                fut.set_exception(Unavailable("executor is shutting down"))
                return fut
            key = self._resident(adapter_id, version)
            if key is not None:
                held = self._held[key]
                held.pins += 1
                self.host.hits += 1
                self._policy.touch(key, held.entry.nbytes, self._cost(key, held.entry.nbytes))
                if to_device:
                    if held.dev is not None:
                        self.dev.hits += 1
                    else:
                        self.dev.misses += 1
                self._serve(held, [(fut, 0.0, "device" if held.dev is not None else "host")], to_device)
                return fut
            self.host.misses += 1
            if to_device:
                self.dev.misses += 1
            req = (adapter_id, version)
            load = self._loads.get(req)
            if load is None:
                load = self._loads[req] = _Load()
                self._workers.submit(self._load, adapter_id, version, load,
                                     self._epoch)
            load.waiters.append((fut, to_device))
        return fut

    def release(self, lease: Lease) -> None:
        with self._cond:
            if lease.held is not None:
                self._unpin(lease.held)
            self._cond.notify_all()

    def preload(self, adapter_id: str, version: int, timeout: float | None = None,
                device: bool = True) -> Lease:
        """Blocking load into the kernel's pool (device=False: the host arena), not left pinned;
        UNAVAILABLE past `timeout` s."""
        fut = self.acquire(adapter_id, version, device)
        try:
            lease = fut.result(timeout)
        except FutureTimeout:
            fut.add_done_callback(lambda f: f.exception() is None and self.release(f.result()))
            raise Unavailable(f"adapter {adapter_id!r} did not load within {timeout:.0f} s; "
                              "the load continues in the background, retry later") from None
        self.release(lease)
        return lease

    def unload(self, adapter_id: str, version: int = 0) -> None:
        """Drop adapter_id's `version` (0: every version) from every tier at once; copies in use go
        when their last user ends."""
        with self._cond:
            latest = self._latest.get(adapter_id)
            if version == 0 or (latest is not None and latest[0] == version):
                self._latest.pop(adapter_id, None)
            if not self._loads and not self._writing:   # nothing started earlier is in flight
                self._unloaded.clear()
            self._epoch += 1
            self._unloaded[(adapter_id, version)] = self._epoch
            for key in [k for k in self._held if k[0] == adapter_id and version in (0, k[1])]:
                held = self._held[key]
                if held.pins == 0:
                    self._free(key, evicted=False)
                else:
                    self._drain(key)
            self._cond.notify_all()

    def set_latest(self, adapter_id: str, version: int) -> None:
        """The registry says `version` is now adapter_id's latest (a change feed event); older
        versions held are superseded: they go first when a tier needs room."""
        with self._cond:
            self._latest[adapter_id] = (version, time.monotonic())

    def residency(self) -> list[tuple[str, int, int]]:
        """(adapter_id, version, active requests) of every adapter in the arena."""
        with self._cond:
            return [(k[0], k[1], h.pins) for k, h in self._held.items()]

    def placements(self) -> list[tuple[str, int, str, int]]:
        """(adapter_id, version, fastest tier "device" | "host", active requests) of each held one."""
        with self._cond:
            return [(k[0], k[1], "device" if h.dev is not None else "host", h.pins)
                    for k, h in self._held.items()]

    def host_stats(self) -> dict[str, int]:
        with self._cond:
            return dict(adapters=len(self._held),
                        bytes_used=self.arena.used_bytes, bytes_capacity=self.arena.capacity_bytes,
                        hits=self.host.hits, misses=self.host.misses, loads=self.host.loads,
                        evictions=self.host.evictions)

    def device_stats(self) -> dict[str, int]:
        if self.device is None:
            return {}
        with self._cond:
            return dict(adapters=self._dev_count, bytes_used=self.device.used_bytes,
                        bytes_capacity=self.device.capacity_bytes, hits=self.dev.hits,
                        misses=self.dev.misses, loads=self.dev.loads, evictions=self.dev.evictions)

    def reclaim(self, want_blocks: int, blocks_free: Callable[[], int]) -> int:
        """The unified KV/adapter pool: KV needs `want_blocks` free blocks (blocks_free() counts
        them); evict cold adapters of the kernel's pool that sit in borrowed KV blocks (never one a
        request pins) until it has them or none is left. -> blocks freed."""
        pool = self.kernel_pool
        before = blocks_free()
        with self._cond:
            while blocks_free() < want_blocks:
                if pool is self.device:
                    cands = {h.key: h for h in self._held.values()
                             if h.dev is not None and h.pins == 0 and pool.holds_borrowed(h.dev.pages)}
                else:
                    cands = {h.key: h for h in self._held.values()
                             if h.pins == 0 and pool.holds_borrowed(h.entry.pages)}
                if not cands:
                    break
                if pool is self.device:
                    self._evict_device(cands[self._pick(self._dev_policy, list(cands))])
                else:
                    self._free(self._pick(self._policy, list(cands)))
            self._cond.notify_all()
        return blocks_free() - before

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._placer.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=False, cancel_futures=True)

    # -- internals (callers hold self._cond) -----------------------------------------------------
    def _serve(self, held: _Held, waiters: list[tuple[Future, float, str]], to_device: bool) -> None:
        """Hand out leases to waiters already pinned on `held`: at once when the kernel's pool holds
        it, else once a placement thread has copied it to the device pool."""
        if not to_device:
            for fut, ms, tier in waiters:
                fut.set_result(Lease(held.key, held.entry, ms, tier, held))
            return
        if held.dev is not None:
            self._dev_policy.touch(held.key, held.dev.nbytes, held.dev.nbytes * _DEVICE_COST_PER_BYTE)
            for fut, ms, tier in waiters:
                fut.set_result(Lease(held.key, held.dev, ms, tier, held))
            return
        if held.placing is None:
            held.placing = []
            self._placer.submit(self._place, held)
        held.placing.extend(waiters)

    def _unpin(self, held: _Held) -> None:
        held.pins -= 1
        if held.draining and held.pins == 0:
            self._draining.pop(id(held), None)
            self._release_memory(held)

    def _release_memory(self, held: _Held) -> None:
        if held.dev is not None:
            self._drop_device(held)
        self.arena.free(held.entry)

    def _drop_device(self, held: _Held) -> None:
        self.device.free(held.dev)
        held.dev = None
        self._dev_count -= 1
        self._dev_policy.forget(held.key)

    def _evict_device(self, held: _Held) -> None:
        """Out of the device tier (the host tier keeps it)."""
        nbytes = held.dev.nbytes
        self._drop_device(held)
        self._dev_policy.remove(held.key)
        self.dev.evictions += 1
        log.info("adapter_evicted", tier="device", adapter_id=held.key[0], version=held.key[1],
                 bytes=nbytes)

    def _unloaded_since(self, key: Key, epoch: int) -> bool:
        """Was key's version (or every version of its id) unloaded after `epoch`?"""
        return max(self._unloaded.get(key, 0), self._unloaded.get((key[0], 0), 0)) > epoch

    def _superseded(self, key: Key) -> bool:
        latest = self._latest.get(key[0])
        return latest is not None and key[1] < latest[0]

    def _pick(self, policy, candidates: list[Key]) -> Key | None:
        """The victim among candidates: a superseded version first, else the policy's choice."""
        stale = [k for k in candidates if self._superseded(k)]
        return policy.victim(stale or candidates)

    def _resident(self, adapter_id: str, version: int) -> Key | None:
        if version == 0:
            latest = self._latest.get(adapter_id)
            if latest is None:
                return None
            if time.monotonic() - latest[1] > self.latest_ttl_s:
                self._refresh_latest(adapter_id)      # in the background; this request goes on
            version = latest[0]
        key = (adapter_id, version)
        return key if key in self._held else None

    def _refresh_latest(self, adapter_id: str) -> None:
        if adapter_id in self._refreshing or self._closed:
            return
        self._refreshing.add(adapter_id)

        def refresh() -> None:
            try:
                version = self.source.latest(adapter_id)
                with self._cond:
                    self._latest[adapter_id] = (version, time.monotonic())
            except Exception as exc:   # the registry is down: keep serving what we have
                log.info("latest_refresh_failed", adapter_id=adapter_id, error=str(exc))
                with self._cond:
                    if adapter_id in self._latest:
                        self._latest[adapter_id] = (self._latest[adapter_id][0], time.monotonic())
            finally:
                with self._cond:
                    self._refreshing.discard(adapter_id)

        self._workers.submit(refresh)

    def _cost(self, key: Key, nbytes: int) -> float:
        """GDSF's reload cost: what reloading it would take now, from the disk tier if a copy is there,
        else from the registry (a moving average per tier x its size). Not the last load's own time: a
        hot adapter last reloaded from disk in 2 ms would otherwise rank below a one-off fetched in
        40 ms, be evicted again, and by then its disk copy may be gone too."""
        tier = "disk" if self._holds is not None and self._holds(*key) else "registry"
        rate = self._rate.get(tier)
        return rate * nbytes if rate is not None else self._load_cost.get(key, 1e-3)

    def _observe(self, tier: str, seconds: float, nbytes: int) -> None:
        if tier in ("disk", "registry") and nbytes:
            old = self._rate.get(tier)
            rate = seconds / nbytes
            self._rate[tier] = rate if old is None else 0.9 * old + 0.1 * rate

    def _drain(self, key: Key) -> None:
        """Out of the table at once (no new user finds it); its pages go at its last release."""
        held = self._held.pop(key)
        self._load_cost.pop(key, None)
        self._policy.forget(key)
        if held.pins == 0:
            self._release_memory(held)
        else:
            held.draining = True
            self._draining[id(held)] = held

    def _free(self, key: Key, evicted: bool = True) -> None:
        held = self._held.pop(key)
        self._load_cost.pop(key, None)
        if evicted:
            self._policy.remove(key)
            self.host.evictions += 1
            log.info("adapter_evicted", tier="host", adapter_id=key[0], version=key[1],
                     bytes=held.entry.nbytes)
            if held.dev is not None:
                self._evict_device(held)
            self._queue_write_back(key, held.entry)
        else:
            self._policy.forget(key)
        self._release_memory(held)

    def _queue_write_back(self, key: Key, entry: ArenaEntry) -> None:
        """(Caller holds the lock.) Copy an evicted adapter's pages out, to be written to the disk tier
        in the background, when the disk no longer holds it. At most write_back_queue wait: under a
        burst of evictions the rest are dropped (they are fetched again if asked for)."""
        if (self._write_back is None or self._closed or self._holds(*key)
                or self._writing >= self._write_back_queue):
            return
        packed = PackedAdapter(rows=self.arena.pages[entry.pages.long()].clone(),
                               meta=entry.meta.clone(), scalings=entry.scalings.clone(), rank=entry.rank)
        self._writing += 1
        self._writer.submit(self._write, key, packed, self.source.generation(key[0]), self._epoch)

    def _write(self, key: Key, packed: PackedAdapter, generation: int, gen: int) -> None:
        try:
            if not self._unloaded_since(key, gen):          # not unloaded since
                if self._write_back(key[0], key[1], self.arena.signature(),
                                    lambda path: _save_image(path, packed), generation):
                    log.info("adapter_written_back", adapter_id=key[0], version=key[1],
                             bytes=packed.rows.numel() * packed.rows.element_size())
        except Exception as exc:    # the disk tier is full of copies being read, gone, ...: skip it
            log.info("adapter_write_back_skipped", adapter_id=key[0], version=key[1], error=str(exc))
        finally:
            with self._cond:
                self._writing -= 1

    def _make_room(self, n: int, key: Key) -> list[int]:
        """n pages, evicting unpinned adapters (policy order), waiting for pins to drop if need be."""
        if n > self.arena.max_pages:
            raise ResourceExhausted(
                f"adapter {key[0]!r} v{key[1]} needs {n * self.arena.page_bytes} bytes, more than the "
                f"whole host arena ({self.arena.capacity_bytes} bytes); raise --host-cache-bytes")
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._closed:
                raise Unavailable("executor is shutting down")
            ids = self.arena.allocate(n)
            if ids is not None:
                return ids
            idle = [k for k, h in self._held.items() if h.pins == 0]
            victim = self._pick(self._policy, idle)
            if victim is not None:
                self._free(victim)
                continue
            if time.monotonic() > deadline:
                raise ResourceExhausted(
                    f"adapter {key[0]!r}: the host arena ({self.arena.capacity_bytes} bytes) stayed "
                    f"full of adapters in use for {self.wait_s:.0f} s; retry later or raise "
                    "--host-cache-bytes")
            self._cond.wait(1.0)

    def _finish(self, req: Key, load: _Load, key: Key, load_ms: float, tier: str) -> None:
        held = self._held[key]
        held.pins += len(load.waiters)
        for to_device in (False, True):
            waiters = [(fut, load_ms, tier) for fut, dev in load.waiters if dev == to_device]
            if waiters:
                self._serve(held, waiters, to_device)
        self._loads.pop(req, None)

    def _device_room(self, held: _Held) -> list[int]:
        """Device pages for `held`, evicting unpinned device placements (superseded versions first,
        then by the policy), waiting for pins to drop if need be (on a placement thread)."""
        n, key, pool = held.entry.pages.numel(), held.key, self.device
        if n > pool.max_pages:
            raise ResourceExhausted(
                f"adapter {key[0]!r} v{key[1]} needs {n * pool.page_bytes} bytes, more than the whole "
                f"device pool ({pool.max_pages * pool.page_bytes} bytes); raise --device-cache-bytes")
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._closed:
                raise Unavailable("executor is shutting down")
            if not self.max_device_adapters or self._dev_count < self.max_device_adapters:
                ids = pool.allocate(n)
                if ids is not None:
                    return ids
            idle = {h.key: h for h in self._held.values() if h.dev is not None and h.pins == 0}
            victim = self._pick(self._dev_policy, list(idle))
            if victim is not None:
                self._evict_device(idle[victim])
                continue
            if time.monotonic() > deadline:
                raise ResourceExhausted(
                    f"adapter {key[0]!r}: the device pool ({pool.capacity_bytes} bytes, at most "
                    f"{self.max_device_adapters or 'any number of'} adapters) stayed full of adapters in "
                    f"use for {self.wait_s:.0f} s; retry later or raise --device-cache-bytes")
            self._cond.wait(1.0)

    def _place(self, held: _Held) -> None:
        """(A placement thread.) Copy held's arena pages to the device pool, wait for the copy to
        land, then serve its waiters; they keep it pinned in the host tier meanwhile."""
        t0 = time.perf_counter()
        try:
            with self._cond:
                ids = self._device_room(held)
            try:
                entry, copy = self.device.fill(ids, self.arena, held.entry)
                self.device.wait(copy)
            except BaseException:
                with self._cond:
                    self.device.release_pages(ids)
                    self._cond.notify_all()
                raise
            ms = (time.perf_counter() - t0) * 1000
            with self._cond:
                held.dev = entry
                self._dev_count += 1
                self.dev.loads += 1
                self._dev_policy.touch(held.key, entry.nbytes, entry.nbytes * _DEVICE_COST_PER_BYTE)
                waiters, held.placing = held.placing or [], None
                for fut, load_ms, tier in waiters:
                    fut.set_result(Lease(held.key, entry, load_ms + ms, tier, held))
                self._cond.notify_all()
            if self.on_load is not None:     # a device placement's source tier: the host arena
                self.on_load("host", ms / 1000)
            log.info("adapter_placed", tier="device", adapter_id=held.key[0], version=held.key[1],
                     bytes=entry.nbytes, copy_ms=round(ms, 2))
        except BaseException as exc:  # every waiter learns why, and gives its pin back
            with self._cond:
                waiters, held.placing = held.placing or [], None
                for fut, _, _ in waiters:
                    self._unpin(held)
                    fut.set_exception(exc)
                self._cond.notify_all()

    # -- the background load -----------------------------------------------------------------
    def _read_packed(self, path):
        """The adapter at `path` parsed, validated and laid out in pages, off the engine thread. A
        disk tier that keeps a packed image beside the files (source.packed_path) skips the parse on
        the next miss: one read of exactly the bytes the pages hold."""
        image = getattr(self.source, "packed_path", lambda p, sig: None)(path, self.arena.signature())
        if image is not None:
            packed = _load_image(image, self.arena)
            if packed is not None:
                return packed
            if not (path / WEIGHTS_FILE).exists():    # a written-back copy: the image is all it has
                raise UnusableCopy(f"{path}: no usable packed image and no adapter files")
        packed = self.arena.pack(read_adapter(path, self.cfg, self.max_rank, check_finite=False))
        if image is not None:
            _save_image(image, packed)
        return packed

    def _load(self, adapter_id: str, version: int, load: _Load, gen: int) -> None:
        t0 = time.perf_counter()
        req = (adapter_id, version)
        try:
            want = version
            if version == 0:      # a recently confirmed latest (evicted since): no registry round trip
                with self._cond:
                    latest = self._latest.get(adapter_id)
                    if latest is not None and time.monotonic() - latest[1] <= self.latest_ttl_s:
                        want = latest[0]
            resolved, host, tier = self.source.read(adapter_id, want, self._read_packed)
            key = (adapter_id, resolved)
            with self._cond:
                if version == 0:
                    self._latest[adapter_id] = (resolved, time.monotonic())
                if key in self._held:
                    self._finish(req, load, key, 0.0, "host")
                    return
                ids = self._make_room(self.arena.pages_of(host), key)
            try:
                entry = self.arena.write(ids, host)      # pages nobody else reads: no lock
            except BaseException:
                with self._cond:
                    self.arena.release_pages(ids)
                    self._cond.notify_all()
                raise
            load_s = time.perf_counter() - t0
            with self._cond:
                if key in self._held:          # a twin load (another version request) won: use it
                    self.arena.free(entry)
                    self._finish(req, load, key, 0.0, "host")
                    return
                self._held[key] = _Held(key, entry)
                self._load_cost[key] = load_s
                self._observe(tier, load_s, entry.nbytes)
                self._policy.touch(key, entry.nbytes, self._cost(key, entry.nbytes))
                self.host.loads += 1
                self._finish(req, load, key, load_s * 1000, tier)
                if self._unloaded_since(key, gen):   # unloaded while it loaded: serve, then go
                    self._drain(key)
                self._cond.notify_all()
            if self.on_load is not None:
                self.on_load(tier, load_s)
            log.info("adapter_loaded", adapter=adapter_id, version=resolved, source_tier=tier,
                     bytes=entry.nbytes, load_ms=round(load_s * 1000, 2))
        except BaseException as exc:  # every waiter learns why
            with self._cond:
                self._loads.pop(req, None)
                for fut, _ in load.waiters:
                    if not fut.done():
                        fut.set_exception(exc)



def _load_image(path, arena: HostArena):
    """A packed image written by _save_image, or None (absent, unreadable or not this layout)."""
    import torch

    from services.executor.adapters.arena import PackedAdapter
    try:
        d = torch.load(path, weights_only=True)
        rows = d["rows"]
        if rows.dtype != arena.dtype or rows.dim() != 2 or rows.shape[1] != arena.layout.page_elems:
            return None
        if int(d["checksum"]) != _checksum(rows):
            log.warning("packed_image_corrupt_discarded", path=str(path))
            path.unlink(missing_ok=True)
            return None
        return PackedAdapter(rows=rows, meta=d["meta"], scalings=d["scalings"], rank=int(d["rank"]))
    except FileNotFoundError:
        return None
    except Exception as exc:   # a torn or foreign file: rebuilt from the adapter's own files
        log.warning("packed_image_unreadable", path=str(path), error=str(exc))
        return None


def _save_image(path, packed) -> None:
    import os

    import torch
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        torch.save({"rows": packed.rows, "meta": packed.meta, "scalings": packed.scalings,
                    "rank": packed.rank, "checksum": _checksum(packed.rows)}, tmp)
        os.replace(tmp, path)
    except OSError as exc:     # the disk tier is gone or full: the next miss parses again
        log.info("packed_image_not_saved", path=str(path), error=str(exc))
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _checksum(rows) -> int:
    """A cheap content check (bit rot, torn writes): sums of the rows' bytes as int64 words."""
    import torch
    flat = rows.contiguous().view(-1).view(torch.uint8)
    n = flat.numel() // 8 * 8
    words = flat[:n].view(torch.int64)
    return int(words.sum()) ^ int(words[::7].sum()) * 31 ^ n
