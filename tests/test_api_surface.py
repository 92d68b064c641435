"""Issue 14: what clients in any language rely on: health Watch, reflection v1 and v1alpha, and
structured error details (google.rpc.ErrorInfo / BadRequest) beside every error's message."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from services.common import errors
from services.common.gen.openlora.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from services.common.server import Service, create_server


class _Servicer(executor_pb2_grpc.ExecutorServicer):
    async def LoadAdapter(self, request, context):
        if request.adapter_id == "missing":
            raise errors.AdapterNotFound("adapter 'missing' is not registered; add it first")
        raise errors.InvalidArgument("adapter_version must be >= 0, got -1")

    async def GenerateStream(self, request, context):
        yield common_pb2.GenerateChunk()
        raise errors.QueueFull("too many requests waiting; retry later")


async def _serve():
    server, port = await create_server(
        __import__("services.common.config", fromlist=["ServerConfig"]).ServerConfig(port=0),
        [Service("openlora.v1.Executor", _Servicer(), executor_pb2_grpc.add_ExecutorServicer_to_server)],
        serving=False)
    await server.start()
    return server, port


def test_health_watch_streams_status_changes():
    """grpc's HealthServicer.Watch is a coroutine writing with context.write, not an async
    generator: the error wrapper must await it (it used to fail every Watch with INTERNAL)."""
    async def scenario():
        server, port = await _serve()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = health_pb2_grpc.HealthStub(ch).Watch(
                    health_pb2.HealthCheckRequest(service="openlora.v1.Executor"))
                first = await asyncio.wait_for(call.read(), 10)
                assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
                await server.set_serving(True)
                second = await asyncio.wait_for(call.read(), 10)
                assert second.status == health_pb2.HealthCheckResponse.SERVING
                call.cancel()
                overall = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await asyncio.wait_for(overall.read(), 10)).status == \
                    health_pb2.HealthCheckResponse.SERVING
                overall.cancel()
        finally:
            await server.stop(0)

    asyncio.run(scenario())


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflection_is_served_as_v1_and_v1alpha(package):
    async def scenario():
        server, port = await _serve()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                info = ch.stream_stream(
                    f"/{package}.ServerReflection/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                call = info()
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                names = {s.name for s in (await call.read()).list_services_response.service}
                assert {"openlora.v1.Executor", "grpc.health.v1.Health",
                        "grpc.reflection.v1.ServerReflection",
                        "grpc.reflection.v1alpha.ServerReflection"} <= names
                for symbol in ("openlora.v1.Executor", f"{package}.ServerReflection"):
                    await call.write(reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol=symbol))
                    resp = await call.read()
                    assert resp.WhichOneof("message_response") == "file_descriptor_response", resp
                await call.done_writing()
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_errors_carry_error_info_and_bad_request_details():
    async def scenario():
        server, port = await _serve()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = executor_pb2_grpc.ExecutorStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await stub.LoadAdapter(executor_pb2.LoadAdapterRequest(adapter_id="x"))
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.LoadAdapter(executor_pb2.LoadAdapterRequest(adapter_id="missing"))
                stream = stub.GenerateStream(common_pb2.GenerateRequest())
                with pytest.raises(grpc.aio.AioRpcError) as full:
                    async for _ in stream:
                        pass
            return bad.value, missing.value, full.value
        finally:
            await server.stop(0)

    bad, missing, full = asyncio.run(scenario())

    def details(err):

        status = rpc_status.from_call(_AsCall(err))
        assert status is not None, "no grpc-status-details-bin trailer"
        assert status.code == err.code().value[0] and status.message == err.details()
        out = {}
        for d in status.details:
            for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
                if d.Is(kind.DESCRIPTOR):
                    msg = kind()
                    d.Unpack(msg)
                    out[kind.__name__] = msg

        return out

    d = details(bad)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert d["ErrorInfo"].reason == "INVALID_ARGUMENT" and d["ErrorInfo"].domain == "openlora.dev"
    assert d["ErrorInfo"].metadata["method"] == "/openlora.v1.Executor/LoadAdapter"
    assert [v.field for v in d["BadRequest"].field_violations] == ["adapter_version"]
    d = details(missing)
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert d["ErrorInfo"].reason == "ADAPTER_NOT_FOUND" and "BadRequest" not in d
    d = details(full)
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and d["ErrorInfo"].reason == "QUEUE_FULL"


class _AsCall:
    """rpc_status.from_call wants code()/details()/trailing_metadata(): an AioRpcError has them."""

    def __init__(self, err):
        self._err = err

    def code(self):
        return self._err.code()

    def details(self):
        return self._err.details()

    def trailing_metadata(self):
        return tuple(self._err.trailing_metadata())


def test_field_of_names_only_real_fields():
    assert errors.field_of(errors.InvalidArgument("max_new_tokens must be >= 1")) == "max_new_tokens"
    assert errors.field_of(errors.InvalidArgument("the prompt is empty")) is None
    assert errors.field_of(errors.InvalidArgument("bad", field="prompt")) == "prompt"
    assert errors.field_of(errors.NotFound("adapter_id x")) is None


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_reflects_with_either_protocol(protocol):
    """`buf curl` (from npm, tests/node) finds the schema by reflection and calls an RPC."""
    import json
    import shutil

    from tests.test_node_client import NODE_DIR, node_ready
    if shutil.which("node") is None:
        pytest.skip("node is not installed (buf comes from npm: @bufbuild/buf)")
    problem = node_ready()
    assert problem is None, problem

    async def scenario():
        server, port = await _serve()
        await server.set_serving(True)
        try:
            proc = await asyncio.create_subprocess_exec(
                str(NODE_DIR / "node_modules" / ".bin" / "buf"), "curl", "--protocol", "grpc",
                "--http2-prior-knowledge", "--reflect-protocol", protocol,
                "--data", '{"service": "openlora.v1.Executor"}',
                f"http://127.0.0.1:{port}/grpc.health.v1.Health/Check",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode, out.decode(), err.decode()
        finally:
            await server.stop(0)

    code, out, err = asyncio.run(scenario())
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}
