"""The floor of a Python gRPC hop: openlora.v1.Router's Generate and GenerateStream relayed as raw
bytes to one fixed executor, with no placement, no parsing, no auth, no metrics;
an executor's error status is passed on as it came.

benchmarks/cluster.py runs it beside the real router, so the router's own cost (what placement,
auth and metrics add) and the cost of any Python gRPC hop on the machine (what the real router
cannot go below) are printed side by side.

    .venv/bin/python benchmarks/bare_relay.py PORT EXECUTOR_ADDRESS
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from grpc_health.v1 import _async as health
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def serve(port: int, target: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    generate = channel.unary_unary("/openlora.v1.Executor/Generate")
    generate_stream = channel.unary_stream("/openlora.v1.Executor/GenerateStream")

    async def unary(request: bytes, context) -> bytes:
        try:
            return await generate(request)
        except grpc.aio.AioRpcError as exc:     # the executor's status, passed on as it came
            await context.abort(exc.code(), exc.details(), tuple(exc.trailing_metadata() or ()))

    async def stream(request: bytes, context):
        try:
            async for chunk in generate_stream(request):
                yield chunk
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details(), tuple(exc.trailing_metadata() or ()))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("openlora.v1.Router", {
        "Generate": grpc.unary_unary_rpc_method_handler(unary),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(stream)}),))
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
