"""Which executors exist, and a fresh view of each: discovery, health stream, status, own load.

Targets are fixed addresses (HOST:PORT) or `dns:///NAME:PORT`, re-resolved every `resolve_interval_s`
(a Kubernetes headless Service lists one A record per ready pod), so executors join and leave
without a restart. Per executor:

- health: a `grpc.health.v1.Health/Watch` stream, so a draining executor (NOT_SERVING) gets no new
  request from the moment it says so; a broken stream marks it unhealthy until it reconnects;
- status: `GetStatus` every `poll_interval_s` (load, adapters per tier);
- what this router did since: requests in flight there (`begin`/`end`), and adapters it sent there
  (they will be loaded), so the view is never older than this router's own last decision.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.gen.openlora.v1 import executor_pb2, executor_pb2_grpc
from services.common.streams import StreamsClient
from services.common.tls import ClientSecurity, aio_channel
from services.router.placement import ExecutorView

log = structlog.get_logger(__name__)
EXECUTOR_SERVICE = "openlora.v1.Executor"
DNS = "dns:///"
# Resolve(host, port) -> ["HOST:PORT", ...]; injectable so tests can play DNS.
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def resolve_dns(host: str, port: int) -> list[str]:
    """HOST:PORT for every address NAME resolves to (IPv6 in brackets), in a stable order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = set()
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        out.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(out)


def parse_target(target: str) -> tuple[str, int] | None:
    """(name, port) for a dns:///NAME:PORT target; None for a fixed address; ValueError if bad."""
    if not target.startswith(DNS):
        return None
    name, sep, port = target[len(DNS):].rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{target!r}: expected dns:///NAME:PORT")
    return name, int(port)


class _Executor:
    """One executor's channel, tasks and latest state."""

    def __init__(self, address: str, security: ClientSecurity | None = None):
        self.address = address
        self.channel = aio_channel(address, security)
        self.stub = executor_pb2_grpc.ExecutorStub(self.channel)
        own = dict((security or ClientSecurity()).metadata()).get("authorization", "")
        self.streams = StreamsClient(self.stub, default_authorization=own)   # one call (common/streams.py)
        self.view = ExecutorView(address, healthy=False)
        self.status: executor_pb2.ExecutorStatus | None = None
        self.serving = False          # from the health stream (or a Check until it first answers)
        self.streamed = False         # the health stream has answered since it (re)opened
        self.reachable = True         # the last GetStatus answered
        self.loaded_tier = 2          # where a sent adapter will be: DEVICE (1) with slots, else HOST (2)
        self.sent: dict[str, float] = {}     # adapter_id -> when this router last sent it here
        self.watch: asyncio.Task | None = None

    def refresh(self) -> None:
        v = self.view
        self.view = replace(v, healthy=self.serving and self.reachable)


class ExecutorPool:
    """The executors currently known, and the latest view of each."""

    def __init__(self, targets: list[str], poll_interval_s: float = 0.25, timeout_s: float = 2.0,
                 resolve_interval_s: float = 5.0, resolve: Resolve = resolve_dns,
                 on_poll: Callable[[list[ExecutorView]], Awaitable[None]] | None = None,
                 security: ClientSecurity | None = None, sent_ttl_s: float = 2.0):
        self.security = security
        self.sent_ttl_s = sent_ttl_s   # an adapter sent to an executor counts as held there this long
        self.targets = list(dict.fromkeys(targets))
        self.names = [n for n in map(parse_target, self.targets) if n is not None]
        self.fixed = [t for t in self.targets if parse_target(t) is None]
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.resolve_interval_s = resolve_interval_s
        self.resolve = resolve
        self.on_poll = on_poll
        self.executors: dict[str, _Executor] = {}
        self._retired: list[tuple[float, _Executor]] = []
        self._tasks: list[asyncio.Task] = []
        self._snapshot: list[ExecutorView] | None = None
        for address in self.fixed:
            self._add(address)

    # -- what placement reads ----------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        return list(self.executors)

    @property
    def stubs(self) -> dict[str, executor_pb2_grpc.ExecutorStub]:
        return {a: e.stub for a, e in self.executors.items()}

    @property
    def status(self) -> dict[str, executor_pb2.ExecutorStatus]:
        return {a: e.status for a, e in self.executors.items() if e.status is not None}

    def stub(self, address: str) -> executor_pb2_grpc.ExecutorStub:
        return self.executors[address].stub

    def snapshot(self) -> list[ExecutorView]:
        """The views now (a list rebuilt only when something changed)."""
        if self._snapshot is None:
            self._snapshot = [e.view for e in self.executors.values()]
        return self._snapshot

    # -- this router's own decisions ----------------------------------------------------------------
    def begin(self, address: str, adapter_id: str) -> None:
        """A request goes to address now: count it, and note its adapter as held there."""
        e = self.executors.get(address)
        if e is None:
            return
        adapters = e.view.adapters
        if adapter_id:
            e.sent[adapter_id] = time.monotonic()
            if adapters.get(adapter_id, 9) > e.loaded_tier:
                adapters[adapter_id] = e.loaded_tier   # the view's own dict, replaced at each status
        e.view = replace(e.view, inflight=e.view.inflight + 1)
        self._snapshot = None

    def end(self, address: str) -> None:
        e = self.executors.get(address)
        if e is not None:
            e.view = replace(e.view, inflight=max(e.view.inflight - 1, 0))
            self._snapshot = None

    def mark_unhealthy(self, address: str) -> None:
        """A call failed with UNAVAILABLE: stop preferring it until its status answers again."""
        e = self.executors.get(address)
        if e is not None:
            e.reachable = False
            e.refresh()
            self._snapshot = None

    def recheck(self, address: str) -> None:
        """A call to `address` failed with UNAVAILABLE: poll it now rather than at the next tick."""
        self.mark_unhealthy(address)
        if address in self.executors:
            asyncio.get_running_loop().create_task(self._poll(self.executors[address]))

    def forget_adapter(self, adapter_id: str) -> None:
        """The registry deleted adapter_id: no executor holds it any more."""
        for e in self.executors.values():
            e.sent.pop(adapter_id, None)
            e.view.adapters.pop(adapter_id, None)

    # -- membership ---------------------------------------------------------------------------------
    def _add(self, address: str) -> _Executor:
        e = self.executors[address] = _Executor(address, self.security)
        self._snapshot = None
        return e

    def _start_watch(self, e: _Executor) -> None:
        if e.watch is None:
            e.watch = asyncio.get_running_loop().create_task(self._watch_health(e))

    def _remove(self, address: str) -> None:
        e = self.executors.pop(address)
        self._snapshot = None
        if e.watch is not None:
            e.watch.cancel()
        self._retired.append((time.monotonic(), e))   # its in-flight calls finish on its channel
        log.info("executor_left", address=address)

    async def discover_once(self) -> None:
        """Re-resolve every dns:/// target; add new addresses, drop vanished ones."""
        if not self.names:
            return
        found: set[str] = set(self.fixed)
        for name, port in self.names:
            try:
                found.update(await self.resolve(name, port))
            except (OSError, ValueError) as exc:   # keep what we had: DNS blips are not departures
                log.warning("executor_resolve_failed", name=name, error=str(exc))
                found.update(a for a in self.executors)
        for address in sorted(found - set(self.executors)):
            e = self._add(address)
            log.info("executor_joined", address=address)
            self._start_watch(e)
            await self._poll(e)
        for address in set(self.executors) - found:
            self._remove(address)
        now = time.monotonic()
        for when, e in [r for r in self._retired if now - r[0] > 60]:
            self._retired.remove((when, e))
            await e.streams.close()
            await e.channel.close()

    # -- health stream and status polling -----------------------------------------------------------
    async def _watch_health(self, e: _Executor) -> None:
        backoff = 0.1
        while True:
            try:
                call = health_pb2_grpc.HealthStub(e.channel).Watch(
                    health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE))
                async for msg in call:
                    e.streamed = True
                    serving = msg.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != e.serving:
                        log.info("executor_health", address=e.address, serving=serving)
                        if serving:
                            e.reachable = True
                    e.serving = serving
                    e.refresh()
                    self._snapshot = None
                    if not serving:   # draining or loading: hang up, or this stream holds its drain open
                        call.cancel()
                        break
                    backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                log.debug("health_stream_error", address=e.address, code=exc.code().name,
                          details=exc.details())
            if e.serving:
                log.warning("executor_unhealthy", address=e.address, reason="health stream ended")
            e.serving = e.streamed = False
            e.refresh()
            self._snapshot = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _poll(self, e: _Executor) -> None:
        try:
            if not e.streamed:   # no word from the health stream yet: ask once
                health = await health_pb2_grpc.HealthStub(e.channel).Check(
                    health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE), timeout=self.timeout_s)
                e.serving = health.status == health_pb2.HealthCheckResponse.SERVING
            st = await e.stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if e.view.healthy:
                log.warning("executor_unhealthy", address=e.address, error=exc.code().name)
            e.reachable = False
            e.refresh()
            self._snapshot = None
            return
        e.status = st
        e.reachable = True
        e.loaded_tier = 1 if st.device_adapter_slots > 0 else 2
        adapters: dict[str, int] = {}
        for a in st.adapters:   # keep the best (lowest non-zero) tier per adapter id
            if a.tier:
                adapters[a.adapter_id] = min(adapters.get(a.adapter_id, a.tier), a.tier)
        now = time.monotonic()
        for adapter_id, when in list(e.sent.items()):   # sent since: being loaded, not yet reported
            if now - when > self.sent_ttl_s:
                del e.sent[adapter_id]
            elif adapters.get(adapter_id, 9) > e.loaded_tier:
                adapters[adapter_id] = e.loaded_tier
        e.view = ExecutorView(e.address, e.serving, st.running_requests, st.waiting_requests,
                              max(st.max_batch_size, 1), adapters, e.view.inflight)
        self._snapshot = None

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(e) for e in list(self.executors.values())))
        if self.on_poll is not None:
            await self.on_poll(self.snapshot())

    async def start(self) -> None:
        for e in self.executors.values():
            self._start_watch(e)
        await self.discover_once()
        await asyncio.sleep(0)   # let the health streams deliver their first answer
        await self.poll_once()
        await self._wait_first_health(1.0)
        self._tasks = [asyncio.create_task(self._loop(self.poll_interval_s, self.poll_once, "poll_failed"))]
        if self.names:
            self._tasks.append(asyncio.create_task(
                self._loop(self.resolve_interval_s, self.discover_once, "discovery_failed")))

    async def _wait_first_health(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not any(e.serving for e in self.executors.values()):
            await asyncio.sleep(0.02)
        if self.on_poll is not None:
            await self.on_poll(self.snapshot())

    async def _loop(self, interval: float, step, what: str) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except Exception:  # never let the poller die
                log.exception(what)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for e in [*self.executors.values(), *(e for _, e in self._retired)]:
            if e.watch is not None:
                e.watch.cancel()
            await e.streams.close()
            await e.channel.close()
