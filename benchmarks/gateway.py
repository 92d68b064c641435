"""The OpenAI-compatible gateway vs gRPC straight to the router, side by side over the same deployment.

One registry, one executor (the demo model's shape, random weights), one router and one gateway, as
subprocesses on loopback. In one run, interleaved rounds, medians printed:

  * latency: p50 of a 1-token completion (the same prompt, greedy) through the gateway
    (POST /v1/completions over one kept-alive HTTP/1.1 connection) vs Router.Generate over one gRPC
    channel; goal: gateway <= 1.1 x gRPC + 2 ms.
  * streaming: generated tokens/s with --streams concurrent streams of --stream-tokens tokens each
    (ignore_eos) through the gateway (SSE) vs Router.GenerateStream; goal: gateway >= 0.95 x gRPC.

Both clients run in this process on asyncio (raw HTTP/1.1 for the gateway, grpc.aio for the router),
so neither side pays for a heavier client library.

    .venv/bin/python benchmarks/gateway.py [--rounds 7] [--requests 40] [--streams 32] [--stream-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.bench import percentile  # noqa: E402
from services.common.gen.openlora.v1 import common_pb2, router_pb2_grpc  # noqa: E402
from services.synthetic import ModelSpec, write_model  # noqa: E402
from tests.servers import Service, free_port  # noqa: E402

SPEC = ModelSpec(arch="llama", hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=1024,
                 max_positions=2048, seed=0)
PROMPT = "Hello adapters, the quick brown fox"


class Http:
    """One kept-alive HTTP/1.1 connection: POST JSON, read a Content-Length or chunked reply."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def connect(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def post(self, path: str, body: dict) -> tuple[int, dict[str, str]]:
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    async def unary(self, path: str, body: dict) -> dict:
        status, headers = await self.post(path, body)
        raw = await self.reader.readexactly(int(headers["content-length"]))
        assert status == 200, raw
        return json.loads(raw)

    async def stream(self, path: str, body: dict) -> int:
        """Reads SSE events until [DONE]; returns the completion tokens of the usage event."""
        status, headers = await self.post(path, body)
        assert status == 200 and headers.get("transfer-encoding") == "chunked", headers
        tokens, buf = 0, b""
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return tokens
            buf += chunk[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event[len(b"data: "):]
                if payload == b"[DONE]":
                    continue
                usage = json.loads(payload).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]

    def close(self):
        self.writer.close()


pct = percentile       # services.bench's: one percentile helper everywhere


async def latency_round(http: Http, stub, n: int) -> tuple[float, float]:
    """p50 seconds of n 1-token completions, gateway then gRPC, alternating request by request."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    req = common_pb2.GenerateRequest(prompt=PROMPT, sampling=common_pb2.SamplingParams(max_new_tokens=1))
    gw, rpc = [], []
    for _ in range(n):
        t = time.perf_counter()
        await http.unary("/v1/completions", body)
        gw.append(time.perf_counter() - t)
        t = time.perf_counter()
        await stub.Generate(req, timeout=60)
        rpc.append(time.perf_counter() - t)
    return pct(gw, 0.5), pct(rpc, 0.5)


async def stream_gateway(port: int, streams: int, tokens: int) -> float:
    conns = [await Http(port).connect() for _ in range(streams)]
    body = {"model": "bench", "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    got = await asyncio.gather(*(c.stream("/v1/completions", {**body, "prompt": f"{PROMPT} {i}"})
                                 for i, c in enumerate(conns)))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    assert sum(got) == streams * tokens, got
    return sum(got) / elapsed


async def stream_grpc(stub, streams: int, tokens: int) -> float:
    async def one(i: int) -> int:
        n = 0
        req = common_pb2.GenerateRequest(prompt=f"{PROMPT} {i}", sampling=common_pb2.SamplingParams(
            max_new_tokens=tokens, ignore_eos=True))
        async for chunk in stub.GenerateStream(req, timeout=600):
            n += len(chunk.token_ids)
        return n

    start = time.perf_counter()
    got = await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.perf_counter() - start
    assert sum(got) == streams * tokens, got
    return sum(got) / elapsed


async def measure(args, router: str, http_port: int) -> None:
    channel = grpc.aio.insecure_channel(router)
    stub = router_pb2_grpc.RouterStub(channel)
    http = await Http(http_port).connect()
    await latency_round(http, stub, 10)                          # warm-up
    await stream_grpc(stub, args.streams, 8)
    await stream_gateway(http_port, args.streams, 8)
    lat_gw, lat_rpc, tps_gw, tps_rpc = [], [], [], []
    for r in range(args.rounds):
        g, p = await latency_round(http, stub, args.requests)
        lat_gw.append(g)
        lat_rpc.append(p)
        if r % 2 == 0:   # alternate which side streams first
            tps_rpc.append(await stream_grpc(stub, args.streams, args.stream_tokens))
            tps_gw.append(await stream_gateway(http_port, args.streams, args.stream_tokens))
        else:
            tps_gw.append(await stream_gateway(http_port, args.streams, args.stream_tokens))
            tps_rpc.append(await stream_grpc(stub, args.streams, args.stream_tokens))
        print(f"round {r + 1}: 1-token p50 gateway {g * 1e3:.2f} ms, gRPC {p * 1e3:.2f} ms | "
              f"{args.streams} streams: gateway {tps_gw[-1]:.0f} tok/s, gRPC {tps_rpc[-1]:.0f} tok/s",
              flush=True)
    http.close()
    await channel.close()
    g, p = statistics.median(lat_gw), statistics.median(lat_rpc)
    tg, tr = statistics.median(tps_gw), statistics.median(tps_rpc)
    print(f"\nmedians over {args.rounds} rounds ({args.requests} requests each for latency):")
    print(f"  1-token completion p50   gateway {g * 1e3:7.2f} ms   gRPC {p * 1e3:7.2f} ms   "
          f"overhead {(g - p) * 1e3:+.2f} ms = {g / p:.2f}x   goal <= 1.1x + 2 ms "
          f"({(1.1 * p + 0.002) * 1e3:.2f} ms): {'met' if g <= 1.1 * p + 0.002 else 'NOT met'}")
    ratio = statistics.median(a / b for a, b in zip(tps_gw, tps_rpc, strict=False))
    print(f"  {args.streams} streams x {args.stream_tokens} tokens   gateway {tg:7.0f} tok/s   "
          f"gRPC {tr:7.0f} tok/s   ratio of medians {tg / tr:.3f}, median of per-round ratios {ratio:.3f}   "
          f"goal >= 0.95: {'met' if tg >= 0.95 * tr else 'NOT met'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--requests", type=int, default=40, help="1-token requests per side per round")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        model = write_model(root / "model", SPEC)
        services = []
        try:
            registry = Service("registry", "--data-dir", str(root / "registry"), log_path=root / "r.log")
            services.append(registry.start())
            executor = Service("executor", "--registry", registry.address, "--base-model", str(model),
                               "--device", args.device, "--max-batch-size", str(max(args.streams, 8)),
                               "--disk-cache-dir", str(root / "disk"), log_path=root / "e.log")
            services.append(executor.start(timeout=600))
            router = Service("router", "--registry", registry.address, "--executor", executor.address,
                             log_path=root / "ro.log")
            services.append(router.start())
            http_port = free_port()
            gateway = Service("gateway", "--router", router.address, "--registry", registry.address,
                              "--base-model", str(model), "--served-model-name", "bench",
                              port=http_port, log_path=root / "g.log")
            services.append(gateway)
            import subprocess
            import urllib.request
            gateway.proc = subprocess.Popen(gateway.args, stdout=subprocess.DEVNULL,
                                            stderr=open(root / "g.log", "wb"))
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            print(f"deployment up: router {router.address}, gateway http://127.0.0.1:{http_port} "
                  f"(model {SPEC.hidden}h x {SPEC.layers} layers, {args.device})", flush=True)
            asyncio.run(measure(args, router.address, http_port))
        finally:
            for s in reversed(services):
                s.stop()


if __name__ == "__main__":
    main()
