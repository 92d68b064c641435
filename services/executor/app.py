"""`openlora executor`: load the model, build the kernel, then answer SERVING."""

from __future__ import annotations

import asyncio
import pathlib
import tempfile

import structlog

from services.common.gen.openlora.v1 import executor_pb2_grpc
from services.common.server import Service, StartupError, create_server
from services.common.tls import ClientSecurity
from services.executor.config import ExecutorConfig
from services.executor.metrics import ExecutorMetrics
from services.executor.registry_source import DiskAdapterStore, RegistryAdapterSource
from services.executor.watch import start_executor_watch

log = structlog.get_logger(__name__)
SERVICE = "openlora.v1.Executor"


async def build(config: ExecutorConfig):
    """Create the server (NOT_SERVING), load the engine, then flip to SERVING. Returns (server, engine)."""
    from services.executor.engine import Engine
    from services.executor.servicer import ExecutorServicer

    disk = pathlib.Path(config.disk_cache_dir or tempfile.mkdtemp(prefix="openlora-adapters-"))
    store = DiskAdapterStore(disk, config.disk_cache_bytes, config.adapter_eviction_policy)
    direct = None
    if config.blob_url:
        from services.executor.blob_direct import DirectBlobReader
        direct = DirectBlobReader(config.blob_url, concurrency=config.blob_read_concurrency)
    source = RegistryAdapterSource(config.registry, store, config.registry_timeout_s, direct=direct,
                                   security=ClientSecurity.from_config(config))
    metrics = ExecutorMetrics(max_lora=config.max_device_adapters)
    from services.router.registry_check import AdapterCheck
    public_check = AdapterCheck(config.registry, security=ClientSecurity.from_config(config)) \
        if config.registry else None
    holder = ExecutorServicer(engine=None, executor_id="",   # the engine is set once loaded
                              host_cache_bytes=config.host_cache_bytes, metrics=metrics,
                              adapters=public_check)
    server, port = await create_server(
        config, [Service(SERVICE, holder, executor_pb2_grpc.add_ExecutorServicer_to_server)],
        serving=False)
    holder.executor_id = config.executor_id or f"{config.host}:{port}"
    server.handle_signals()   # a SIGTERM while the model loads still exits 0
    await server.start()
    if config.metrics_port:
        metrics.serve_http(config.host, config.metrics_port)
    log.info("executor_loading", port=port, base_model=config.base_model)
    try:
        engine = await asyncio.to_thread(Engine, config, source)
    except Exception as exc:
        await server.stop(0)
        raise StartupError(f"cannot load the base model: {exc}") from exc
    engine.start()
    holder.engine = engine
    metrics.engine = engine
    engine.metrics = metrics
    engine.adapter_load_observer = metrics.observe_adapter_load   # load latency by source tier
    server.watch = start_executor_watch(config.registry, engine, ClientSecurity.from_config(config),
                                        max_backoff_s=config.registry_watch_max_backoff_s)
    await server.set_serving(True)
    log.info("executor_serving", port=port, executor_id=holder.executor_id,
             metrics_port=config.metrics_port or None)
    return server, engine


async def serve(config: ExecutorConfig) -> None:
    server, engine = await build(config)
    try:
        await server.run_until_signal(config.grace_seconds)
    finally:
        if server.watch is not None:
            await server.watch.close()
        await asyncio.to_thread(engine.stop)
