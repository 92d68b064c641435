"""Deleted means gone: a version deleted through the registry leaves every tier of a real executor
at once (device pages, host arena, disk copy), not when pressure evicts it, and GetStatus never
reports a deleted version held. Registry and executor are real servers on loopback; the executor
runs a CPU device tier (--device-cache-bytes) so all three tiers hold copies."""

from __future__ import annotations

import time

import grpc

from services.common.gen.openlora.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import Service

ID = "t/churn"


def held(ex) -> dict[int, int]:
    """version -> tier of every copy of ID the executor reports."""
    st = ex.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
    return {a.version: a.tier for a in st.adapters if a.adapter_id == ID}


def wait_for(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def generate(ex, version: int, n: int) -> None:
    r = ex.Generate(common_pb2.GenerateRequest(
        request_id=f"g{version}-{n}", adapter_id=ID, adapter_version=version, prompt_token_ids=[3, 5, 7],
        sampling=common_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True)), timeout=60)
    assert len(r.token_ids) == 2


def test_deleted_versions_leave_every_tier_at_once(tmp_path, llama_dir):
    disk = tmp_path / "disk"
    reg = Service("registry", "--data-dir", str(tmp_path / "registry"),
                  log_path=tmp_path / "registry.log").start()
    exe = None
    try:
        exe = Service("executor", "--registry", reg.address, "--base-model", str(llama_dir),
                      "--device", "cpu", "--disk-cache-dir", str(disk), "--device-cache-bytes", str(4 << 20),
                      "--host-cache-bytes", str(8 << 20), log_path=tmp_path / "executor.log").start()
        with grpc.insecure_channel(reg.address) as rc, grpc.insecure_channel(exe.address) as ec:
            registry = registry_pb2_grpc.AdapterRegistryStub(rc)
            ex = executor_pb2_grpc.ExecutorStub(ec)
            copies = disk / "t%2Fchurn"
            for v in range(1, 5):
                path = write_adapter(tmp_path / f"v{v}", TINY["llama"], AdapterSpec(rank=4, seed=900 + v))
                meta = registry.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                    adapter_id=ID, source=f"file://{path}"), timeout=30)
                assert meta.version == v
                wait_for(lambda v=v: generate(ex, 0, v) or held(ex).get(v), f"v{v} served as latest")
                if v > 1:
                    generate(ex, v - 1, v)          # the superseded version, pinned by number
                    assert set(held(ex)) == {v - 1, v} and (copies / str(v - 1)).exists()
                    registry.DeleteAdapter(registry_pb2.DeleteAdapterRequest(adapter_id=ID, version=v - 1),
                                           timeout=10)
                    wait_for(lambda v=v: set(held(ex)) == {v} and not (copies / str(v - 1)).exists(),
                             f"deleted v{v - 1} gone from every tier")
                assert held(ex) == {v: executor_pb2.ADAPTER_TIER_DEVICE}
            registry.DeleteAdapter(registry_pb2.DeleteAdapterRequest(adapter_id=ID), timeout=10)
            wait_for(lambda: not held(ex) and not any(copies.glob("*/*")), "every version gone")
            st = ex.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
            assert st.host_cache_used_bytes == 0 and st.device_cache_used_bytes == 0
            tiers = {t.tier: t for t in st.tier_stats}
            assert all(t.adapters == 0 and t.bytes_used == 0 for t in tiers.values()), st.tier_stats
    finally:
        if exe is not None:
            exe.stop()
        reg.stop()
