"""Unknown adapters fail fast at the router: NOT_FOUND from the registry, before any executor.

Positive answers are cached for `ttl_s`; when the registry cannot be reached the request goes on
(executors may still hold a copy and serve it, as the contract allows).
"""

from __future__ import annotations

import time

import grpc
import structlog

from services.common import auth, errors
from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
from services.common.tls import ClientSecurity, aio_channel

log = structlog.get_logger(__name__)


class AdapterCheck:
    def __init__(self, address: str, ttl_s: float = 5.0, timeout_s: float = 2.0,
                 security: ClientSecurity | None = None):
        self.address = address
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._channel = aio_channel(address, security) if address else None
        self._stub = registry_pb2_grpc.AdapterRegistryStub(self._channel) if self._channel else None
        self._known: dict[tuple[str, int], float] = {}   # (id, version) -> when it was seen

    async def check(self, adapter_id: str, version: int) -> None:
        """Raise AdapterNotFound / InvalidArgument for adapters the registry says are bad."""
        if self._stub is None or not adapter_id:
            return
        key = (adapter_id, version, auth.current())   # asked with the caller's own token
        if time.monotonic() - self._known.get(key, -self.ttl_s) < self.ttl_s:
            return
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
            log.warning("registry_check_skipped", registry=self.address, error=exc.code().name)
            return
        self._known[key] = time.monotonic()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
