"""Subscribers of the registry's change feed (AdapterRegistry.WatchAdapters).

    watch = ChangeWatch(registry_address, on_change)   # on_change(AdapterChange) -> None | awaitable
    watch.start(); ...; await watch.close()

One stream, reopened with backoff (0.1 s doubling to 5 s) when it breaks; a registry without the
feed (UNIMPLEMENTED) is retried every 30 s and logged once. `connected` is true while a stream has
been open a moment without failing: a subscriber may then trust cached answers longer, since any
change would have arrived. `on_reconnect` runs when a stream opens again after a break (changes in
the gap were missed: drop what they could have changed).

The executor's subscriber (`start_executor_watch`) hands every change to
`engine.adapter_changed(adapter_id, version, latest_version, deleted)`: a deletion unloads the
adapter from every tier, a new version becomes "latest" at once. The router's uses the same class
(services/router/registry_check.py). No torch is imported here.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import grpc
import structlog

from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
from services.common.tls import ClientSecurity, aio_channel

log = structlog.get_logger(__name__)
DELETED = registry_pb2.ADAPTER_CHANGE_KIND_DELETED
CONNECTED_AFTER_S = 0.5     # a stream open this long without failing counts as connected
UNIMPLEMENTED_RETRY_S = 30.0


class ChangeWatch:
    def __init__(self, address: str, on_change: Callable, on_reconnect: Callable | None = None,
                 prefix: str = "", max_backoff_s: float = 5.0, security: ClientSecurity | None = None):
        self.address = address
        self.security = security
        self.on_change = on_change
        self.on_reconnect = on_reconnect
        self.prefix = prefix
        self.max_backoff_s = max_backoff_s
        self.changes = 0                 # changes received since start
        self._opened_at: float | None = None
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def connected(self) -> bool:
        return self._opened_at is not None and time.monotonic() - self._opened_at >= CONNECTED_AFTER_S

    def start(self) -> None:
        if self.address and self._task is None:
            self._channel = aio_channel(self.address, self.security)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _call(self, fn, *args) -> None:
        result = fn(*args)
        if inspect.isawaitable(result):
            await result

    async def _run(self) -> None:
        stub = registry_pb2_grpc.AdapterRegistryStub(self._channel)
        backoff, warned, broke = 0.1, set(), False
        while True:
            try:
                call = stub.WatchAdapters(registry_pb2.WatchAdaptersRequest(adapter_id_prefix=self.prefix))
                self._opened_at = time.monotonic()
                if broke and self.on_reconnect is not None:
                    await self._call(self.on_reconnect)
                async for change in call:
                    self.changes += 1
                    backoff = 0.1
                    try:
                        await self._call(self.on_change, change)
                    except Exception:   # one bad change must not stop the feed
                        log.exception("adapter_change_failed", adapter_id=change.adapter_id)
                code, details = grpc.StatusCode.OK, "stream ended"
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
            self._opened_at, broke = None, True
            if code == grpc.StatusCode.UNIMPLEMENTED:
                if code not in warned:
                    log.warning("change_feed_unavailable", registry=self.address,
                                reason="the registry has no WatchAdapters; retrying every "
                                       f"{UNIMPLEMENTED_RETRY_S:.0f} s")
                    warned.add(code)
                await asyncio.sleep(UNIMPLEMENTED_RETRY_S)
                continue
            if code not in warned:
                log.warning("change_feed_broken", registry=self.address, code=code.name, details=details)
                warned.add(code)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._channel is not None:
            await self._channel.close()


def start_executor_watch(registry: str, engine, security: ClientSecurity | None = None,
                         max_backoff_s: float = 5.0) -> ChangeWatch | None:
    """Subscribe the executor's engine to the registry's changes (None without a registry)."""
    if not registry:
        return None

    async def on_change(change) -> None:
        deleted = change.kind == DELETED
        log.info("adapter_changed", adapter_id=change.adapter_id, version=change.version,
                 latest_version=change.latest_version, deleted=deleted)
        await asyncio.to_thread(engine.adapter_changed, change.adapter_id, change.version,
                                change.latest_version, deleted)

    watch = ChangeWatch(registry, on_change, max_backoff_s=max_backoff_s, security=security)
    watch.start()
    return watch
