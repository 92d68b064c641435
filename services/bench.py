"""`openlora bench`: a workload generator with the figures people ask for.

    openlora bench --router ADDR --synthetic-adapters 128 --zipf 1.0 --rate 20 --requests 500 \
                   --prompt-len 32:128 --output-len 16:64 [--json] [--plot [FILE.png]]

Adapters: `--adapter ID` (repeatable, explicit ids) or `--adapters N` ids `--adapter-prefix`0..N-1,
drawn with Zipf(`--zipf` alpha; 0: uniform) popularity, the first the most popular.
`--synthetic-adapters N` first registers N random adapters under those ids for the base model the
executors serve (uploaded to `--registry`; the same content every time, so a rerun adds no versions),
then uses them. Arrivals:
`--rate R` requests/s (Poisson, open loop) or, with no rate, `--concurrency C` closed-loop clients.
Prompts: `--prompt-len MIN[:MAX]` random token ids (uniform lengths), else the `--prompt` text;
outputs `--output-len MIN[:MAX]` tokens (ignore_eos). Requests stream (GenerateStream) so TTFT and
inter-token latency are measured; a failed request is counted under its gRPC code, not fatal.
Targets: the router, or `--executor ADDR` (repeatable: round-robin over them, as a plain Kubernetes
Service would). The report: throughput (output tokens/s), requests/s, TTFT / ITL / end-to-end
p50/p90/p99, errors by code, which executor served how many. When every request fails it says why
and what to do (exit 1). `--plot` with no file writes under `--data-dir`/bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import grpc

from services.common.config import ConfigError, OneLineParser
from services.common.gen.openlora.v1 import common_pb2, executor_pb2_grpc, router_pb2_grpc
from services.common.tls import ClientSecurity, add_client_flags, aio_channel

DEFAULT_ROUTER = "127.0.0.1:50050"
DEFAULT_REGISTRY = "127.0.0.1:50051"
AUTO_PLOT = "<data-dir>"           # --plot with no file name
PCTS = (50, 90, 99)


@dataclass
class Result:
    start: float                   # seconds since the run began
    e2e: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    code: str = "OK"
    adapter: str = ""
    executor: str = ""
    detail: str = ""               # a failed request's status message


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected MIN or MIN:MAX, got {text!r}") from None
    if lo_i < 0 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"{name}: need 0 <= MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="openlora bench", description=__doc__.splitlines()[0])
    p.add_argument("--router", default=os.environ.get("OPENLORA_ROUTER", DEFAULT_ROUTER),
                   help="router address [env OPENLORA_ROUTER]")
    p.add_argument("--executor", action="append", default=None,
                   help="send straight to executors instead (repeatable: round-robin)")
    p.add_argument("--adapter", action="append", default=[], help="adapter ids (repeatable)")
    p.add_argument("--adapters", type=int, default=0, help="N adapters named --adapter-prefix0..N-1")
    p.add_argument("--adapter-prefix", default="bench/a", help="prefix of the --adapters ids")
    p.add_argument("--synthetic-adapters", type=int, default=0, metavar="N",
                   help="register N random adapters (--adapter-prefix0..N-1) for the served base model "
                        "first, then use them (idempotent)")
    p.add_argument("--synthetic-rank", type=int, default=8, help="rank of the --synthetic-adapters")
    p.add_argument("--registry", default=os.environ.get("OPENLORA_REGISTRY", DEFAULT_REGISTRY),
                   help="registry the --synthetic-adapters go to [env OPENLORA_REGISTRY]")
    p.add_argument("--base-model", default="",
                   help="model directory the --synthetic-adapters are shaped for (default: what the "
                        "executors report serving)")
    p.add_argument("--zipf", type=float, default=1.0, help="adapter popularity exponent (0: uniform)")
    p.add_argument("--base-fraction", type=float, default=0.0, help="share of requests with no adapter")
    p.add_argument("--requests", type=int, default=32, help="how many requests to send (>= 1)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (without --rate)")
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (open loop)")
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.",
                   help="the prompt text of every request (without --prompt-len)")
    p.add_argument("--prompt-len", default="", help="MIN[:MAX] random prompt token ids instead of --prompt")
    p.add_argument("--token-id-max", type=int, default=1000, help="random prompt ids are in [2, this)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="output length (see --output-len)")
    p.add_argument("--output-len", default="", help="MIN[:MAX] output tokens (ignore_eos)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload's random choices")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--plot", default="", nargs="?", const=AUTO_PLOT, metavar="FILE.png",
                   help="latency over time (needs matplotlib); with no FILE, under --data-dir/bench/")
    p.add_argument("--data-dir", default=os.environ.get("OPENLORA_DATA_DIR", "./openlora-data"),
                   help="where output files go when not named [env OPENLORA_DATA_DIR]")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the target to be ready (a deployment still starting)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_flags(p)
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    for name in ("requests", "concurrency", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rate < 0 or args.zipf < 0 or args.adapters < 0 or not 0 <= args.base_fraction <= 1:
        p.error("--rate, --zipf and --adapters must be >= 0, --base-fraction in [0, 1]")
    if not 0 <= args.synthetic_adapters <= 100_000 or args.synthetic_rank < 1 or args.wait < 0:
        p.error("--synthetic-adapters must be 0..100000, --synthetic-rank >= 1, --wait >= 0")
    if args.synthetic_adapters and (args.adapter or args.adapters):
        p.error("--synthetic-adapters names its own adapters: not with --adapter or --adapters")
    if args.synthetic_adapters:
        args.adapters = args.synthetic_adapters
    try:
        args.prompt_range = _range(args.prompt_len, "--prompt-len") if args.prompt_len else None
        args.output_range = (_range(args.output_len, "--output-len") if args.output_len
                             else (args.max_new_tokens, args.max_new_tokens))
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if args.prompt_range and args.prompt_range[1] < 1:
        p.error("--prompt-len must allow at least one token")
    try:
        args.security = ClientSecurity.from_config(args)
    except ConfigError as exc:
        p.error(str(exc))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'openlora[plot]'")


class Workload:
    """The request stream, reproducible from the seed."""

    def __init__(self, args):
        self.rng = random.Random(args.seed)
        self.args = args
        ids = list(args.adapter) or [f"{args.adapter_prefix}{i}" for i in range(args.adapters)]
        self.adapters = ids
        weights = [1 / (i + 1) ** args.zipf for i in range(len(ids))]
        self.cum = list(itertools.accumulate(weights))

    def adapter(self) -> str:
        if not self.adapters or self.rng.random() < self.args.base_fraction:
            return ""
        return self.adapters[bisect.bisect_left(self.cum, self.rng.random() * self.cum[-1])]

    def request(self) -> common_pb2.GenerateRequest:
        a = self.args
        lo, hi = a.output_range
        sampling = common_pb2.SamplingParams(max_new_tokens=self.rng.randint(lo, hi), ignore_eos=True,
                                             temperature=a.temperature)
        req = common_pb2.GenerateRequest(adapter_id=self.adapter(), sampling=sampling)
        if a.prompt_range:
            n = self.rng.randint(max(a.prompt_range[0], 1), a.prompt_range[1])
            req.prompt_token_ids.extend(self.rng.randrange(2, a.token_id_max) for _ in range(n))
        else:
            req.prompt = a.prompt
        return req


async def _one(stub, req, t_run: float, timeout: float) -> Result:
    t0 = time.perf_counter()
    r = Result(start=t0 - t_run, adapter=req.adapter_id)
    last = t0
    try:
        async for chunk in stub.GenerateStream(req, timeout=timeout):
            now = time.perf_counter()
            n = len(chunk.token_ids)
            if n:
                if r.ttft is None:
                    r.ttft = now - t0
                    r.itl += [0.0] * (n - 1)
                else:
                    r.itl += [(now - last) / n] * n
                last = now
                r.tokens += n
            r.executor = chunk.executor_id or r.executor
    except grpc.aio.AioRpcError as exc:
        r.code, r.detail = exc.code().name, exc.details() or ""
    r.e2e = time.perf_counter() - t0
    return r


def _stubs(args, channels):
    if args.executor:
        return [executor_pb2_grpc.ExecutorStub(c) for c in channels]
    return [router_pb2_grpc.RouterStub(c) for c in channels]


async def run(args, progress=None) -> list[Result]:
    """Send the workload; one Result per request, in arrival order."""
    work = Workload(args)
    requests = [work.request() for _ in range(args.requests)]
    targets = args.executor or [args.router]
    channels = [aio_channel(t, args.security) for t in targets]
    stubs = _stubs(args, channels)
    results: list[Result | None] = [None] * len(requests)
    t_run = time.perf_counter()

    async def send(i: int) -> None:
        results[i] = await _one(stubs[i % len(stubs)], requests[i], t_run, args.timeout)
        if progress is not None:
            progress(results[i])

    try:
        if args.rate > 0:
            arrivals = random.Random(args.seed + 1)
            tasks, t_next = [], time.perf_counter()
            for i in range(len(requests)):
                delay = t_next - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(i)))
                t_next += arrivals.expovariate(args.rate)
            await asyncio.gather(*tasks)
        else:
            counter = iter(range(len(requests)))

            async def client() -> None:
                for i in counter:
                    await send(i)

            await asyncio.gather(*(client() for _ in range(min(args.concurrency, len(requests)))))
    finally:
        for c in channels:
            await c.close()
    return results


def percentile(values, q: float) -> float:
    """The nearest-rank q-quantile (q in [0, 1]) of a non-empty sequence: the value at rank
    ceil(q * n), 1-based (p50 of 1..10 is 5, p90 is 9, p100 the maximum). The one percentile helper
    of the CLI and the benchmarks."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PCTS}
    return {f"p{p}": percentile(values, p / 100) for p in PCTS}


def report(results: list[Result], args, wall: float) -> dict:
    ok = [r for r in results if r.code == "OK"]
    tokens = sum(r.tokens for r in ok)
    errors = collections.Counter(r.code for r in results if r.code != "OK")
    return {
        "requests": len(results), "completed": len(ok), "errors": dict(sorted(errors.items())),
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "executors": dict(sorted(collections.Counter(r.executor for r in ok).items())),
        "config": {"target": args.executor or args.router, "adapters": len(args.adapter) or args.adapters,
                   "zipf": args.zipf, "rate": args.rate or None,
                   "concurrency": None if args.rate else args.concurrency,
                   "prompt_len": args.prompt_len or None, "output_len": list(args.output_range),
                   "seed": args.seed},
    }


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def print_report(rep: dict, out=sys.stdout) -> None:
    c = rep["config"]
    load = f"rate {c['rate']}/s (Poisson)" if c["rate"] else f"concurrency {c['concurrency']}"
    print(f"requests {rep['requests']}  completed {rep['completed']}  {load}  adapters {c['adapters']} "
          f"(zipf {c['zipf']})", file=out)
    print(f"throughput {rep['output_tokens_per_s']:.1f} output tok/s  {rep['requests_per_s']:.2f} req/s  "
          f"wall {rep['wall_s']:.2f} s", file=out)
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("e2e", "e2e_s")):
        p = rep[key]
        print(f"{name:<5} ms  p50 {_ms(p['p50'])}  p90 {_ms(p['p90'])}  p99 {_ms(p['p99'])}", file=out)
    if rep["errors"]:
        print("errors  " + "  ".join(f"{k} {v}" for k, v in rep["errors"].items()), file=out)
    if len(rep["executors"]) > 1:
        print("served  " + "  ".join(f"{k} {v}" for k, v in rep["executors"].items()), file=out)


def plot(results: list[Result], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ok = [r for r in results if r.code == "OK"]
    ax.scatter([r.start for r in ok], [r.e2e * 1e3 for r in ok], s=6, label="end-to-end")
    ax.scatter([r.start for r in ok if r.ttft is not None], [r.ttft * 1e3 for r in ok if r.ttft is not None],
               s=6, label="time to first token")
    bad = [r for r in results if r.code != "OK"]
    if bad:
        ax.scatter([r.start for r in bad], [r.e2e * 1e3 for r in bad], s=12, marker="x", label="error")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    from services.bench_setup import BenchSetupError, plot_path, register_synthetic, wait_ready
    try:
        wait_ready(args)
        if args.synthetic_adapters:
            register_synthetic(args)
        if args.plot:
            args.plot = plot_path(args)
    except BenchSetupError as exc:
        print(f"openlora bench: {exc}", file=sys.stderr)
        return 1
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.requests, unit="req", file=sys.stderr, dynamic_ncols=True)
    errors = collections.Counter()

    def progress(r: Result) -> None:
        if r.code != "OK":
            errors[r.code] += 1
        if bar is not None:
            bar.update(1)
            if errors:
                bar.set_postfix(errors=sum(errors.values()))

    t0 = time.perf_counter()
    results = asyncio.run(run(args, progress))
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    rep = report(results, args, wall)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps(rep))
    else:
        print_report(rep)
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr)
    if not rep["completed"]:
        from services.bench_setup import why_all_failed
        print(f"openlora bench: {why_all_failed(results, args)}", file=sys.stderr)
        return 1
    return 0
