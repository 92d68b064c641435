"""Executor.GenerateStreams, the router's one call per executor for all its streamed requests:
each request as its own GenerateStream (tokens, errors, cancellation), answers batched per engine
step; the router's fallback for an executor without the call; an idle call never holds a stop."""

from __future__ import annotations

import asyncio
import queue
import time

import grpc
import pytest

from services.common import streams as streams_module
from services.common.gen.openlora.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    router_pb2_grpc,
)
from services.common.streams import StreamsClient, StreamsRefused
from services.router.app import build as build_router
from services.router.config import RouterConfig
from tests.servers import Service

C = grpc.StatusCode


def _req(n: int, prompt=(5, 17, 42, 99), **sampling) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(prompt_token_ids=list(prompt), sampling=common_pb2.SamplingParams(
        max_new_tokens=n, ignore_eos=True, **sampling))


def _code(value: int) -> grpc.StatusCode:
    return next(c for c in C if c.value[0] == value)


@pytest.fixture(scope="module")
def executor(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    e = Service("executor", "--base-model", str(llama_dir), "--disk-cache-dir", str(root / "disk"),
                "--max-batch-size", "16", log_path=root / "executor.log").start()
    yield e
    e.stop()


def test_one_call_carries_many_requests_each_as_its_own_stream(executor):
    """Eight greedy requests and two seeded sampled ones on one call give the tokens their own
    GenerateStream calls give, in fewer messages than events (a step's chunks travel together);
    a bad request ends only itself; a cancelled request stops (no end event, far short of its
    tokens) and leaves nothing running."""
    stub = executor_pb2_grpc.ExecutorStub(grpc.insecure_channel(executor.address))
    reqs = {i: _req(12, prompt=(5, 17, 42, 99 + i)) for i in range(1, 9)}
    reqs[9] = _req(12, temperature=1.0, seed=7)
    reqs[10] = _req(12, temperature=0.8, top_p=0.9, seed=3)
    alone = {i: [t for c in stub.GenerateStream(r, timeout=60) for t in c.token_ids] for i, r in reqs.items()}

    cancel_after = 2
    outbox = [common_pb2.GenerateStreamsRequest(stream_id=i, open=r) for i, r in reqs.items()]
    outbox += [common_pb2.GenerateStreamsRequest(stream_id=20, open=_req(200)),
               common_pb2.GenerateStreamsRequest(stream_id=21, open=common_pb2.GenerateRequest())]
    later = queue.Queue()          # what the test sends once it has seen chunks

    def requests():
        yield from outbox
        while (msg := later.get()) is not None:
            yield msg

    got = {i: [] for i in (*reqs, 20)}
    ends, messages, events, after_cancel = {}, 0, 0, 0
    for response in stub.GenerateStreams(requests(), timeout=120):
        messages += 1
        for ev in response.events:
            events += 1
            if ev.end:
                ends[ev.stream_id] = _code(ev.code) if ev.code else C.OK
                if ev.code:
                    assert ev.message
            elif ev.stream_id in ends:                # sent before the cancel arrived
                after_cancel += len(ev.chunk.token_ids)
            else:
                got[ev.stream_id] += ev.chunk.token_ids
                if ev.stream_id == 20 and len(got[20]) >= cancel_after and 20 not in ends:
                    later.put(common_pb2.GenerateStreamsRequest(stream_id=20, cancel=True))
                    ends[20] = "cancelled"
        if all(i in ends for i in (*reqs, 20, 21)):
            later.put(None)                                     # half-close: the call ends
    assert {i: got[i] for i in reqs} == alone
    assert ends == {**{i: C.OK for i in reqs}, 20: "cancelled", 21: C.INVALID_ARGUMENT}
    assert cancel_after <= len(got[20]) and len(got[20]) + after_cancel < 200   # and no end event for it
    assert messages < events
    assert stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10).running_requests == 0


def test_a_reused_stream_id_ends_only_the_second_request(executor):
    stub = executor_pb2_grpc.ExecutorStub(grpc.insecure_channel(executor.address))
    opens = [common_pb2.GenerateStreamsRequest(stream_id=5, open=_req(8)),
             common_pb2.GenerateStreamsRequest(stream_id=5, open=_req(8))]
    events = [ev for r in stub.GenerateStreams(iter(opens), timeout=60) for ev in r.events]
    ends = [(_code(ev.code) if ev.code else C.OK) for ev in events if ev.end]
    assert sorted(ends, key=lambda c: c.value[0]) == [C.OK, C.INVALID_ARGUMENT]
    assert sum(len(ev.chunk.token_ids) for ev in events) == 8


class _OldExecutor(executor_pb2_grpc.ExecutorServicer):
    """An executor from before GenerateStreams: GenerateStream only."""

    async def GenerateStream(self, request, context):
        for t in range(request.sampling.max_new_tokens):
            yield common_pb2.GenerateChunk(token_ids=[t], executor_id="old")


def test_the_router_falls_back_to_one_call_per_request_for_an_executor_without_the_call():
    async def scenario():
        server = grpc.aio.server()
        executor_pb2_grpc.add_ExecutorServicer_to_server(_OldExecutor(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                streams = StreamsClient(executor_pb2_grpc.ExecutorStub(ch))
                with pytest.raises(StreamsRefused):
                    async for _ in streams.stream(_req(3)):
                        pass
                assert not streams.usable
                streams.refused_at -= streams_module.RETRY_REFUSED_S + 1   # later: tried again
                assert streams.usable
                streams.refused_at = time.monotonic()
                tokens = [t async for c in streams.generate_stream(_req(4), 30.0) for t in c.token_ids]
                assert tokens == [0, 1, 2, 3]
                await streams.close()
        finally:
            await server.stop(0)
    asyncio.run(scenario())


def test_an_idle_multiplexed_call_does_not_hold_the_executors_stop(llama_dir, tmp_path):
    """The router keeps its GenerateStreams call open between requests; SIGTERM on the executor
    ends that call once its requests are done, so the executor exits long before its grace period
    (60 s here) would have cancelled the call."""
    e = Service("executor", "--base-model", str(llama_dir), "--disk-cache-dir", str(tmp_path / "d"),
                "--grace-seconds", "60", log_path=tmp_path / "e.log").start()

    async def scenario():
        server, servicer = await build_router(RouterConfig(port=0, executor=[e.address]))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                for _ in range(100):
                    await servicer.pool.poll_once()
                    if any(v.healthy for v in servicer.pool.snapshot()):
                        break
                    await asyncio.sleep(0.1)
                chunks = [c async for c in stub.GenerateStream(_req(4), timeout=60)]
                assert sum(len(c.token_ids) for c in chunks) == 4
                handle = servicer.pool.executors[e.address]
                assert handle.streams._call is not None and handle.streams._call.open   # kept open
                e.proc.send_signal(15)
                assert await asyncio.to_thread(e.proc.wait, 30) == 0
        finally:
            await server.stop(0)
            await servicer.pool.close()
            await servicer.adapters.close()
    try:
        asyncio.run(scenario())
    finally:
        e.stop()


def test_a_message_of_events_stays_under_its_byte_limit():
    """The executor cuts a step's events into messages of at most STREAMS_MESSAGE_BYTES (1 MiB; any
    client's default receive limit is 4 MiB), in order; an event larger than that goes alone."""
    from services.common.streams import STREAMS_MESSAGE_BYTES, batches
    assert STREAMS_MESSAGE_BYTES <= 4 << 20
    ev = [common_pb2.StreamEvent(stream_id=i, chunk=common_pb2.GenerateChunk(token_ids=[1] * n))
          for i, n in enumerate([10, 300, 10, 10, 2000, 10], start=1)]
    out = list(batches([ev[0], None, *ev[1:]], limit=700))
    assert [[e.stream_id for e in b] for b in out] == [[1, 2, 3, 4], [5], [6]]
    assert all(sum(e.ByteSize() for e in b) <= 700 for b in out if len(b) > 1)
    assert list(batches([None], limit=700)) == []


def test_past_its_deadline_a_multiplexed_request_ends_and_stops_upstream(executor):
    """StreamsClient.stream(timeout_s): DEADLINE_EXCEEDED to its reader, a cancel to the server
    (nothing left running there), and the shared call goes on serving the next request."""
    async def scenario():
        async with grpc.aio.insecure_channel(executor.address) as ch:
            stub = executor_pb2_grpc.ExecutorStub(ch)
            streams = StreamsClient(stub)
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for chunk in streams.stream(_req(500), timeout_s=0.05):
                    got += chunk.token_ids
            assert err.value.code() == C.DEADLINE_EXCEEDED and len(got) < 500
            after = [t async for c in streams.stream(_req(3), timeout_s=60) for t in c.token_ids]
            assert len(after) == 3
            for _ in range(100):
                if (await stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)).running_requests == 0:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the request ran on past its deadline")
            await streams.close()
    asyncio.run(scenario())
