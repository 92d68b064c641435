"""`openlora up` supervises what it starts. Under 16 streaming clients through the router: kill -9
of the registry fails no request for a resident adapter and it is back within 30 s; kill -9 of one
of two executors fails at most the streams it was serving (each started before the kill), new
requests keep succeeding, and it is back within 30 s. Each time `up` says so in one line."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from services.common.gen.openlora.v1 import common_pb2, router_pb2_grpc
from tests.servers import free_port_block

pytestmark = pytest.mark.slow
ADAPTERS = ["demo/pirate", "demo/poet", "demo/sql", ""]


def _pid_serving(kind: str, port: int) -> int:
    """The pid of the `openlora KIND --port PORT` process (read from /proc, this test's own ports)."""
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"services.cli" in args and kind.encode() in args and str(port).encode() in args:
            return int(proc.name)
    raise AssertionError(f"no {kind} on port {port}")


class Load:
    """16 clients streaming through the router until stopped; each request's (start, end, code)."""

    def __init__(self, router: str, clients: int = 16):
        self.channel = grpc.insecure_channel(router)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.records: list[tuple[float, float, str, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]

    def client(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            adapter = ADAPTERS[(i + n) % len(ADAPTERS)]
            n += 1
            req = common_pb2.GenerateRequest(adapter_id=adapter, prompt="Hello there",
                                             sampling=common_pb2.SamplingParams(max_new_tokens=12))
            t0, code = time.monotonic(), "OK"
            try:
                for _ in self.stub.GenerateStream(req, timeout=60):
                    pass
            except grpc.RpcError as exc:
                code = exc.code().name
            self.records.append((t0, time.monotonic(), code, adapter))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)
        self.channel.close()


def _wait_line(err: pathlib.Path, text: str, after: int, timeout: float) -> float:
    """Seconds until `text` appears in up's stderr past byte `after`."""
    t0 = time.monotonic()
    while text not in err.read_text()[after:]:
        assert time.monotonic() - t0 < timeout, err.read_text()[after:]
        time.sleep(0.1)
    return time.monotonic() - t0


def test_up_restarts_a_killed_registry_or_executor_while_the_rest_keeps_serving(tmp_path):
    port = free_port_block(4)
    err = tmp_path / "up.err"
    # OPENLORA_ALLOW_LOCAL_DIR (up's --allow-local-dir) used to make the demo adapters unregistrable
    env = {**os.environ, "OPENLORA_ALLOW_LOCAL_DIR": str(tmp_path / "allowed")}
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--port", str(port), "--executors", "2",
                           "--http-port", "0", "--data-dir", str(tmp_path / "data")],
                          stdout=subprocess.DEVNULL, stderr=open(err, "wb"), env=env)
    try:
        _wait_line(err, "openlora up: ready", 0, 900)
        assert "registered demo adapters demo/pirate, demo/poet, demo/sql" in err.read_text()
        router = f"127.0.0.1:{port}"
        with Load(router, clients=4) as warm:        # every adapter resident on its executor
            time.sleep(3)
        assert warm.records and all(r[2] == "OK" for r in warm.records), warm.records

        # the registry: killed, no request fails (every adapter is resident), back within 30 s
        with Load(router) as load:
            time.sleep(2)
            mark = len(err.read_text())
            os.kill(_pid_serving("registry", port + 1), signal.SIGKILL)
            registry_back = _wait_line(err, "registry is back on", mark, 60)
            time.sleep(2)
        text = err.read_text()[mark:]
        assert "registry" in text and "exited with code -9" in text and "restarting it in" in text, text
        assert registry_back < 30, registry_back
        bad = [r for r in load.records if r[2] != "OK"]
        assert not bad and len(load.records) > 16, bad[:5]

        # one of two executors: killed mid-stream; only streams started before the kill fail
        with Load(router) as load:
            time.sleep(2)
            mark = len(err.read_text())
            killed_at = time.monotonic()
            os.kill(_pid_serving("executor", port + 3), signal.SIGKILL)
            back = _wait_line(err, "executor-1 is back on", mark, 60)
            time.sleep(2)
        assert back < 30, back
        bad = [r for r in load.records if r[2] != "OK"]
        after = [r for r in load.records if r[0] > killed_at]
        assert all(r[0] < killed_at for r in bad), [r for r in bad if r[0] >= killed_at][:5]
        assert len(bad) <= 16 and {r[2] for r in bad} <= {"UNAVAILABLE", "CANCELLED", "INTERNAL"}, bad[:5]
        assert len(after) > 16 and sum(r[2] == "OK" for r in after) == len(after)
        print(f"registry back in {registry_back:.1f} s, executor in {back:.1f} s; executor killed under 16 streams: {len(bad)} failed, "
              f"{len(after)} started after the kill all served")
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
    assert code == 0, err.read_text()[-3000:]
