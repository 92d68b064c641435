"""The router's one config object."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServerConfig, check, flag
from services.router.discovery import parse_target


@dataclass(slots=True)
class RouterConfig(ServerConfig):
    port: int = flag(50050, "port to listen on (0 -> any free port)")
    registry: str = flag("", "registry address HOST:PORT: unknown adapters fail fast with NOT_FOUND")
    executor: list[str] = flag(help="executor address HOST:PORT, or dns:///NAME:PORT (every address "
                               "NAME resolves to, re-resolved every --resolve-interval-s)",
                               multiple=True, required=True)
    poll_interval_s: float = flag(0.25, "how often each executor's status (load, adapter tiers) is "
                                  "polled; health is streamed")
    resolve_interval_s: float = flag(5.0, "how often dns:/// executor targets are re-resolved")
    status_timeout_s: float = flag(2.0, "deadline of each executor health and status call, seconds")
    sent_adapter_ttl_s: float = flag(2.0, "how long an adapter just sent to an executor counts as held "
                                     "there before the executor's status shows it, seconds")
    adapter_check_ttl_s: float = flag(5.0, "how long a confirmed adapter skips the registry while the "
                                      "registry's change feed is not connected")
    metrics_port: int = flag(0, "Prometheus metrics HTTP port (0 -> off)")
    http_port: int = flag(0, "serve the OpenAI-compatible HTTP API on this port too, one hop from the "
                          "executors (0 -> off; `openlora gateway` serves it as a process of its own)")
    served_model_name: str = flag("", "with --http-port: the base model's name in /v1/models and `model` "
                                  "(empty -> the model directory's name)")
    prefix_affinity: bool = flag(True, "prefer the executor that last served a prompt's longest known "
                                 "prefix (its KV blocks are in that executor's prefix cache)")
    multiplex_streams: bool = flag(True, "send streamed requests to each executor over one "
                                   "GenerateStreams call, answered once per engine step (off: one "
                                   "GenerateStream call per request)")

    tenant_rate: float = flag(0.0, "requests per second per tenant (token bucket; 0 -> no limit)")
    tenant_burst: int = flag(0, "requests a tenant may send at once above its rate (0 -> ceil(rate))")
    tenant_max_concurrent: int = flag(0, "requests in flight per tenant (0 -> no limit)")

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        for name in ("tenant_rate", "tenant_burst", "tenant_max_concurrent"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(len(self.executor) > 0, "executor", "at least one is required")
        for target in self.executor:
            try:
                parse_target(target)
            except ValueError as exc:
                check(False, "executor", str(exc))
        check(self.poll_interval_s > 0, "poll_interval_s", "must be > 0")
        check(self.resolve_interval_s > 0, "resolve_interval_s", "must be > 0")
        check(self.status_timeout_s > 0, "status_timeout_s", "must be > 0")
        check(self.sent_adapter_ttl_s >= 0, "sent_adapter_ttl_s", "must be >= 0")
        check(self.adapter_check_ttl_s >= 0, "adapter_check_ttl_s", "must be >= 0")
        check(0 <= self.metrics_port <= 65535, "metrics_port", "must be 0..65535")
        check(0 <= self.http_port <= 65535, "http_port", "must be 0..65535")
