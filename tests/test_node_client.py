"""Issue 14: a Node.js client generated from protos/ alone (@grpc/grpc-js + @grpc/proto-loader)
against a real deployment: registry + executor + router subprocesses on loopback."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import deployment

NODE_DIR = pathlib.Path(__file__).parent / "node"


def node_ready() -> str | None:
    """Why the Node packages cannot be used here, or None. .ci/run installs them; a checkout
    without them (a fresh worktree) gets them here from tests/node's lock file, once."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm is not installed"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir() or \
            not (NODE_DIR / "node_modules" / ".bin" / "buf").exists():
        proc = subprocess.run(["npm", "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return f"`npm install --prefix tests/node` failed: {proc.stderr.strip()[-500:]}"
    return None


@pytest.mark.slow
def test_node_client_watch_generate_stream_and_errors(llama_dir, tmp_path):
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    problem = node_ready()
    assert problem is None, problem
    adapter = write_adapter(tmp_path / "adapter", TINY["llama"], AdapterSpec(seed=301))
    with deployment(tmp_path, llama_dir, {"node/a": adapter}) as (registry, executor, router):
        proc = subprocess.run(["node", str(NODE_DIR / "client.js"), router.address, "node/a"],
                              capture_output=True, text=True, timeout=180)
        # health Watch (what clients with health checking turned on call) on every service; it failed
        # with INTERNAL everywhere before (issue 14)
        for service, name in ((registry, "openlora.v1.AdapterRegistry"), (executor, "openlora.v1.Executor"),
                              (router, "openlora.v1.Router")):
            for asked in ("", name):
                with grpc.insecure_channel(service.address) as ch:
                    watch = health_pb2_grpc.HealthStub(ch).Watch(
                        health_pb2.HealthCheckRequest(service=asked), timeout=30)
                    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING, (name, asked)
                    watch.cancel()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["watch"] == "SERVING"
    assert out["generate"]["code"] == 0 and out["generate"]["tokens"] == 8
    assert out["generate"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert out["stream"]["text"] == out["generate"]["text"] and out["stream"]["chunks"] >= 1
    assert out["stream"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert out["not_found"]["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert out["not_found"]["has_status_details"]
    assert out["invalid"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "prompt" in out["invalid"]["message"]
