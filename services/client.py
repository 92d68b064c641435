"""`openlora generate` and `openlora bench`: clients of the router (or of one executor directly)."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import time

import grpc

from services.common.config import OneLineParser
from services.common.gen.openlora.v1 import (common_pb2, executor_pb2_grpc, router_pb2_grpc)
from services.common.tls import add_client_flags, channel_from_args

DEFAULT_ROUTER = "127.0.0.1:50050"


def _target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default=os.environ.get("OPENLORA_ROUTER", DEFAULT_ROUTER),
                   help="router address [env OPENLORA_ROUTER]")
    p.add_argument("--executor", default=os.environ.get("OPENLORA_EXECUTOR", ""),
                   help="talk to one executor directly instead of the router")
    add_client_flags(p)


def _stub(args, channel):
    if args.executor:
        return executor_pb2_grpc.ExecutorStub(channel)
    return router_pb2_grpc.RouterStub(channel)


def _request(args, prompt: str) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        adapter_id=args.adapter, prompt=prompt,
        sampling=common_pb2.SamplingParams(max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature))


def generate_main(argv: list[str]) -> int:
    p = OneLineParser(prog="openlora generate", description="Generate text through the router.")
    _target_flags(p)
    p.add_argument("--adapter", default="", help="adapter id (default: base model)")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("prompt")
    args = p.parse_args(argv)
    with channel_from_args(args, args.executor or args.router, "openlora generate") as channel:
        stub = _stub(args, channel)
        try:
            if args.stream:
                for chunk in stub.GenerateStream(_request(args, args.prompt), timeout=600):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                print(stub.Generate(_request(args, args.prompt), timeout=600).text)
        except grpc.RpcError as exc:
            print(f"openlora generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def bench_main(argv: list[str]) -> int:
    p = OneLineParser(prog="openlora bench", description="Closed-loop load: N requests, C at a time.")
    _target_flags(p)
    p.add_argument("--adapter", action="append", default=[], help="adapter ids, used round-robin")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.")
    args = p.parse_args(argv)
    adapters = args.adapter or [""]
    with channel_from_args(args, args.executor or args.router, "openlora bench") as channel:
        stub = _stub(args, channel)

        def one(i: int) -> tuple[float, int]:
            args_i = argparse.Namespace(**{**vars(args), "adapter": adapters[i % len(adapters)]})
            t0 = time.perf_counter()
            resp = stub.Generate(_request(args_i, args.prompt), timeout=600)
            return time.perf_counter() - t0, len(resp.token_ids)

        t0 = time.perf_counter()
        try:
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
        except grpc.RpcError as exc:
            print(f"openlora bench: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    lat = sorted(t for t, _ in results)
    print(f"requests {args.requests}  concurrency {args.concurrency}  adapters {len(adapters)}")
    print(f"tokens/s {tokens / wall:.1f}  latency p50 {statistics.median(lat) * 1e3:.0f} ms  "
          f"p95 {lat[int(0.95 * (len(lat) - 1))] * 1e3:.0f} ms")
    return 0
