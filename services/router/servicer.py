"""The Router service: pick an executor (placement.rank), forward, fail over on UNAVAILABLE.

A unary call fails over to the next executor when one is unreachable; a stream fails over only
before its first chunk reached the client (after that, a retry would repeat tokens). Streams pass
through chunk by chunk, over the executor's GenerateStreams call (common/streams.py: one call per executor,
its answers batched per engine step; --no-multiplex-streams: a GenerateStream call per request).
The executor that serves a request is recorded as holding its prompt's prefix
(placement.PrefixIndex), and counted (pool.begin/end) with its adapter noted as held there, so the
next decision already sees this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import grpc
import structlog

from services.common import auth, errors
from services.common.gen.openlora.v1 import router_pb2, router_pb2_grpc
from services.common.streams import StreamsHub
from services.router.discovery import ExecutorPool
from services.router.limits import RETRY_AFTER_KEY, RateLimited, TenantLimits
from services.router.metrics import RouterMetrics
from services.router.placement import PrefixIndex, prefix_chunks, rank, tie_key
from services.router.registry_check import AdapterCheck

log = structlog.get_logger(__name__)
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class RequestContext:
    """The parts of a grpc.aio context the servicer reads (the deadline, trailing metadata), for a
    request that is not a call of its own: the in-process HTTP API's, or one of GenerateStreams'."""

    def __init__(self, timeout: float | None = None):
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def set_trailing_metadata(self, metadata) -> None:
        pass


def _timeout(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.001)


def _reraise(exc: grpc.aio.AioRpcError) -> None:
    """Pass an executor's status through unchanged (its message already says what to do)."""
    raise errors.Upstream(exc.code(), exc.details()) from None


def _code(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code.name
    if callable(code):
        return code().name
    return "ERROR"


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: ExecutorPool, adapters: AdapterCheck | None = None,
                 prefixes: PrefixIndex | None = None, prefix_affinity: bool = True,
                 metrics: RouterMetrics | None = None, limits: TenantLimits | None = None,
                 multiplex_streams: bool = True):
        self.pool = pool
        self.multiplex_streams = multiplex_streams
        self.streams = StreamsHub(f"/{auth.ROUTER}/GenerateStream")   # GenerateStreams calls (a gateway's)
        self.drain = self.streams.drain   # on SIGTERM: those calls end when their requests have
        self.limits = limits or TenantLimits()
        self.adapters = adapters or AdapterCheck("")
        self.prefixes = prefixes or PrefixIndex()
        self.prefix_affinity = prefix_affinity
        self.metrics = metrics or RouterMetrics()
        self.adapter_inflight: dict[str, int] = {}

    async def _candidates(self, request) -> tuple[list[str], list[bytes]]:
        # another tenant's adapter: only if the registry shows it to this caller (public)
        await self.adapters.check(request.adapter_id, request.adapter_version,
                                  strict=not auth.owns_checked(request.adapter_id))
        # without prefix affinity there are no chunks: no holder, and ties break on the adapter id
        chunks = (prefix_chunks(request.adapter_id, request.prompt, request.prompt_token_ids)
                  if self.prefix_affinity else [])
        holder, _ = self.prefixes.lookup(chunks)
        snapshot = self.pool.snapshot()
        order = rank(snapshot, request.adapter_id, holder, tie_key(request.adapter_id, chunks),
                     self.adapter_inflight.get(request.adapter_id, 0))
        if not order:
            raise errors.Unavailable("no executors known yet: check the router's --executor targets")
        if request.adapter_id:
            held = next((v for v in snapshot if v.address == order[0]), None)
            (self.metrics.hit if held and request.adapter_id in held.adapters else self.metrics.miss).inc()
        return order, chunks

    def _begin(self, address: str, adapter_id: str) -> None:
        self.pool.begin(address, adapter_id)
        if adapter_id:
            self.adapter_inflight[adapter_id] = self.adapter_inflight.get(adapter_id, 0) + 1

    def _end(self, address: str, adapter_id: str) -> None:
        self.pool.end(address)
        if adapter_id:
            n = self.adapter_inflight.get(adapter_id, 1) - 1
            if n > 0:
                self.adapter_inflight[adapter_id] = n
            else:
                self.adapter_inflight.pop(adapter_id, None)

    def _failed_over(self, address: str, exc: grpc.aio.AioRpcError) -> None:
        log.warning("executor_failover", address=address, error=exc.details())
        self.metrics.failovers.inc()
        self.pool.recheck(address)
        self.prefixes.forget(address)   # if it restarts, its cache starts empty

    @contextlib.contextmanager
    def _admitted(self, request, context):
        """The adapter id is well formed and the caller within its tenant's limits (whether it may
        use the adapter, its own or a public one, is _candidates' registry check, then the
        executor's)."""
        auth.owns_checked(request.adapter_id)
        ident = auth.current()
        if not self.limits.enabled or not (ident.role == "tenant" or ident is auth.OPEN):
            yield
            return
        try:
            self.limits.acquire(ident.tenant)
        except RateLimited as exc:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(math.ceil(exc.retry_after_s * 1e3))),))
            raise
        try:
            yield
        finally:
            self.limits.release(ident.tenant)

    async def Generate(self, request, context):
        t0, failure = time.perf_counter(), None
        try:
            with self._admitted(request, context):
                return await self._generate(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.metrics.finished("Generate", _code(failure), time.perf_counter() - t0)

    async def _generate(self, request, context):
        last = None
        order, chunks = await self._candidates(request)
        for address in order:
            e = self.pool.executors.get(address)
            if e is None:   # it left since the ranking
                continue
            self._begin(address, request.adapter_id)
            try:
                response = await e.stub.Generate(request, timeout=_timeout(context),
                                                 metadata=auth.caller_metadata())
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    _reraise(exc)
                self._failed_over(address, exc)
                last = exc
                continue
            finally:
                self._end(address, request.adapter_id)
            self.prefixes.record(chunks, address)
            return response
        raise errors.Unavailable(f"no executor could serve the request: "
                                 f"{last.details() if last else 'every executor left'}")

    async def GenerateStream(self, request, context):
        t0, failure = time.perf_counter(), None
        try:
            with self._admitted(request, context):
                async for chunk in self._generate_stream(request, context, t0):
                    yield chunk
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.metrics.finished("GenerateStream", _code(failure), time.perf_counter() - t0)

    async def _generate_stream(self, request, context, t0: float):
        last = None
        order, chunks = await self._candidates(request)
        for address in order:
            e = self.pool.executors.get(address)
            if e is None:
                continue
            started = False
            self._begin(address, request.adapter_id)
            try:
                # closed at `yield` (the caller went away): aclosing cancels the executor's request too
                # over the executor's GenerateStreams call, or a GenerateStream call of its own where
                # multiplexing is off or that executor refuses it (common/streams.py)
                async with contextlib.aclosing(e.streams.generate_stream(
                        request, _timeout(context), auth.caller_metadata(),
                        self.multiplex_streams)) as executor_chunks:
                    async for chunk in executor_chunks:
                        if not started:   # the prompt is in its KV cache from here on
                            started = True
                            self.prefixes.record(chunks, address)
                            self.metrics.ttft.observe(time.perf_counter() - t0)
                        yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if started or exc.code() not in _RETRYABLE:
                    _reraise(exc)
                self._failed_over(address, exc)
                last = exc
            finally:
                self._end(address, request.adapter_id)
        raise errors.Unavailable(f"no executor could serve the request: "
                                 f"{last.details() if last else 'every executor left'}")

    async def GenerateStreams(self, request_iterator, context):
        """Many GenerateStream requests over one call (a gateway's), answered batched
        (services.common.streams); each its own request here: placement, failover, limits."""
        async for response in self.streams.serve(
                request_iterator, lambda request: self.GenerateStream(request, RequestContext())):
            yield response

    async def ListExecutors(self, request, context):
        await self.pool.poll_once()
        status = self.pool.status
        return router_pb2.ListExecutorsResponse(executors=[
            router_pb2.ExecutorInfo(address=v.address, healthy=v.healthy,
                                    status=_visible(status.get(v.address)))
            for v in self.pool.snapshot()])


def _visible(status):
    """A tenant sees its own adapters' residency only."""
    ident = auth.current()
    if status is None or ident.sees_all:
        return status
    out = type(status)()
    out.CopyFrom(status)
    del out.adapters[:]
    out.adapters.extend(a for a in status.adapters if ident.owns(a.adapter_id))
    return out
