"""`openlora registry`: build the core from RegistryConfig, serve it until SIGTERM."""

from __future__ import annotations

import pathlib

import structlog

from services.common.memory import tune_malloc
from services.common.server import Service, Server, create_server
from services.registry.config import RegistryConfig
from services.registry.core import AdapterRegistry
from services.registry.metrics import RegistryMetrics
from services.registry.servicer import AdapterRegistryServicer, add_to_server
from services.registry.stores.blobs_fs import FsBlobStore
from services.registry.stores.metadata_sqlite import SqliteMetadataStore

log = structlog.get_logger(__name__)
SERVICE_NAME = "openlora.v1.AdapterRegistry"


def build_core(config: RegistryConfig) -> AdapterRegistry:
    data = pathlib.Path(config.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    core = AdapterRegistry(SqliteMetadataStore(str(data / "registry.db")),
                           FsBlobStore(data / "blobs"), config.max_adapter_bytes,
                           work_dir=data / "work")
    core.recover()
    return core


async def start(config: RegistryConfig) -> tuple[Server, int, AdapterRegistry]:
    """Build and start a registry server (tests use this in-process)."""
    core = build_core(config)
    metrics = RegistryMetrics(core.metadata)
    servicer = AdapterRegistryServicer(core, metrics)
    server, port = await create_server(config, [Service(SERVICE_NAME, servicer, add_to_server)])
    await server.start()
    if config.metrics_port:
        metrics.serve_http(config.host, config.metrics_port)
    log.info("registry_serving", host=config.host, port=port, data_dir=config.data_dir,
             metrics_port=config.metrics_port or None)
    return server, port, core


async def serve(config: RegistryConfig) -> None:
    tune_malloc()
    server, _, core = await start(config)
    try:
        await server.run_until_signal(config.grace_seconds)
    finally:
        core.metadata.close()
