"""Issue 2: generated stubs, config/flags, server scaffolding (health, reflection, error mapping)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import errors
from services.common.config import ConfigError, ServerConfig
from services.common.gen.openlora.v1 import executor_pb2, executor_pb2_grpc
from services.common.server import Service, create_server
from services.executor.config import ExecutorConfig


def test_generated_stubs_are_fresh():
    proc = subprocess.run([sys.executable, "-m", "services.common.protogen", "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_contract_rpc_is_in_the_protos():
    from services.common.gen.openlora.v1 import registry_pb2, router_pb2
    services = {
        "AdapterRegistry": (registry_pb2, {"RegisterAdapter", "UploadAdapter", "GetAdapter",
                                           "ListAdapters", "DeleteAdapter", "FetchAdapter",
                                           "WatchAdapters"}),
        "Executor": (executor_pb2, {"Generate", "GenerateStream", "LoadAdapter", "UnloadAdapter",
                                    "GetStatus", "GenerateStreams"}),   # + the router's multiplexed call
        "Router": (router_pb2, {"Generate", "GenerateStream", "ListExecutors", "GenerateStreams"}),
    }
    for name, (module, rpcs) in services.items():
        svc = module.DESCRIPTOR.services_by_name[name]
        assert svc.full_name == f"openlora.v1.{name}"
        assert {m.name for m in svc.methods} == rpcs


def _cli(*args, env=None):
    import os
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=60)


@pytest.mark.parametrize("args, env, flag", [
    (["registry", "--port", "x", "--data-dir", "/tmp/d"], {}, "--port"),
    (["registry", "--port", "70000", "--data-dir", "/tmp/d"], {}, "--port"),
    (["registry"], {}, "--data-dir"),
    (["registry", "--data-dir", "/tmp/d"], {"OPENLORA_PORT": "abc"}, "OPENLORA_PORT"),
    (["executor", "--base-model", "m", "--max-batch-size", "0"], {}, "--max-batch-size"),
    (["executor", "--base-model", "m", "--device", "tpu"], {}, "--device"),
    (["executor"], {"OPENLORA_DTYPE": "int3"}, "--dtype"),
    (["executor", "--base-model", "m", "--device", "cpu", "--dtype", "float16"], {}, "--dtype"),
    (["router"], {}, "--executor"),
    (["registry", "--data-dir", "/tmp/d", "--bogus", "1"], {}, "--bogus"),
])
def test_bad_flags_give_one_line_and_exit_2(args, env, flag):
    proc = _cli(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], proc.stderr


def test_env_variables_feed_flags():
    import os

    from services.cli import build_parser
    from services.common.config import from_args
    os.environ["OPENLORA_MAX_BATCH_SIZE"] = "7"
    try:
        ns = build_parser().parse_args(["executor", "--base-model", "m"])
    finally:
        del os.environ["OPENLORA_MAX_BATCH_SIZE"]
    assert from_args(ExecutorConfig, ns).max_batch_size == 7


def test_config_checks_name_the_flag():
    with pytest.raises(ConfigError, match="--grace-seconds"):
        ServerConfig(grace_seconds=-1)


class _Failing(executor_pb2_grpc.ExecutorServicer):
    """Raises the domain exception named in the request's adapter id."""

    async def LoadAdapter(self, request, context):
        exc = getattr(errors, request.adapter_id)
        raise exc("adapter x: what went wrong, and what to do")


def _run(coro):
    return asyncio.run(coro)


def test_server_health_reflection_and_error_mapping():
    async def scenario():
        server, port = await create_server(
            ServerConfig(port=0), [Service("openlora.v1.Executor", _Failing(),
                                           executor_pb2_grpc.add_ExecutorServicer_to_server)],
            serving=False)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)
                for name in ("", "openlora.v1.Executor"):
                    r = await health.Check(health_pb2.HealthCheckRequest(service=name))
                    assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
                await server.set_serving(True)
                r = await health.Check(health_pb2.HealthCheckRequest(service="openlora.v1.Executor"))
                assert r.status == health_pb2.HealthCheckResponse.SERVING

                refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                call = refl.ServerReflectionInfo()
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                resp = await call.read()
                await call.done_writing()
                names = {s.name for s in resp.list_services_response.service}
                assert {"openlora.v1.Executor", "grpc.health.v1.Health"} <= names

                stub = executor_pb2_grpc.ExecutorStub(ch)
                cases = {"AdapterNotFound": grpc.StatusCode.NOT_FOUND,
                         "InvalidAdapter": grpc.StatusCode.INVALID_ARGUMENT,
                         "AdapterMismatch": grpc.StatusCode.FAILED_PRECONDITION,
                         "QueueFull": grpc.StatusCode.RESOURCE_EXHAUSTED,
                         "Unavailable": grpc.StatusCode.UNAVAILABLE,
                         "ZeroDivisionError": grpc.StatusCode.INTERNAL}
                for name, code in cases.items():
                    if not hasattr(errors, name):
                        setattr(errors, name, ZeroDivisionError)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.LoadAdapter(executor_pb2.LoadAdapterRequest(adapter_id=name))
                    assert info.value.code() == code
                    if code != grpc.StatusCode.INTERNAL:
                        assert "what to do" in info.value.details()
                delattr(errors, "ZeroDivisionError")
                # an RPC the servicer does not implement stays UNIMPLEMENTED
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetStatus(executor_pb2.GetStatusRequest())
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(0)

    _run(scenario())


def test_registry_and_router_never_import_torch():
    """Their container images (deploy/) ship without torch."""
    code = ("import sys, services.cli, services.registry.app, services.registry.admin, "
            "services.router.app; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'transformers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_executor_with_a_missing_model_says_so_and_exits_1(tmp_path):
    proc = _cli("executor", "--port", "0", "--base-model", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert "no such directory" in proc.stderr.strip().splitlines()[-1]
