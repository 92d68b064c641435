"""The router's one config object."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServerConfig, check, flag


@dataclass(slots=True)
class RouterConfig(ServerConfig):
    port: int = flag(50050, "port to listen on (0 -> any free port)")
    registry: str = flag("", "registry address HOST:PORT: unknown adapters fail fast with NOT_FOUND")
    executor: list[str] = flag(help="executor address HOST:PORT", multiple=True, required=True)
    poll_interval_s: float = flag(0.5, "how often each executor's health and status are polled")
    prefix_affinity: bool = flag(True, "prefer the executor that last served a prompt's longest known "
                                 "prefix (its KV blocks are in that executor's prefix cache)")

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        check(len(self.executor) > 0, "executor", "at least one is required")
        check(self.poll_interval_s > 0, "poll_interval_s", "must be > 0")
