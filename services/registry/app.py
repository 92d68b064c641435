"""`openlora registry`: build the core from RegistryConfig, serve it until SIGTERM."""

from __future__ import annotations

import ctypes
import os
import pathlib

import structlog

from services.common.server import Service, Server, create_server
from services.registry.config import RegistryConfig
from services.registry.core import AdapterRegistry
from services.registry.metrics import RegistryMetrics
from services.registry.servicer import AdapterRegistryServicer, add_to_server
from services.registry.stores.blobs_fs import FsBlobStore
from services.registry.stores.metadata_sqlite import SqliteMetadataStore

log = structlog.get_logger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3           # glibc mallopt parameters
SERVICE_NAME = "openlora.v1.AdapterRegistry"


def build_core(config: RegistryConfig) -> AdapterRegistry:
    data = pathlib.Path(config.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    core = AdapterRegistry(SqliteMetadataStore(str(data / "registry.db")),
                           FsBlobStore(data / "blobs"), config.max_adapter_bytes,
                           work_dir=data / "work")
    core.recover()
    return core


def tune_malloc() -> None:
    """Keep glibc from handing freed MiB-sized buffers back to the kernel after every message.

    Each FetchAdapter chunk allocates and frees ~1 MiB buffers (the encoded message, gRPC's copy);
    with the default dynamic thresholds glibc trims the heap top / munmaps them each time, and every
    next chunk pays ~256 fresh page faults per MiB. Fixed thresholds keep that memory for reuse.
    No-op off glibc, or when MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ are set by the operator."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


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
