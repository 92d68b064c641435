"""Unknown adapters fail fast at the router: NOT_FOUND from the registry, before any executor.

A confirmed (adapter, version) is remembered, so a known adapter costs no registry round trip: for
`ttl_s` while the registry's change feed is not connected, for `watched_ttl_s` while it is (a
deletion or a new version then arrives within the feed's poll, and drops the entry at once). When
the registry cannot be reached the request goes on (executors may still hold a copy and serve it,
as the contract allows).

`strict` checks (a tenant using another tenant's adapter, which it may only when the registry says
it is public) are remembered for `ttl_s` only, and fail closed: an unreachable registry is
UNAVAILABLE, never a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import structlog

from services.common import auth, errors
from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
from services.common.tls import ClientSecurity, aio_channel
from services.executor.watch import DELETED, ChangeWatch

log = structlog.get_logger(__name__)


class AdapterCheck:
    def __init__(self, address: str, ttl_s: float = 5.0, timeout_s: float = 2.0,
                 watched_ttl_s: float = 300.0, on_deleted: Callable[[str], None] | None = None,
                 security: ClientSecurity | None = None):
        self.address = address
        self.ttl_s = ttl_s
        self.watched_ttl_s = watched_ttl_s
        self.timeout_s = timeout_s
        self.on_deleted = on_deleted
        self._channel = aio_channel(address, security) if address else None
        self._stub = registry_pb2_grpc.AdapterRegistryStub(self._channel) if self._channel else None
        self._known: dict[tuple, float] = {}   # (id, version, caller) -> when it was confirmed
        self.lookups = 0                                  # GetAdapter calls made (for tests/metrics)
        self.watch = ChangeWatch(address, self._changed, on_reconnect=self._known.clear, security=security)

    def start(self) -> None:
        """Subscribe to the change feed (needs a running event loop)."""
        self.watch.start()

    def _changed(self, change) -> None:
        """One registry change: forget what it may have made stale."""
        aid = change.adapter_id
        for key in [k for k in self._known if k[0] == aid]:
            if change.kind == DELETED or key[1] == 0:
                del self._known[key]
        if change.kind == DELETED and change.latest_version == 0 and self.on_deleted is not None:
            self.on_deleted(aid)

    async def check(self, adapter_id: str, version: int, strict: bool = False) -> None:
        """Raise AdapterNotFound / InvalidArgument for adapters the registry says are bad (or, with
        `strict`, does not show this caller)."""
        if self._stub is None or not adapter_id:
            return
        key = (adapter_id, version, auth.current())   # asked with the caller's own token
        seen = self._known.get(key)
        if seen is not None and time.monotonic() - seen < (
                self.watched_ttl_s if self.watch.connected and not strict else self.ttl_s):
            return
        self.lookups += 1
        try:
            await self._stub.GetAdapter(registry_pb2.GetAdapterRequest(
                adapter_id=adapter_id, version=version), timeout=self.timeout_s,
                metadata=auth.caller_metadata())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise errors.AdapterNotFound(exc.details()) from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise errors.InvalidArgument(exc.details()) from None
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise errors.Upstream(exc.code(), f"registry: {exc.details()}") from None
            if strict:
                raise errors.Unavailable(f"cannot ask the registry at {self.address} whether "
                                         f"{adapter_id!r} is public ({exc.code().name}); retry "
                                         "later") from None
            log.warning("registry_check_skipped", registry=self.address, error=exc.code().name)
            return
        self._known[key] = time.monotonic()

    async def close(self) -> None:
        await self.watch.close()
        if self._channel is not None:
            await self._channel.close()
