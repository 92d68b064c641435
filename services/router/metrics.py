"""The router's Prometheus metrics (own CollectorRegistry: several routers per process in tests).

Placement: `openlora_router_placements_total{adapter_hit}` counts adapter requests by whether the
chosen executor already held the adapter in the router's view ("true"/"false"); failovers, requests
by gRPC code, latency histograms, and gauges of the executors known and healthy read at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _PoolCollector:
    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        views = self.pool.snapshot()
        yield GaugeMetricFamily("openlora_router_executors", "executors known", value=len(views))
        yield GaugeMetricFamily("openlora_router_executors_healthy", "executors taking new requests",
                                value=sum(v.healthy for v in views))
        inflight = GaugeMetricFamily("openlora_router_executor_inflight",
                                     "requests this router has in flight at each executor",
                                     labels=["executor"])
        for v in views:
            inflight.add_metric([v.address], v.inflight)
        yield inflight


class RouterMetrics:
    def __init__(self, pool=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.placements = Counter("openlora_router_placements", "adapter requests placed, by whether "
                                  "the chosen executor held the adapter", ["adapter_hit"], registry=r)
        self.failovers = Counter("openlora_router_failovers", "calls retried on another executor "
                                 "after UNAVAILABLE", registry=r)
        self.requests = Counter("openlora_router_requests", "requests finished, by method and gRPC code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("openlora_router_request_seconds", "end-to-end time through the router",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("openlora_router_time_to_first_chunk_seconds",
                              "GenerateStream: time until the first chunk", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.hit = self.placements.labels("true")
        self.miss = self.placements.labels("false")
        self._children: dict[tuple[str, str], tuple] = {}
        if pool is not None:
            r.register(_PoolCollector(pool))

    def finished(self, method: str, code: str, seconds: float) -> None:
        """One request through the router ended with `code` after `seconds`."""
        children = self._children.get((method, code))
        if children is None:
            children = self._children[(method, code)] = (self.latency.labels(method),
                                                          self.requests.labels(method, code))
        children[0].observe(seconds)
        children[1].inc()

    def serve_http(self, host: str, port: int):
        return start_http_server(port, addr=host, registry=self.registry)
