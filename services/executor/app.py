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


def disk_cache_dir(config: ExecutorConfig) -> pathlib.Path:
    """--disk-cache-dir, else a stable directory per executor, reused across restarts (bounded by
    --disk-cache-bytes): $XDG_CACHE_HOME/openlora/adapters/<--executor-id or HOST_PORT>. Only an
    executor on an ephemeral port (--port 0: tests) gets a temporary one, removed when it exits (each
    start used to make a new temporary directory and never remove it)."""
    if config.disk_cache_dir:
        return pathlib.Path(config.disk_cache_dir)
    if config.port == 0 and not config.executor_id:
        import atexit
        import shutil
        path = pathlib.Path(tempfile.mkdtemp(prefix="openlora-adapters-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return path
    import os
    import re
    name = re.sub(r"[^A-Za-z0-9._-]", "_", config.executor_id or f"{config.host}_{config.port}")
    root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    path = root / "openlora" / "adapters" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


async def build(config: ExecutorConfig):
    """Create the server (NOT_SERVING), load the engine, then flip to SERVING. Returns (server, engine)."""
    from services.executor.engine import Engine
    from services.executor.servicer import ExecutorServicer

    disk = disk_cache_dir(config)
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
    server.drain_hook = holder.drain   # GenerateStreams calls end when their requests have
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
        await server.run_until_signal(config.grace_seconds, on_drain=server.drain_hook)
    finally:
        if server.watch is not None:
            await server.watch.close()
        await asyncio.to_thread(engine.stop)
