"""openlora services as subprocesses on this machine: start one, wait until it serves, stop it.

The one harness `openlora up` (services/up.py), the tests (tests/servers.py re-exports it) and the
benchmarks use: ports, health probes, waiting with a deadline, launching with a log, stopping, and a
registry + executor + router deployment. It imports no torch (the registry and router never do).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
# fast reconnects while a service comes up (gRPC's default backoff grows to minutes, so a slow
# executor start used to cost another 10-26 s after it was already listening)
PROBE_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                 ("grpc.max_reconnect_backoff_ms", 250)]


def cli_command(kind: str, *args: str) -> list[str]:
    """`openlora KIND ARGS...` as this interpreter runs it (the checkout's or the installed package)."""
    return [sys.executable, "-m", "services.cli", kind, *args]


# --- ports ---

def free_port(host: str = "127.0.0.1") -> int:
    """A port the system calls free now (another process may still take it before it is used)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """A port P with P..P+n-1 all free now (`openlora up` takes --port and the next ones)."""
    for _ in range(200):
        base = free_port(host)
        if base + n > 65535:
            continue
        if all(port_taken(host, port) is None for port in range(base, base + n)):
            return base
    raise RuntimeError(f"no block of {n} free ports")


def port_taken(host: str, port: int) -> OSError | None:
    """None when a server could listen on host:port now, else the bind's error.

    SO_REUSEADDR, as the servers themselves bind: a port whose only sockets are an earlier run's
    connections in TIME_WAIT is free (without it `up` refused to start for a minute after Ctrl-C);
    a live listener still makes the bind fail."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc
    return None


# --- health ---

class HealthProbe:
    """gRPC health checks of one address over one kept channel (reconnecting fast while the server
    comes up); `security`: a services.common.tls.ClientSecurity for a TLS or token-checking server."""

    def __init__(self, address: str, security=None, service: str = ""):
        from services.common.tls import channel
        self.address, self.service = address, service
        self._channel = channel(address, security, options=PROBE_OPTIONS)
        self._stub = health_pb2_grpc.HealthStub(self._channel)

    def status(self, timeout: float = 1.0) -> int | None:
        """The health status, or None when nothing answers."""
        try:
            return self._stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=timeout,
                                    wait_for_ready=False).status
        except grpc.RpcError:
            return None

    def serving(self, timeout: float = 1.0) -> bool:
        return self.status(timeout) == SERVING

    def not_serving(self, timeout: float = 1.0) -> str | None:
        """None when SERVING, else why not: the status's name, or the failed check's code and details."""
        try:
            status = self._stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=timeout,
                                      wait_for_ready=False).status
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return None if status == SERVING else health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> HealthProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def health(address: str, service: str = "", security=None, timeout: float = 1.0) -> int | None:
    """The health status of `address` (one check), or None when it does not answer."""
    with HealthProbe(address, security, service) as probe:
        return probe.status(timeout)


def http_ok(url: str, timeout: float = 1.0, context=None) -> bool:
    """GET url answers 200 (an ssl `context` for https)."""
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return reply.status == 200
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], timeout_s: float, check: Callable[[], None] | None = None,
               interval_s: float = 0.1) -> bool:
    """Poll until ready() is true (True) or timeout_s passes (False); check(), called before each
    poll, may raise to stop waiting (a process that exited)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        if ready():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


# --- processes ---

def launch(cmd: list[str], log_path=None, env: dict | None = None,
           own_session: bool = False) -> tuple[subprocess.Popen, int]:
    """Start cmd, its stdout and stderr appended to log_path (else discarded), stdin closed, with
    os.environ plus `env`; in a session of its own if `own_session` (a terminal's Ctrl-C then reaches
    the caller alone, and kill() takes its children too). Returns (the process, the log's size
    before it: where this run's lines start)."""
    full_env = {**os.environ, **(env or {})}
    if log_path is None:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=own_session, env=full_env), 0
    with open(log_path, "ab") as out:
        start = out.tell()
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=own_session, env=full_env)
    return popen, start


def kill(popen: subprocess.Popen) -> None:
    """SIGKILL the process (with its process group when it leads one: a compiler it runs) and reap it."""
    if popen.poll() is None:
        try:
            if os.getpgid(popen.pid) != popen.pid:
                raise ProcessLookupError
            os.killpg(popen.pid, signal.SIGKILL)
        except OSError:
            popen.kill()
    popen.wait()


def stop(popen: subprocess.Popen, grace_s: float = 15.0) -> int:
    """SIGTERM (a service drains and exits 0), SIGKILL after grace_s; returns the exit code."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            return popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            kill(popen)
    return popen.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process pid so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of process pid now, MiB (nan when it has none: exited)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_serving(proc: subprocess.Popen, address: str, what: str, timeout: float = 180,
                 security=None, log_path=None) -> None:
    """Wait until the process that is to serve `address` answers health SERVING; RuntimeError if it
    exits first, TimeoutError (and killed) past `timeout` s."""
    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting"
                               + (f"; log: {log_path}" if log_path else ""))
    with HealthProbe(address, security) as probe:
        if wait_until(probe.serving, timeout, check=alive):
            return
    kill(proc)
    raise TimeoutError(f"{what} on {address} not SERVING after {timeout}s")


class Service:
    """`openlora <kind> --port P ...` running in a subprocess; started when it serves: health SERVING,
    or for the gateway GET /health answering 200 (over HTTPS with `https`, an ssl.SSLContext)."""

    def __init__(self, kind: str, *args: str, port: int | None = None, env: dict | None = None,
                 log_path=None, security=None, https=None):
        self.kind = kind
        self.security, self.https = security, https
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if https else 'http'}://{self.address}"     # the gateway's
        self.args = cli_command(kind, "--port", str(self.port), *args)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> Service:
        self.proc, _ = launch(self.args, self.log_path, self.env)
        if self.kind != "gateway":
            wait_serving(self.proc, self.address, self.kind, timeout, self.security, self.log_path)
            return self

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode} while starting"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
        if not wait_until(lambda: http_ok(self.url + "/health", context=self.https), timeout, check=alive):
            kill(self.proc)
            raise TimeoutError(f"gateway on {self.url} not answering after {timeout}s")
        return self

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None:
            kill(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def register_adapters(registry_address: str, adapters: dict[str, object], timeout: float = 60,
                      security=None) -> None:
    """Register each adapter id -> PEFT directory with the registry as a file:// source."""
    from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
    from services.common.tls import channel

    with channel(registry_address, security) as ch:
        stub = registry_pb2_grpc.AdapterRegistryStub(ch)
        for adapter_id, path in adapters.items():
            stub.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                adapter_id=adapter_id, source=f"file://{path}"), timeout=timeout)


@contextlib.contextmanager
def deployment(tmp_path, base_model, adapters: dict[str, object]) -> Iterator[tuple[Service, Service, Service]]:
    """A registry, an executor serving base_model and a router, each a subprocess logging under
    tmp_path, with `adapters` (adapter id -> PEFT directory) registered; stopped on the way out."""
    tmp_path = pathlib.Path(tmp_path)
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
