"""`openlora registry`: build the core from RegistryConfig, serve it until SIGTERM."""

from __future__ import annotations

import pathlib

import structlog

from services.common.memory import tune_malloc
from services.common.server import Server, Service, create_server
from services.registry.base_models import BaseModelShape
from services.registry.changes import ChangeFeed
from services.registry.config import RegistryConfig
from services.registry.core import AdapterRegistry
from services.registry.metrics import RegistryMetrics
from services.registry.servicer import AdapterRegistryServicer, add_to_server
from services.registry.sources import default_sources
from services.registry.sources.file import FileSource
from services.registry.stores import BlobStore, MetadataStore

log = structlog.get_logger(__name__)
SERVICE_NAME = "openlora.v1.AdapterRegistry"


def open_metadata(config: RegistryConfig) -> MetadataStore:
    if config.metadata_url:
        from services.registry.stores.metadata_postgres import PostgresMetadataStore
        return PostgresMetadataStore(config.metadata_url, pool_size=config.metadata_pool_size)
    from services.registry.stores.metadata_sqlite import SqliteMetadataStore
    return SqliteMetadataStore(str(pathlib.Path(config.data_dir) / "registry.db"))


def open_blobs(config: RegistryConfig) -> BlobStore:
    data = pathlib.Path(config.data_dir)
    if config.blob_url:
        from services.registry.stores.blobs_s3 import S3BlobStore
        return S3BlobStore(config.blob_url, data / "spool", part_bytes=config.s3_part_bytes,
                           addressing_style=config.s3_addressing_style)
    from services.registry.stores.blobs_fs import FsBlobStore
    return FsBlobStore(data / "blobs")


def build_core(config: RegistryConfig) -> AdapterRegistry:
    data = pathlib.Path(config.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    metadata = open_metadata(config)
    try:
        core = AdapterRegistry(metadata, open_blobs(config), config.max_adapter_bytes,
                               work_dir=data / "work",
                               sources={**default_sources(config.s3_addressing_style),
                                        "file": FileSource(config.allow_local_dir)},
                               on_demand_source=config.on_demand_source,
                               base_models=[BaseModelShape.from_dir(p) for p in config.base_model])
        core.recover()
    except BaseException:
        metadata.close()
        raise
    return core


async def start(config: RegistryConfig, feed: ChangeFeed | None = None
                ) -> tuple[Server, int, AdapterRegistry]:
    """Build and start a registry server (tests use this in-process)."""
    core = build_core(config)
    metrics = RegistryMetrics(core.metadata)
    feed = feed or ChangeFeed(None, config.watch_poll_seconds)
    feed.metadata = core.metadata                  # `serve` makes the feed first, to close it on drain
    servicer = AdapterRegistryServicer(core, metrics, feed)
    server, port = await create_server(config, [Service(SERVICE_NAME, servicer, add_to_server)])
    await server.start()
    if config.metrics_port:
        metrics.serve_http(config.host, config.metrics_port)
    log.info("registry_serving", host=config.host, port=port, data_dir=config.data_dir,
             metadata=_redact(config.metadata_url) or "sqlite", blobs=config.blob_url or "files",
             on_demand_source=config.on_demand_source or None,
             metrics_port=config.metrics_port or None)
    return server, port, core


async def serve(config: RegistryConfig) -> None:
    tune_malloc()
    feed = ChangeFeed(None, config.watch_poll_seconds)
    server, _, core = await start(config, feed)
    try:
        await server.run_until_signal(config.grace_seconds, on_drain=feed.close)
    finally:
        core.metadata.close()


def _redact(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (for logs)."""
    import re
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
