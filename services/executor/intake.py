"""Adapter intake: requests wait here until their adapter is pinned, then join the scheduler.

The residency (adapters/residency.py, on CPU and CUDA) stays the single owner of
which adapters are loaded: intake only asks it for a lease (`acquire` -> a Future), keeps the
request aside until the Future is done, and gives the pin back (`release`) of a request that ended
first. Engine thread only, except the Futures' callbacks (which only wake the engine).
"""

from __future__ import annotations

from collections.abc import Callable

from services.executor.engine_types import RequestState
from services.executor.output import Finish
from services.executor.scheduler import Scheduler


class AdapterIntake:
    def __init__(self, adapters, scheduler: Scheduler, wake: Callable[[], None], finish: Finish):
        self.adapters, self.scheduler, self.wake, self.finish = adapters, scheduler, wake, finish
        self.pending: list[RequestState] = []

    def __len__(self) -> int:
        return len(self.pending)

    def admit(self, r: RequestState) -> None:
        """A new request: base-model ones are scheduled at once, the others ask for their adapter."""
        if not r.req.adapter_id:
            self.scheduler.add(r.seq)
            return
        r.lease_future = self.adapters.acquire(r.req.adapter_id, r.req.adapter_version)
        if not r.lease_future.done():   # woken when it is ready: no polling
            r.lease_future.add_done_callback(lambda _: self.wake())
        self.pending.append(r)

    def poll(self) -> None:
        """Schedule the requests whose adapter is now pinned; fail those whose load failed."""
        still = []
        for r in self.pending:
            if r.done:
                self.release_when_ready(r)
            elif not r.lease_future.done():
                still.append(r)
            elif r.lease_future.exception() is not None:
                self.finish(r, None, r.lease_future.exception())
            else:
                lease = r.lease_future.result()
                r.lease = lease
                r.slot = r.seq.slot = lease.slot
                r.seq.cache_key = f"{r.req.adapter_id}@{lease.version}"   # the adapter shapes the K/V
                self.scheduler.add(r.seq)
        self.pending = still

    def release_when_ready(self, r: RequestState) -> None:
        """A request that ended while its adapter loaded: give the pin back once it arrives."""
        r.lease_future.add_done_callback(
            lambda f: f.exception() is None and self.adapters.release(f.result()))
