"""One GenerateStreams call per executor carrying every streamed request the router sends it.

    streams = ExecutorStreams(stub)                 # one per executor (discovery._Executor)
    async for chunk in streams.stream(request, timeout_s, authorization):
        ...                                         # as stub.GenerateStream(request) would yield
    await streams.close()

Per request the same behaviour as its own GenerateStream call: chunks in order, and its error as a
grpc.aio.AioRpcError with the executor's code and message (so the router's failover and status
pass-through need no change); leaving the loop early cancels the request on the executor; past
timeout_s, DEADLINE_EXCEEDED. What changes is the cost: the executor answers with one message per
engine step for all of the router's requests on it, not one per request per token, so the router's
(and the executor's) CPU per streamed token falls (benchmarks/gateway.py prints both).

The call opens on first use and again after it ends; when it breaks (the executor died, or drained
and closed it), every request on it ends with UNAVAILABLE, which the router fails over where no
chunk has reached the client yet.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from services.common.gen.openlora.v1 import executor_pb2

log = structlog.get_logger(__name__)


def rpc_error(code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)


_CODES = {c.value[0]: c for c in grpc.StatusCode}
# The call itself refused (an executor without GenerateStreams, or a router without a service or
# admin token of its own): requests go one call each to that executor from then on.
_REFUSALS = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


RETRY_REFUSED_S = 60.0


class StreamsRefused(Exception):
    """This executor does not take GenerateStreams from this router; use GenerateStream."""


_REFUSED = object()


class _Call:
    """One open GenerateStreams call: its outgoing queue and its requests' inboxes."""

    def __init__(self, stub, owner: ExecutorStreams):
        self.owner = owner
        self.outgoing: asyncio.Queue = asyncio.Queue()
        self.inboxes: dict[int, asyncio.Queue] = {}
        self.open = True
        self.call = stub.GenerateStreams(self._requests())
        self.reader = asyncio.create_task(self._read())

    async def _requests(self):
        while True:
            msg = await self.outgoing.get()
            if msg is None:
                return
            yield msg

    async def _read(self) -> None:
        failure = rpc_error(grpc.StatusCode.UNAVAILABLE, "the executor closed its stream call "
                            "(it is shutting down); retry on another")
        answered = False
        try:
            async for response in self.call:
                answered = True
                for ev in response.events:
                    inbox = self.inboxes.get(ev.stream_id)
                    if inbox is not None:
                        inbox.put_nowait(ev)
        except grpc.aio.AioRpcError as exc:
            failure = rpc_error(exc.code(), exc.details() or exc.code().name)
            if exc.code() in _REFUSALS and not answered:
                log.info("executor_streams_refused", code=exc.code().name, error=exc.details())
                self.owner.refused_at = time.monotonic()
                failure = _REFUSED
        except asyncio.CancelledError:
            failure = rpc_error(grpc.StatusCode.UNAVAILABLE, "the router closed its stream call")
        finally:
            self.open = False
            for inbox in self.inboxes.values():
                inbox.put_nowait(failure)
            self.outgoing.put_nowait(None)

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


class ExecutorStreams:
    """The router's streamed requests to one executor, over one GenerateStreams call."""

    def __init__(self, stub):
        self.stub = stub
        self.refused_at: float | None = None   # when the executor last refused the call
        self._call: _Call | None = None
        self._ids = itertools.count(1)

    @property
    def usable(self) -> bool:
        """False for RETRY_REFUSED_S after the executor refused the call (then try again: it may
        have been upgraded, or its auth file changed)."""
        return self.refused_at is None or time.monotonic() - self.refused_at > RETRY_REFUSED_S

    def _current(self) -> _Call:
        if self._call is None or not self._call.open:
            self._call = _Call(self.stub, self)
        return self._call

    async def stream(self, request, timeout_s: float | None = None,
                     authorization: str = "") -> AsyncIterator:
        """request's GenerateChunks; AioRpcError(code, message) on its error; StreamsRefused, before
        any chunk, when the executor does not take the call from this router."""
        call = self._current()
        sid = next(self._ids)
        inbox: asyncio.Queue = asyncio.Queue()
        call.inboxes[sid] = inbox
        call.outgoing.put_nowait(executor_pb2.GenerateStreamsRequest(
            stream_id=sid, open=request, authorization=authorization))
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        ended = False
        try:
            while True:
                if deadline is None:
                    ev = await inbox.get()
                elif not inbox.empty() and loop.time() < deadline:   # no timer for what is here
                    ev = inbox.get_nowait()
                else:
                    try:
                        ev = await asyncio.wait_for(inbox.get(), max(deadline - loop.time(), 0))
                    except TimeoutError:
                        raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
                if ev is _REFUSED:
                    ended = True
                    raise StreamsRefused()
                if isinstance(ev, grpc.aio.AioRpcError):
                    ended = True
                    raise ev
                if ev.end:
                    ended = True
                    if ev.code:
                        raise rpc_error(_CODES.get(ev.code, grpc.StatusCode.UNKNOWN), ev.message)
                    return
                yield ev.chunk
        finally:
            call.inboxes.pop(sid, None)
            if not ended and call.open:      # the client went away, or the deadline passed
                call.outgoing.put_nowait(executor_pb2.GenerateStreamsRequest(stream_id=sid, cancel=True))

    async def close(self) -> None:
        if self._call is not None:
            await self._call.close()
            self._call = None
