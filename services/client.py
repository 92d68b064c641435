"""`openlora generate` (and `openlora bench`, in services/bench.py): clients of the router (or of one
executor directly)."""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from services.common.config import OneLineParser
from services.common.gen.openlora.v1 import common_pb2, executor_pb2_grpc, router_pb2_grpc
from services.common.tls import add_client_flags, channel_from_args

DEFAULT_ROUTER = "127.0.0.1:50050"


def _target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default=os.environ.get("OPENLORA_ROUTER", DEFAULT_ROUTER),
                   help="router address [env OPENLORA_ROUTER]")
    p.add_argument("--executor", type=first_address, default=os.environ.get("OPENLORA_EXECUTOR", ""),
                   help="talk to one executor HOST:PORT directly instead of the router [env "
                        "OPENLORA_EXECUTOR: the router's comma-separated list; the first is used]")
    add_client_flags(p)


def first_address(value: str) -> str:
    """OPENLORA_EXECUTOR (or --executor) as a client reads it: the router takes a comma-separated
    list of executors, a client talks to one, the list's first ("a:1, b:2" -> "a:1")."""
    return next((part.strip() for part in value.split(",") if part.strip()), "")


def _count(minimum: int):
    """argparse type: an integer >= minimum (a bad one is argparse's one-line error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def split_adapter(ref: str) -> tuple[str, int]:
    """"team/sql@3" -> ("team/sql", 3); "team/sql" -> ("team/sql", 0), 0 meaning the latest."""
    adapter_id, at, version = ref.rpartition("@")
    if not at:
        return ref, 0
    if not version.isdigit() or int(version) < 1:
        raise argparse.ArgumentTypeError(f"{ref!r}: the version after @ must be an integer >= 1")
    return adapter_id, int(version)


def not_ready_hint(address: str, command: str) -> str:
    """What to do when nothing serves at address yet (a deployment still starting, or none)."""
    return (f"If `openlora up` is starting, wait for its `ready` line (a first start compiles the kernels, "
            f"20-180 s) or pass --wait 600 to `openlora {command}`; else start it, or name the address "
            f"serving with --router. Nothing answered at {address}.")


def wait_serving(address: str, security, seconds: float) -> None:
    """Until address's health check answers SERVING, at most `seconds` (then the call itself says)."""
    from services.common import harness
    with harness.HealthProbe(address, security) as probe:
        harness.wait_until(lambda: probe.serving(timeout=2), seconds, interval_s=0.5)


def _stub(args, channel):
    if args.executor:
        return executor_pb2_grpc.ExecutorStub(channel)
    return router_pb2_grpc.RouterStub(channel)


def _request(args, prompt: str) -> common_pb2.GenerateRequest:
    adapter_id, version = split_adapter(args.adapter)
    return common_pb2.GenerateRequest(
        adapter_id=adapter_id, adapter_version=version, prompt=prompt,
        sampling=common_pb2.SamplingParams(max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature))


def generate_main(argv: list[str]) -> int:
    p = OneLineParser(prog="openlora generate", description="Generate text through the router.")
    _target_flags(p)
    p.add_argument("--adapter", default="",
                   help="adapter id, optionally @version (team/sql@2); default: the base model alone")
    p.add_argument("--max-new-tokens", type=_count(0), default=0,
                   help="most tokens to generate (0 -> the server's default)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (0 -> greedy, the same text every time)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the router (or executor) to be ready")
    p.add_argument("prompt", help="the prompt text")
    args = p.parse_args(argv)
    try:
        split_adapter(args.adapter)
    except argparse.ArgumentTypeError as exc:
        p.error(f"argument --adapter: {exc}")
    if args.wait < 0:
        p.error(f"argument --wait: must be >= 0, got {args.wait:g}")
    target = args.executor or args.router
    if args.wait:
        from services.common.tls import ClientSecurity
        wait_serving(target, ClientSecurity.from_config(args), args.wait)
    with channel_from_args(args, target, "openlora generate") as channel:
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
            hint = f" {not_ready_hint(target, 'generate')}" if exc.code() == grpc.StatusCode.UNAVAILABLE \
                and _nothing_serving(exc) else ""
            print(f"openlora generate: {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
            return 1
    return 0


def _nothing_serving(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE because nothing answered (connection refused), not a server's own UNAVAILABLE
    (an executor down behind the router, a registry unreachable), which says what it is itself."""
    details = (exc.details() or "").lower()
    return "failed to connect" in details or "connection refused" in details or "unavailable" == details


def bench_main(argv: list[str]) -> int:
    """`openlora bench`: see services/bench.py."""
    from services.bench import main
    return main(argv)
