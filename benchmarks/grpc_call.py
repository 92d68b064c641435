"""What one grpc.aio call costs on this machine, with nothing of openlora in it: an echo server in a
subprocess, a client here; unary and one-message server-streaming calls of a few bytes, one at a
time. Prints the wall time per call and the CPU time the server process and the client spent per
call (medians of --rounds runs). A relay hop (the router) is one server side and one client side.

    .venv/bin/python benchmarks/grpc_call.py [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import subprocess
import sys
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.harness import cpu_seconds, free_port  # noqa: E402


async def serve(port: int) -> None:
    async def unary(request: bytes, context) -> bytes:
        return request

    async def stream(request: bytes, context):
        yield request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def measure(address: str, server_pid: int, calls: int, rounds: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        unary = channel.unary_unary("/bench.Echo/Unary")
        stream = channel.unary_stream("/bench.Echo/Stream")

        async def one_stream() -> None:
            async for _ in stream(b"hello"):
                pass

        kinds = {"unary": lambda: unary(b"hello"), "stream": one_stream}
        for _ in range(200):                       # connection up, code paths warm
            await unary(b"hello")
        rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
        for _ in range(rounds):
            for name, call in kinds.items():
                s0, c0, t0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
                for _ in range(calls):
                    await call()
                wall = time.perf_counter() - t0
                rows[name].append((wall / calls, (cpu_seconds(server_pid) - s0) / calls,
                                   (time.process_time() - c0) / calls))
        for name, r in rows.items():
            wall, server, client = (statistics.median(x[i] for x in r) * 1e6 for i in range(3))
            print(f"{name:<6} {wall:6.0f} us a call; CPU per call: server {server:5.0f} us, client {client:5.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)   # the subprocess: serve on this port
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        print(f"grpcio {grpc.__version__}, {os.cpu_count()} cores; {args.calls} calls a run, medians of "
              f"{args.rounds} runs")
        asyncio.run(measure(address, server.pid, args.calls, args.rounds))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
