"""The registry's one config object."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServerConfig, check, flag


@dataclass(slots=True)
class RegistryConfig(ServerConfig):
    port: int = flag(50051, "port to listen on (0 -> any free port)")
    data_dir: str = flag(None, "directory for the SQLite database, file blobs and temp files",
                         required=True)
    max_adapter_bytes: int = flag(2 * 1024**3, "largest adapter accepted, in bytes")
    metrics_port: int = flag(0, "Prometheus metrics HTTP port (0 -> off)")
    metadata_url: str = flag("", "metadata store: empty -> SQLite under --data-dir; "
                             "postgresql://USER[:PASS]@HOST[:PORT]/DB (replicas may share one)")
    metadata_pool_size: int = flag(8, "PostgreSQL connections per registry process")
    blob_url: str = flag("", "blob store: empty -> files under --data-dir; s3://BUCKET[/PREFIX] "
                         "(endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")
    s3_part_bytes: int = flag(64 * 1024**2, "S3 multipart part size (>= 5 MiB); smaller blobs are "
                              "one PUT")
    s3_addressing_style: str = flag("auto", "S3 addressing style (path for most MinIO set-ups)",
                                    choices=("auto", "path", "virtual"))
    on_demand_source: str = flag("", "import unknown adapter ids on first request from: hf "
                                 "(hf://ID) or s3://BUCKET/PREFIX (PREFIX/ID/...); empty -> off")
    watch_poll_seconds: float = flag(0.2, "how often WatchAdapters polls the change table")
    allow_local_dir: list[str] = flag(help="a directory file:// sources may read, symlinks resolved "
                                      "(none -> admins only, or anyone on an open registry)",
                                      multiple=True)
    base_model: list[str] = flag(help="a base model directory (its config.json) that adapters must fit; "
                                 "repeatable; one that fits none is FAILED_PRECONDITION (none -> no check)",
                                 multiple=True)

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        check(bool(self.data_dir), "data_dir", "is required")
        check(self.max_adapter_bytes > 0, "max_adapter_bytes", "must be > 0")
        check(0 <= self.metrics_port <= 65535, "metrics_port", "must be 0..65535")
        check(self.metadata_url == "" or self.metadata_url.startswith(("postgresql://", "postgres://")),
              "metadata_url", f"expected empty (SQLite) or postgresql://..., got {self.metadata_url!r}")
        check(self.metadata_pool_size >= 1, "metadata_pool_size", "must be >= 1")
        check(self.blob_url == "" or self.blob_url.startswith("s3://"), "blob_url",
              f"expected empty (files) or s3://BUCKET[/PREFIX], got {self.blob_url!r}")
        if self.blob_url:
            from services.common.s3 import parse_s3_url
            try:
                parse_s3_url(self.blob_url)
            except ValueError as exc:
                check(False, "blob_url", str(exc))
        check(self.s3_part_bytes >= 5 * 1024**2, "s3_part_bytes", "must be >= 5 MiB (S3's minimum)")
        check(self.on_demand_source in ("", "hf") or self.on_demand_source.startswith("s3://"),
              "on_demand_source", f"expected hf or s3://BUCKET/PREFIX, got {self.on_demand_source!r}")
        if self.on_demand_source.startswith("s3://"):
            from services.common.s3 import parse_s3_url
            try:
                parse_s3_url(self.on_demand_source)
            except ValueError as exc:
                check(False, "on_demand_source", str(exc))
        check(self.watch_poll_seconds > 0, "watch_poll_seconds", "must be > 0")
        for path in self.base_model:
            from services.registry.base_models import BaseModelShape
            try:
                BaseModelShape.from_dir(path)
            except ValueError as exc:
                check(False, "base_model", str(exc))
