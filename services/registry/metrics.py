"""Prometheus metrics of one registry (own CollectorRegistry: several registries per process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from services.registry.stores import MetadataStore


class RegistryMetrics:
    def __init__(self, metadata: MetadataStore):
        self.registry = CollectorRegistry()
        stats = metadata.stats
        Gauge("openlora_registry_adapters", "adapter ids with at least one version",
              registry=self.registry).set_function(lambda: stats().adapters)
        Gauge("openlora_registry_versions", "stored adapter versions",
              registry=self.registry).set_function(lambda: stats().versions)
        Gauge("openlora_registry_bytes_stored", "bytes of distinct blobs referenced",
              registry=self.registry).set_function(lambda: stats().blob_bytes)
        self.fetches = Counter("openlora_registry_fetches", "FetchAdapter calls served",
                               registry=self.registry)
        self.fetch_bytes = Counter("openlora_registry_fetch_bytes", "file bytes sent by FetchAdapter",
                                   registry=self.registry)

    def serve_http(self, host: str, port: int):
        return start_http_server(port, addr=host, registry=self.registry)
