"""Real openlora servers as subprocesses on loopback ports, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A port P with P..P+n-1 all free now (`openlora up` takes --port and the next ones)."""
    for _ in range(200):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


def health(address: str, service: str = "", security=None) -> int | None:
    """The health status of `address`, or None when it does not answer (`security`: a
    services.common.tls.ClientSecurity for a TLS server)."""
    from services.common.tls import channel
    with channel(address, security) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process pid so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_serving(proc: subprocess.Popen, address: str, what: str, timeout: float = 180,
                 security=None, log_path=None) -> None:
    """Wait until the process that is to serve `address` answers health SERVING; RuntimeError if it
    exits first, TimeoutError (and killed) past `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting"
                               + (f"; log: {log_path}" if log_path else ""))
        if health(address, security=security) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"{what} on {address} not SERVING after {timeout}s")


GOCODE = pathlib.Path("/usr/share/gocode")          # Debian's Go sources (golang-*-dev packages)


def go_build(gopath: pathlib.Path, package: str, binary: pathlib.Path) -> subprocess.CompletedProcess:
    """`go build` of `package` under gopath with Debian's Go sources behind it (GOPATH mode: no
    module downloads)."""
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:{GOCODE}", "GOFLAGS": "",
           "GOCACHE": os.environ.get("GOCACHE") or str(pathlib.Path.home() / ".cache" / "go-build")}
    return subprocess.run(["go", "build", "-o", str(binary), package], env=env,
                          capture_output=True, text=True, timeout=600)


class Service:
    """`openlora <kind> --port P ...` running in a subprocess."""

    def __init__(self, kind: str, *args: str, port: int | None = None, env: dict | None = None,
                 log_path=None, security=None):
        self.kind = kind
        self.security = security
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "services.cli", kind, "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> Service:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log)
        wait_serving(self.proc, self.address, self.kind, timeout, self.security, self.log_path)
        return self

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate(timeout=15)
            self.kill()


def register_adapters(registry_address: str, adapters: dict[str, object], timeout: float = 60) -> None:
    """Register each adapter id -> PEFT directory with the registry as a file:// source."""
    from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc

    with grpc.insecure_channel(registry_address) as ch:
        stub = registry_pb2_grpc.AdapterRegistryStub(ch)
        for adapter_id, path in adapters.items():
            stub.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                adapter_id=adapter_id, source=f"file://{path}"), timeout=timeout)


@contextlib.contextmanager
def deployment(tmp_path, base_model, adapters: dict[str, object]):
    """A registry, an executor serving base_model and a router, each a subprocess logging under
    tmp_path, with `adapters` (adapter id -> PEFT directory) registered; stopped on the way out."""
    registry = Service("registry", "--data-dir", str(tmp_path / "registry"),
                       log_path=tmp_path / "registry.log").start()
    executor = router = None
    try:
        executor = Service("executor", "--registry", registry.address, "--base-model", str(base_model),
                           "--disk-cache-dir", str(tmp_path / "disk"),
                           log_path=tmp_path / "executor.log").start()
        router = Service("router", "--registry", registry.address, "--executor", executor.address,
                         log_path=tmp_path / "router.log").start()
        register_adapters(registry.address, adapters)
        yield registry, executor, router
    finally:
        for s in (router, executor, registry):
            if s is not None:
                s.stop()
