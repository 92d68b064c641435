"""`openlora up`: a whole deployment on one machine — registry, N executors, a router and the gateway.

Ports: the router on --port (the one clients use), the registry on --port+1, executors on
--port+2 ... With no --base-model it serves a small built-in demo model with random weights, written
under --data-dir on first start, so it runs on a machine with no network.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import check, flag, parse_config

DEMO = "demo-model"


@dataclass(slots=True)
class UpConfig:
    host: str = flag("127.0.0.1", "address every service listens on")
    port: int = flag(50050, "router port; the registry and executors take the next ones")
    data_dir: str = flag("./openlora-data", "registry data, executor disk caches, the demo model")
    base_model: str = flag("", "base model directory or hub id (empty -> the built-in demo model)")
    executors: int = flag(1, "how many executors")
    startup_timeout_s: float = flag(600.0, "how long each service may take to answer SERVING")
    http_port: int = flag(8000, "the OpenAI-compatible HTTP gateway's port (0 -> no gateway)")

    def __post_init__(self) -> None:
        check(1 <= self.executors <= 64, "executors", f"must be 1..64, got {self.executors}")
        check(0 < self.port < 65535 - self.executors - 1, "port", f"out of range: {self.port}")
        check(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
        check(0 <= self.http_port <= 65535, "http_port", f"must be 0..65535, got {self.http_port}")


def demo_model(data_dir: pathlib.Path) -> pathlib.Path:
    """The built-in demo model (random weights), written once."""
    from services.synthetic import ModelSpec, write_model
    path = data_dir / DEMO
    if not (path / "config.json").exists():
        print(f"openlora up: writing the demo model (RANDOM weights, for trying openlora out) to {path}",
              file=sys.stderr)
        write_model(path, ModelSpec(arch="llama", hidden=256, intermediate=688, layers=4, heads=8,
                                    kv_heads=4, vocab=1024, max_positions=2048, seed=0))
    return path


def wait_serving(address: str, timeout_s: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"openlora up: a service exited while starting ({address})")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"openlora up: {address} not SERVING after {timeout_s:.0f}s")


def wait_http(url: str, timeout_s: float, procs: list[subprocess.Popen]) -> None:
    """Until GET url answers 200 (the gateway's /health)."""
    import urllib.request
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"openlora up: a service exited while starting ({url})")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"openlora up: {url} not answering after {timeout_s:.0f}s")


def main(argv: list[str]) -> int:
    args = parse_config("openlora up", UpConfig, argv, __doc__.splitlines()[0])
    data = pathlib.Path(args.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    base = args.base_model or str(demo_model(data))
    h, port = args.host, args.port
    registry = f"{h}:{port + 1}"
    executors = [f"{h}:{port + 2 + i}" for i in range(args.executors)]
    cli = [sys.executable, "-m", "services.cli"]
    plan = [(registry, [*cli, "registry", "--host", h, "--port", str(port + 1),
                        "--data-dir", str(data / "registry")])]
    plan += [(addr, [*cli, "executor", "--host", h, "--port", addr.rsplit(":", 1)[1],
                     "--registry", registry, "--base-model", base,
                     "--disk-cache-dir", str(data / f"executor-{i}")])
             for i, addr in enumerate(executors)]
    plan.append((f"{h}:{port}", [*cli, "router", "--host", h, "--port", str(port),
                                 "--registry", registry,
                                 *[x for e in executors for x in ("--executor", e)]]))
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for address, cmd in plan:
            procs.append(subprocess.Popen(cmd))
            wait_serving(address, args.startup_timeout_s, procs)
        gateway = ""
        if args.http_port:
            procs.append(subprocess.Popen([*cli, "gateway", "--host", h, "--port", str(args.http_port),
                                           "--router", f"{h}:{port}", "--registry", registry,
                                           "--base-model", base if pathlib.Path(base).is_dir() else ""]))
            wait_http(f"http://{h}:{args.http_port}/health", args.startup_timeout_s, procs)
            gateway = f"  gateway http://{h}:{args.http_port}/v1"
        print(f"openlora up: router {h}:{port}  registry {registry}  executors {' '.join(executors)}"
              f"{gateway}", file=sys.stderr, flush=True)
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0 if stopping else 1
