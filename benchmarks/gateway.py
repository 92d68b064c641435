"""The OpenAI API over HTTP vs gRPC, side by side over the same deployment.

One registry, one executor (the demo model's shape, random weights), one router serving the OpenAI
API itself (--http-port: HTTP -> placement -> executor, one gRPC hop) and one gateway (HTTP ->
gateway -> router -> executor), as subprocesses on loopback. Four sides, interleaved (who goes first
rotates each round), medians printed against the executor's own gRPC:

  * latency: p50 of a 1-token completion (the same prompt, greedy): POST /v1/completions over one
    kept-alive HTTP/1.1 connection, or Generate over one gRPC channel; goal: HTTP <= direct + 1.5 ms.
  * streaming: generated tokens/s of --streams concurrent streams of --stream-tokens tokens each
    (ignore_eos, sampled); goal: HTTP >= 0.97 x direct.
  * structured outputs (executor gRPC): all streams with a JSON schema vs none, per output token
    (goal <= 1.15x), and unconstrained streams beside structured ones (goal: lose <= 3%).
  * CPU time per streamed token of each process (executor, router, gateway, this client), from
    /proc: what each hop costs, steadier than tok/s on a shared machine where all four share cores.

--compare-multiplex adds a second router and a gateway in front of it, started with
--no-multiplex-streams (one GenerateStream call per request on each hop, where the default sends
them all over one GenerateStreams call answered once per engine step), as the sides
"router gRPC 1/req", "router HTTP 1/req" and "gateway HTTP 1/req".

Nine rounds by default: on a 2-core VM a single round's ratio swings by 10-20%, so fewer rounds
leave the medians to chance.

Both clients run in this process on asyncio (raw HTTP/1.1 for the gateway, grpc.aio for the router),
so neither side pays for a heavier client library.

    .venv/bin/python benchmarks/gateway.py [--rounds 9] [--requests 40] [--streams 32] [--stream-tokens 128]
                                           [--structured-rounds 9] [--compare-multiplex] [--vocab 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.bench import percentile  # noqa: E402
from services.common.gen.openlora.v1 import common_pb2, executor_pb2_grpc, router_pb2_grpc  # noqa: E402
from services.common.harness import Service, cpu_seconds, free_port, http_ok, wait_until  # noqa: E402
from services.synthetic import ModelSpec, write_model  # noqa: E402

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
SCHEMA = json.dumps({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})


class Grpc:
    """One side spoken over gRPC: the executor's or the router's Generate/GenerateStream."""

    def __init__(self, stub):
        self.stub = stub

    async def one_token(self) -> None:
        await self.stub.Generate(common_pb2.GenerateRequest(
            prompt=PROMPT, sampling=common_pb2.SamplingParams(max_new_tokens=1)), timeout=60)

    async def stream(self, i: int, tokens: int, structured: bool = False) -> int:
        s = common_pb2.SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=1.0, seed=i)
        if structured:
            s.structured_output.json_schema = SCHEMA
        n = 0
        async for chunk in self.stub.GenerateStream(common_pb2.GenerateRequest(
                prompt=f"{PROMPT} {i}", sampling=s), timeout=600):
            n += len(chunk.token_ids)
        return n


class HttpSide:
    """One side spoken over HTTP (the gateway, or the router's own --http-port)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = None

    async def one_token(self) -> None:
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        if self.conn is not None:
            try:
                await self.conn.unary("/v1/completions", body)
                return
            except (IndexError, ConnectionError):   # the server closed an idle keep-alive connection
                self.conn.close()
        self.conn = await Http(self.port).connect()
        await self.conn.unary("/v1/completions", body)

    async def stream(self, i: int, tokens: int, structured: bool = False) -> int:
        c = await Http(self.port).connect()
        body = {"model": "bench", "prompt": f"{PROMPT} {i}", "max_tokens": tokens, "ignore_eos": True,
                "temperature": 1.0, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        try:
            return await c.stream("/v1/completions", body)
        finally:
            c.close()


async def throughput(side, streams: int, tokens: int, structured: int = 0) -> tuple[float, float]:
    """(tokens/s of the unconstrained streams, of the structured ones): `streams` concurrent, the
    first `structured` of them with a JSON schema."""
    done: dict[int, float] = {}

    async def one(i):
        n = await side.stream(i, tokens, structured=i < structured)
        done[i] = time.perf_counter()
        return n

    start = time.perf_counter()
    got = await asyncio.gather(*(one(i) for i in range(streams)))
    assert all(n == tokens for n in got), got

    def rate(ids):
        return sum(got[i] for i in ids) / (max(done[i] for i in ids) - start) if ids else 0.0
    return rate(range(structured, streams)), rate(range(structured))


async def transport(args, sides: dict, procs: dict[str, int]) -> None:
    """1-token latency and streamed tokens/s of every side, alternated over --rounds rounds."""
    names = list(sides)
    lat = {n: [] for n in names}
    tps = {n: [] for n in names}
    cpu = {n: {p: [] for p in procs} for n in names}   # CPU microseconds per streamed token, by process
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]   # rotate who goes first
        times = {n: [] for n in names}
        for _ in range(args.requests):
            for n in order:
                t = time.perf_counter()
                await sides[n].one_token()
                times[n].append(time.perf_counter() - t)
        for n in order:
            lat[n].append(pct(times[n], 0.5))
            before = {p: cpu_seconds(pid) for p, pid in procs.items()}
            tps[n].append((await throughput(sides[n], args.streams, args.stream_tokens))[0])
            for p, pid in procs.items():
                cpu[n][p].append((cpu_seconds(pid) - before[p]) / (args.streams * args.stream_tokens) * 1e6)
        print(f"round {r + 1}: " + " | ".join(f"{n} p50 {lat[n][-1] * 1e3:.2f} ms, {tps[n][-1]:.0f} tok/s"
                                               for n in names), flush=True)
    base = names[0]
    print(f"\nmedians over {args.rounds} rounds ({args.requests} 1-token requests per side per round; "
          f"{args.streams} streams x {args.stream_tokens} tokens):")
    for n in names:
        p50, t = statistics.median(lat[n]), statistics.median(tps[n])
        ratio = statistics.median(a / b for a, b in zip(tps[n], tps[base], strict=True))
        print(f"  {n:19s} 1-token p50 {p50 * 1e3:7.2f} ms ({(p50 - statistics.median(lat[base])) * 1e3:+.2f} ms "
              f"vs {base})   {t:7.0f} tok/s ({ratio:.3f}x {base}, median of per-round ratios)")
    print("CPU time per streamed token (medians, microseconds; a process a side does not use stays near 0):")
    for n in names:
        print(f"  {n:19s} " + ", ".join(f"{p} {statistics.median(cpu[n][p]):4.0f}" for p in procs))


def engine_seconds(url: str) -> tuple[float, float]:
    """(wall seconds of the executor's engine steps, of which the grammar rows' own work), since
    its start: its Prometheus counters openlora_executor_step_seconds / grammar_seconds."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    got = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("openlora_executor_step_seconds_total", "openlora_executor_grammar_seconds_total"):
            got[name] = float(value)
    return got["openlora_executor_step_seconds_total"], got["openlora_executor_grammar_seconds_total"]


async def measure(args, sides: dict, procs: dict[str, int], metrics_url: str) -> None:
    for side in sides.values():                                   # warm-up
        await side.one_token()
        await throughput(side, args.streams, 8)
    if args.rounds:
        await transport(args, sides, procs)
    if args.structured_rounds:
        base = next(iter(sides))
        side = sides[base]
        n, half = args.streams, args.streams // 2
        runs = {"plain": [], "mixed": [], "json": []}
        cost, lost = [], []
        work = {kind: [] for kind in runs}    # the executor's CPU microseconds per generated token
        share = {kind: [] for kind in runs}   # the grammar rows' own share of the engine steps' time
        stepping = {kind: [] for kind in runs}   # the engine steps' wall microseconds per generated token

        async def run(kind: str) -> tuple[float, float]:
            before, steps = cpu_seconds(procs["executor"]), engine_seconds(metrics_url)
            got = await throughput(side, n, args.stream_tokens,
                                   structured={"plain": 0, "mixed": half, "json": n}[kind])
            work[kind].append((cpu_seconds(procs["executor"]) - before) / (n * args.stream_tokens) * 1e6)
            after = engine_seconds(metrics_url)
            share[kind].append((after[1] - steps[1]) / (after[0] - steps[0]))
            stepping[kind].append((after[0] - steps[0]) / (n * args.stream_tokens) * 1e6)
            return got
        for r in range(args.structured_rounds):
            got = {}
            for kind in list(runs)[r % 3:] + list(runs)[:r % 3]:    # rotate who goes first
                got[kind] = await run(kind)
                runs[kind].append(got[kind])
            cost.append(got["plain"][0] / got["json"][1])
            lost.append(1 - (got["mixed"][0] / (n - half)) / (got["plain"][0] / n))
        tp = statistics.median(p for p, _ in runs["plain"])
        oj = statistics.median(j for _, j in runs["json"])
        mp = statistics.median(p for p, _ in runs["mixed"])
        mj = statistics.median(j for _, j in runs["mixed"])
        print(f"\nstructured outputs ({base}, {n} streams, JSON schema, {args.structured_rounds} alternated "
              f"rounds; ratios are medians of the per-round ratios):")
        print(f"  all unconstrained {tp:.0f} tok/s; all structured {oj:.0f} tok/s: cost per output token "
              f"{statistics.median(cost):.3f}x (goal <= 1.15x)")
        print(f"  half and half: unconstrained {mp:.0f} tok/s over {n - half} streams, structured {mj:.0f} "
              f"tok/s; each unconstrained stream vs alone: {statistics.median(lost):+.1%} lost (goal <= 3%; "
              f"rounds: {', '.join(f'{x:+.1%}' for x in lost)})")
        print("  executor CPU per generated token (medians): " + ", ".join(
            f"{kind} {statistics.median(work[kind]):.0f} us" for kind in ("plain", "mixed", "json")))
        print("  engine steps' wall time per generated token (medians): " + ", ".join(
            f"{kind} {statistics.median(stepping[kind]):.0f} us" for kind in ("plain", "mixed", "json")))
        print(f"  the grammar rows' own work inside the engine's steps (its counters; the same steps, so the "
              f"VM's drift cancels): {statistics.median(share['mixed']):.1%} of the half-and-half steps' time "
              f"(what each unconstrained stream beside them waits for), {statistics.median(share['json']):.1%} "
              f"of the all-structured ones' (rounds: {', '.join(f'{x:.1%}' for x in share['mixed'])})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--requests", type=int, default=40, help="1-token requests per side per round")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=SPEC.vocab,
                   help="the model's vocabulary (the tokenizer stays the demo's; a real model's is 32k-152k, "
                        "where the sampler's and the grammar masks' passes over the logits grow)")
    p.add_argument("--compare-multiplex", action="store_true",
                   help="also a router and a gateway with --no-multiplex-streams (one GenerateStream call "
                        "per request), as sides '... 1/req'")
    p.add_argument("--structured-rounds", type=int, default=9,
                   help="rounds of structured vs unconstrained streams (0: none)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        spec = dataclasses.replace(SPEC, vocab=args.vocab)
        model = write_model(root / "model", spec)
        services = []
        try:
            registry = Service("registry", "--data-dir", str(root / "registry"), log_path=root / "r.log")
            services.append(registry.start())
            metrics_port = free_port()
            executor = Service("executor", "--registry", registry.address, "--base-model", str(model),
                               "--device", args.device, "--max-batch-size", str(max(args.streams, 8)),
                               "--metrics-port", str(metrics_port),
                               "--disk-cache-dir", str(root / "disk"), log_path=root / "e.log")
            services.append(executor.start(timeout=600))
            router_http = free_port()
            router = Service("router", "--registry", registry.address, "--executor", executor.address,
                             "--http-port", str(router_http), "--served-model-name", "bench",
                             log_path=root / "ro.log")
            services.append(router.start())
            if args.compare_multiplex:          # the same router, one GenerateStream call per request
                single_http = free_port()
                single = Service("router", "--registry", registry.address, "--executor", executor.address,
                                 "--http-port", str(single_http), "--served-model-name", "bench",
                                 "--no-multiplex-streams", log_path=root / "ro1.log")
                services.append(single.start())
                single_gw = Service("gateway", "--router", single.address, "--registry", registry.address,
                                    "--base-model", str(model), "--served-model-name", "bench",
                                    "--no-multiplex-streams", port=free_port(), log_path=root / "g1.log")
                services.append(single_gw.start(timeout=60))
            http_port = free_port()
            gateway = Service("gateway", "--router", router.address, "--registry", registry.address,
                              "--base-model", str(model), "--served-model-name", "bench",
                              port=http_port, log_path=root / "g.log")
            services.append(gateway.start(timeout=60))
            if not wait_until(lambda: http_ok(f"http://127.0.0.1:{router_http}/health"), 60):
                raise SystemExit(f"the router's HTTP API on :{router_http} did not answer; log {root / 'ro.log'}")
            print(f"deployment up: executor {executor.address}, router {router.address} (+ HTTP "
                  f":{router_http}), gateway http://127.0.0.1:{http_port} (model {spec.hidden}h x "
                  f"{spec.layers} layers, vocab {spec.vocab}, {args.device})", flush=True)

            async def run():
                channels = [grpc.aio.insecure_channel(a) for a in (executor.address, router.address)]
                sides = {"executor gRPC": Grpc(executor_pb2_grpc.ExecutorStub(channels[0])),
                         "router gRPC": Grpc(router_pb2_grpc.RouterStub(channels[1])),
                         "router HTTP": HttpSide(router_http), "gateway HTTP": HttpSide(http_port)}
                procs = {"executor": executor.proc.pid, "router": router.proc.pid,
                         "gateway": gateway.proc.pid, "client": os.getpid()}
                if args.compare_multiplex:
                    wait_until(lambda: http_ok(f"http://127.0.0.1:{single_http}/health"), 60)
                    channels.append(grpc.aio.insecure_channel(single.address))
                    sides["router gRPC 1/req"] = Grpc(router_pb2_grpc.RouterStub(channels[-1]))
                    sides["router HTTP 1/req"] = HttpSide(single_http)
                    sides["gateway HTTP 1/req"] = HttpSide(single_gw.port)
                    procs["router 1/req"] = single.proc.pid
                    procs["gateway 1/req"] = single_gw.proc.pid
                try:
                    await measure(args, sides, procs, f"http://127.0.0.1:{metrics_port}/metrics")
                finally:
                    for ch in channels:
                        await ch.close()
            asyncio.run(run())
        finally:
            for s in reversed(services):
                s.stop()


if __name__ == "__main__":
    main()
