"""Keeps a fresh snapshot of every executor: health and GetStatus, polled on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.gen.openlora.v1 import executor_pb2, executor_pb2_grpc
from services.common.tls import ClientSecurity, aio_channel
from services.router.placement import ExecutorView

log = structlog.get_logger(__name__)
EXECUTOR_SERVICE = "openlora.v1.Executor"


class ExecutorPool:
    """One channel per executor address, and the latest view of each."""

    def __init__(self, addresses: list[str], poll_interval_s: float = 0.5, timeout_s: float = 2.0,
                 on_poll: Callable[[list[ExecutorView]], Awaitable[None]] | None = None,
                 security: ClientSecurity | None = None):
        self.addresses = list(dict.fromkeys(addresses))
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.channels = {a: aio_channel(a, security) for a in self.addresses}
        self.stubs = {a: executor_pb2_grpc.ExecutorStub(c) for a, c in self.channels.items()}
        self.status: dict[str, executor_pb2.ExecutorStatus] = {}
        self.views: dict[str, ExecutorView] = {a: ExecutorView(a, healthy=True) for a in self.addresses}
        self._task: asyncio.Task | None = None
        self.on_poll = on_poll

    def snapshot(self) -> list[ExecutorView]:
        return [self.views[a] for a in self.addresses]

    def mark_unhealthy(self, address: str) -> None:
        """A call failed with UNAVAILABLE: stop preferring it until the next poll says otherwise."""
        v = self.views[address]
        self.views[address] = ExecutorView(address, False, v.running, v.waiting, v.max_batch_size,
                                           v.adapters)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(a) for a in self.addresses))
        if self.on_poll is not None:
            await self.on_poll(self.snapshot())

    def recheck(self, address: str) -> None:
        """A call to `address` failed with UNAVAILABLE: poll it now rather than at the next tick
        (it may be down, or only answering that a dependency of its own is)."""
        asyncio.get_running_loop().create_task(self._poll(address))

    async def _poll(self, address: str) -> None:
        channel = self.channels[address]
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE), timeout=self.timeout_s)
            healthy = health.status == health_pb2.HealthCheckResponse.SERVING
            st = await self.stubs[address].GetStatus(executor_pb2.GetStatusRequest(),
                                                     timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if self.views[address].healthy:
                log.warning("executor_unhealthy", address=address, error=exc.code().name)
            self.mark_unhealthy(address)
            return
        self.status[address] = st
        adapters: dict[str, int] = {}
        for a in st.adapters:   # keep the best (lowest non-zero) tier per adapter id
            adapters[a.adapter_id] = min(adapters.get(a.adapter_id, a.tier), a.tier)
        self.views[address] = ExecutorView(address, healthy, st.running_requests, st.waiting_requests,
                                           max(st.max_batch_size, 1), adapters)

    async def start(self) -> None:
        await self.poll_once()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die
                log.exception("poll_failed")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for c in self.channels.values():
            await c.close()
