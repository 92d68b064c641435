"""The floor of a Python gRPC hop: openlora.v1.Router's Generate and GenerateStream relayed as raw
bytes to one fixed executor, with no placement, no parsing, no auth, no metrics;
an executor's error status is passed on as it came.

benchmarks/cluster.py runs it beside the real router, so the router's own cost (what placement,
auth and metrics add) and the cost of any Python gRPC hop on the machine (what the real router
cannot go below) are printed side by side; and, where Go and Debian's grpc-go are installed (.ci/run
installs them), the same hop compiled (benchmarks/go_relay/main.go, built by build_go_relay): what a
hop costs here when it is not a Python gRPC stack.

    .venv/bin/python benchmarks/bare_relay.py PORT EXECUTOR_ADDRESS
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import subprocess
import sys

import grpc
from grpc_health.v1 import _async as health
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.harness import free_port, wait_serving  # noqa: E402
from tests.servers import GOCODE, go_build  # noqa: E402

GO_SOURCE = ROOT / "benchmarks" / "go_relay" / "main.go"
PYTHON_RELAY = [sys.executable, str(ROOT / "benchmarks" / "bare_relay.py")]


def start_relay(command: list[str], target: str) -> tuple[subprocess.Popen, str]:
    """A bare relay (PYTHON_RELAY, or build_go_relay's binary) on a free port, relaying to target,
    serving: (its process, its address)."""
    port = free_port()
    proc = subprocess.Popen([*command, str(port), target])
    address = f"127.0.0.1:{port}"
    wait_serving(proc, address, command[-1], timeout=30)
    return proc, address


def build_go_relay(workdir: pathlib.Path) -> pathlib.Path | str:
    """benchmarks/go_relay built under workdir with Debian's grpc-go in GOPATH mode (no downloads):
    the binary, or why it cannot be built here (a str)."""
    if shutil.which("go") is None:
        return "go is not installed"
    if not (GOCODE / "src" / "google.golang.org" / "grpc" / "health").is_dir():
        return f"grpc-go is not under {GOCODE} (apt-get install golang-google-grpc-dev)"
    src = workdir / "gopath" / "src" / "openlora-go-relay"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copy(GO_SOURCE, src / "main.go")
    binary = workdir / "go_relay"
    proc = go_build(workdir / "gopath", "openlora-go-relay", binary)
    if proc.returncode != 0:
        return f"go build failed: {proc.stderr.strip()[-500:]}"
    return binary


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
