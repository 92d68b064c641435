"""The Router service: pick an executor (placement.rank), forward, fail over on UNAVAILABLE.

A unary call fails over to the next executor when one is unreachable; a stream fails over only
before its first chunk reached the client (after that, a retry would repeat tokens).
"""

from __future__ import annotations

import grpc
import structlog

from services.common import errors
from services.common.gen.openlora.v1 import router_pb2, router_pb2_grpc
from services.router.discovery import ExecutorPool
from services.router.placement import rank
from services.router.registry_check import AdapterCheck

log = structlog.get_logger(__name__)
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def _timeout(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.001)


def _reraise(exc: grpc.aio.AioRpcError) -> None:
    """Pass an executor's status through unchanged (its message already says what to do)."""
    raise errors.Upstream(exc.code(), exc.details()) from None


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: ExecutorPool, adapters: AdapterCheck | None = None):
        self.pool = pool
        self.adapters = adapters or AdapterCheck("")

    async def _candidates(self, request) -> list[str]:
        await self.adapters.check(request.adapter_id, request.adapter_version)
        order = rank(self.pool.snapshot(), request.adapter_id)
        if not order:
            raise errors.Unavailable("no executors configured")
        return order

    async def Generate(self, request, context):
        last = None
        for address in await self._candidates(request):
            try:
                return await self.pool.stubs[address].Generate(request, timeout=_timeout(context))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    _reraise(exc)
                log.warning("executor_failover", address=address, error=exc.details())
                self.pool.recheck(address)
                last = exc
        raise errors.Unavailable(f"no executor could serve the request: {last.details()}")

    async def GenerateStream(self, request, context):
        last = None
        for address in await self._candidates(request):
            started = False
            try:
                call = self.pool.stubs[address].GenerateStream(request, timeout=_timeout(context))
                async for chunk in call:
                    started = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if started or exc.code() not in _RETRYABLE:
                    _reraise(exc)
                log.warning("executor_failover", address=address, error=exc.details())
                self.pool.recheck(address)
                last = exc
        raise errors.Unavailable(f"no executor could serve the request: {last.details()}")

    async def ListExecutors(self, request, context):
        await self.pool.poll_once()
        return router_pb2.ListExecutorsResponse(executors=[
            router_pb2.ExecutorInfo(address=v.address, healthy=v.healthy,
                                    status=self.pool.status.get(v.address))
            for v in self.pool.snapshot()])
