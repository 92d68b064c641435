"""The registry's one config object."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServerConfig, check, flag


@dataclass(slots=True)
class RegistryConfig(ServerConfig):
    port: int = flag(50051, "port to listen on (0 -> any free port)")
    data_dir: str = flag(None, "directory for the metadata database and blobs", required=True)
    max_adapter_bytes: int = flag(2 * 1024**3, "largest adapter accepted, in bytes")
    metrics_port: int = flag(0, "Prometheus metrics HTTP port (0 -> off)")

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        check(bool(self.data_dir), "data_dir", "is required")
        check(self.max_adapter_bytes > 0, "max_adapter_bytes", "must be > 0")
        check(0 <= self.metrics_port <= 65535, "metrics_port", "must be 0..65535")
