"""Many streamed requests over one GenerateStreams call (Executor's, for a router; Router's, for a
gateway), answered once per engine step with every open request's chunks instead of one gRPC message
per request per token.

Client (one per upstream server; the router keeps one per executor, the gateway one per router):

    streams = StreamsClient(stub)                   # stub: an ExecutorStub or a RouterStub
    async for chunk in streams.stream(request, timeout_s, authorization):
        ...                                         # as stub.GenerateStream(request) would yield
    call = StreamCall(streams.stream(...))          # the same, read as a grpc.aio call: read() / cancel()
    await streams.close()

Server (the servicer's GenerateStreams):

    async for response in hub.serve(request_iterator, run):   # run(request, authorization): chunks
        yield response
    await hub.drain()                               # stopping: refuse new requests, end when done

Per request the same behaviour as its own GenerateStream call: chunks in order, its error as a
grpc.aio.AioRpcError with the server's code and message (so failover and status pass-through need no
change), its caller's token checked as its own call's would be (auth.act_as), cancelled when its
reader leaves early; past timeout_s, DEADLINE_EXCEEDED (enforced here, by cancelling it upstream).

The call opens on first use and again after it ends; when it breaks (the server died, or drained
and closed it), every request on it ends with UNAVAILABLE, which a router fails over where no chunk
has reached the client yet. A server that refuses the call (an older version without it, or a
caller without a service or admin token of its own) makes stream() raise StreamsRefused before any
chunk: the caller uses GenerateStream for that server, and tries the shared call again a minute later.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from services.common import auth, errors
from services.common.gen.openlora.v1 import common_pb2

log = structlog.get_logger(__name__)


def rpc_error(code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)


_CODES = {c.value[0]: c for c in grpc.StatusCode}
# The call itself refused (a server without GenerateStreams, or a caller without a service or admin
# token of its own): requests go one call each to that server for RETRY_REFUSED_S.
_REFUSALS = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


RETRY_REFUSED_S = 60.0


class StreamsRefused(Exception):
    """This server does not take GenerateStreams from this caller; use GenerateStream."""


_REFUSED = object()
_DEADLINE = object()


class _Call:
    """One open GenerateStreams call: its outgoing queue and its requests' inboxes."""

    def __init__(self, stub, owner: StreamsClient):
        self.owner = owner
        self.outgoing: asyncio.Queue = asyncio.Queue()
        self.inboxes: dict[int, asyncio.Queue] = {}
        self.open = True
        self.call = stub.GenerateStreams(self._requests(), metadata=owner.call_metadata or None)
        self.reader = asyncio.create_task(self._read())

    async def _requests(self):
        while True:
            msg = await self.outgoing.get()
            if msg is None:
                return
            yield msg

    async def _read(self) -> None:
        failure = rpc_error(grpc.StatusCode.UNAVAILABLE, "the server closed its GenerateStreams call "
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
            # a refusal can also surface as INTERNAL ("Internal error from Core": grpc.aio's request
            # writer meeting the closed call), so any failure before the first answer falls back
            if not answered and exc.code() in (*_REFUSALS, grpc.StatusCode.INTERNAL):
                log.info("generate_streams_refused", code=exc.code().name, error=exc.details())
                self.owner.refused_at = time.monotonic()
                failure = _REFUSED
        except asyncio.CancelledError:
            failure = rpc_error(grpc.StatusCode.UNAVAILABLE, "this client closed its GenerateStreams call")
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


class StreamsClient:
    """The streamed requests to one server, over one GenerateStreams call.

    call_metadata: the call's own (a service or admin token, where the channel does not add one);
    default_authorization: a request's token when its caller has none (a router's own, as its
    channel sends on a GenerateStream call of its own; "" for none)."""

    def __init__(self, stub, call_metadata=(), default_authorization: str = ""):
        self.stub = stub
        self.call_metadata = tuple(call_metadata)
        self.default_authorization = default_authorization
        self.refused_at: float | None = None   # when the server last refused the call
        self._call: _Call | None = None
        self._ids = itertools.count(1)

    @property
    def usable(self) -> bool:
        """False for RETRY_REFUSED_S after the server refused the call (then try again: it may
        have been upgraded, or its auth file changed)."""
        return self.refused_at is None or time.monotonic() - self.refused_at > RETRY_REFUSED_S

    def _current(self) -> _Call:
        if self._call is None or not self._call.open:
            self._call = _Call(self.stub, self)
        return self._call

    async def stream(self, request, timeout_s: float | None = None,
                     authorization: str = "") -> AsyncIterator:
        """request's GenerateChunks; AioRpcError(code, message) on its error; StreamsRefused, before
        any chunk, when the server does not take the call from this caller."""
        call = self._current()
        sid = next(self._ids)
        inbox: asyncio.Queue = asyncio.Queue()
        call.inboxes[sid] = inbox
        call.outgoing.put_nowait(common_pb2.GenerateStreamsRequest(
            stream_id=sid, open=request, authorization=authorization))
        # past the deadline a marker joins the inbox (a timer, not asyncio.wait_for per event: on
        # Python 3.11 wait_for can swallow a cancellation that races a ready item, and then a
        # client that left would leave its request running)
        timer = None if timeout_s is None else asyncio.get_running_loop().call_later(
            timeout_s, inbox.put_nowait, _DEADLINE)
        ended = False
        try:
            while True:
                ev = await inbox.get()
                if ev is _DEADLINE:
                    raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
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
            if timer is not None:
                timer.cancel()
            if not ended and call.open:      # the client went away, or the deadline passed
                call.outgoing.put_nowait(common_pb2.GenerateStreamsRequest(stream_id=sid, cancel=True))

    async def generate_stream(self, request, timeout_s: float | None = None, metadata=(),
                              multiplex: bool = True):
        """request's chunks as stub.GenerateStream(request, timeout, metadata) gives them: over the
        shared call where multiplex and the server takes it, else one GenerateStream call."""
        if multiplex and self.usable:
            authorization = next((v for k, v in metadata if k == "authorization"),
                                 self.default_authorization)
            try:
                async with contextlib.aclosing(self.stream(request, timeout_s, authorization)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except StreamsRefused:   # before any chunk: this request goes the other way
                pass
        call = self.stub.GenerateStream(request, timeout=timeout_s, metadata=metadata)
        try:
            async for chunk in call:
                yield chunk
        finally:
            if not call.done():
                call.cancel()

    async def close(self) -> None:
        if self._call is not None:
            await self._call.close()
            self._call = None


class StreamCall:
    """A stream() generator read as a grpc.aio server-streaming call is: read() -> chunk or
    grpc.aio.EOF, cancel(), done() (what the gateway's generation code reads)."""

    def __init__(self, agen):
        self._agen = agen
        self._done = False

    async def read(self):
        if self._done:
            return grpc.aio.EOF
        try:
            return await self._agen.__anext__()
        except StopAsyncIteration:
            self._done = True
            return grpc.aio.EOF
        except BaseException as exc:
            self._done = True
            mapped = self._failure(exc)
            if mapped is exc:
                raise
            raise mapped from None

    def _failure(self, exc: BaseException) -> BaseException:
        """What read() raises for exc (itself here; a subclass may map it to a grpc error)."""
        return exc

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """Stop the request upstream (its generator's close sends the cancel)."""
        if self._done:
            return False
        self._done = True
        asyncio.ensure_future(_close(self._agen))
        return True


async def _close(agen) -> None:
    with contextlib.suppress(RuntimeError):   # a read is running right now: its own task unwinds it
        await agen.aclose()


# -- server side ------------------------------------------------------------------------------------

# A GenerateStreams message carries at most this many bytes of events (more go in the next one), so
# a batch of large chunks (prompt logprobs) never exceeds a client's default 4 MiB receive limit
# where each chunk alone would not.
STREAMS_MESSAGE_BYTES = 1 << 20


def batches(events, limit: int):
    """events (None skipped) in order, cut into lists of at most `limit` bytes (an event larger
    than that goes alone)."""
    batch, size = [], 0
    for ev in events:
        if ev is None:
            continue
        n = ev.ByteSize()
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append(ev)
        size += n
    if batch:
        yield batch


class StreamsHub:
    """A server's GenerateStreams calls: serve() runs one, drain() stops them taking requests.

    method: the per-request RPC each request is checked as (e.g. "/openlora.v1.Executor/GenerateStream").
    """

    def __init__(self, method: str):
        self.method = method
        self.draining = False
        self._outboxes: set[asyncio.Queue] = set()

    async def drain(self) -> None:
        """The server is stopping: its GenerateStreams calls refuse new requests (UNAVAILABLE, so a
        router fails over) and end once their open requests have, instead of holding the stop for
        its whole grace period."""
        self.draining = True
        for outbox in self._outboxes:
            outbox.put_nowait(None)

    async def serve(self, request_iterator, run):
        """One GenerateStreams call: run(request, authorization) is the request's chunks (an async
        iterator), run as the request's own caller; whatever the engine's step delivered by the
        time this loop runs goes out as one message."""
        outbox: asyncio.Queue = asyncio.Queue()     # StreamEvent, or None: look again
        tasks: dict[int, asyncio.Task] = {}
        reading = True

        def end(sid: int, exc: BaseException | None) -> common_pb2.StreamEvent:
            if exc is None:
                return common_pb2.StreamEvent(stream_id=sid, end=True)
            code, message = errors.status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("rpc_failed", method=self.method, error=repr(exc))
            else:
                log.info("rpc_error", method=self.method, code=code.name, error=message)
            return common_pb2.StreamEvent(stream_id=sid, end=True, code=code.value[0], message=message)

        async def one(sid: int, request, authorization: str) -> None:
            try:
                auth.act_as(authorization, self.method)   # never the call's own caller's rights
                async for chunk in run(request):
                    outbox.put_nowait(common_pb2.StreamEvent(stream_id=sid, chunk=chunk))
                outbox.put_nowait(end(sid, None))
            except asyncio.CancelledError:       # cancelled by the caller, or the call ended
                pass
            except Exception as exc:             # this request's error ends this request only
                outbox.put_nowait(end(sid, exc))

        def finished(sid: int, task: asyncio.Task) -> None:   # also for a task cancelled unstarted
            if tasks.get(sid) is task:
                del tasks[sid]
            outbox.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            try:
                async for msg in request_iterator:
                    op = msg.WhichOneof("op")
                    if op == "open":
                        if msg.stream_id in tasks:
                            outbox.put_nowait(end(msg.stream_id, errors.InvalidArgument(
                                f"stream_id {msg.stream_id} is already open on this call")))
                        elif self.draining:
                            outbox.put_nowait(end(msg.stream_id, errors.Unavailable(
                                "this server is shutting down; retry on another")))
                        else:
                            task = tasks[msg.stream_id] = asyncio.create_task(
                                one(msg.stream_id, msg.open, msg.authorization))
                            task.add_done_callback(lambda t, sid=msg.stream_id: finished(sid, t))
                    elif op == "cancel" and msg.stream_id in tasks:
                        tasks[msg.stream_id].cancel()
            finally:
                reading = False
                outbox.put_nowait(None)

        self._outboxes.add(outbox)
        reader = asyncio.create_task(read())
        try:
            while reading or tasks or not outbox.empty():
                if self.draining and not tasks and outbox.empty():
                    return
                first = await outbox.get()
                await asyncio.sleep(0)               # let this step's other events land first
                ready = [first, *(outbox.get_nowait() for _ in range(outbox.qsize()))]
                for batch in batches(ready, STREAMS_MESSAGE_BYTES):
                    yield common_pb2.GenerateStreamsResponse(events=batch)
        finally:
            self._outboxes.discard(outbox)
            reader.cancel()
            for t in list(tasks.values()):
                t.cancel()
