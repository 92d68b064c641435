"""The executor's Prometheus metrics, served on --metrics-port (0: off).

Read at scrape time from `engine.status()` (a custom Collector; any field the engine lacks is
skipped, read with getattr), under the names the Kubernetes Gateway API Inference Extension's
endpoint picker reads, as vLLM exports them:

    vllm:num_requests_running        gauge   sequences in the running batch
    vllm:num_requests_waiting        gauge   sequences queued
    vllm:kv_cache_usage_perc         gauge   KV blocks in use, 0..1 (vLLM's scale despite the name)
    vllm:lora_requests_info          gauge   value: the scrape's Unix time; labels
                                             running_lora_adapters, waiting_lora_adapters (comma-joined
                                             adapter ids), max_lora (adapters one batch can mix)

plus ours: per-tier adapters, bytes and counters (`openlora_executor_tier_*{tier}`), and histograms
fed by the servicer and engine through a small API:

    metrics.observe_ttft(s); metrics.observe_itl(s); metrics.observe_e2e(s)
    metrics.observe_adapter_load(tier, s)
    metrics.request_started(adapter) / first_token(adapter) / request_finished(adapter, started)
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TIER_NAMES = {1: "device", 2: "host", 3: "disk", "device": "device", "host": "host", "disk": "disk"}
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TIER_COUNTERS = ("hits", "misses", "loads", "evictions")


def _tier_name(tier) -> str:
    return TIER_NAMES.get(getattr(tier, "name", tier), str(tier).lower().removeprefix("adapter_tier_"))


class _EngineCollector:
    """Reads engine.status() once per scrape."""

    def __init__(self, metrics: ExecutorMetrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        engine = m.engine
        if engine is None:   # still loading the model
            return
        st = engine.status()
        g = getattr
        yield GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution "
                                "batches.", value=g(st, "running", 0))
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be "
                                "processed.", value=g(st, "waiting", 0))
        total = g(st, "kv_blocks_total", 0)
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                value=(1 - g(st, "kv_blocks_free", 0) / total) if total else 0.0)
        running, waiting = m.lora_requests()
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(running), ",".join(waiting), str(m.max_lora)], time.time())
        yield info
        yield GaugeMetricFamily("openlora_executor_kv_blocks_cached", "KV blocks holding a cached prefix",
                                value=g(st, "kv_blocks_cached", 0))
        yield CounterMetricFamily("openlora_executor_prefix_cache_hit_tokens",
                                  "prompt tokens taken from the prefix cache",
                                  value=g(st, "prefix_cache_hit_tokens", 0))
        yield CounterMetricFamily("openlora_executor_prefill_tokens_computed",
                                  "prompt tokens run through the model", value=g(st, "prefill_tokens_computed", 0))
        base = GaugeMetricFamily("openlora_executor_base_weight_bytes", "the base model's weights as served "
                                 "(quantized projections at their packed size)", labels=["quantization"])
        base.add_metric([g(st, "quantization", "none")], g(st, "base_weight_bytes", 0))
        yield base
        for name, field, what in (("num_draft_tokens", "spec_draft_tokens", "Number of draft tokens."),
                                  ("num_accepted_tokens", "spec_accepted_tokens",
                                   "Number of accepted tokens."),
                                  ("num_emitted_tokens", "spec_emitted_tokens",
                                   "Number of emitted tokens.")):   # vLLM's speculative decoding names
            yield CounterMetricFamily(f"vllm:spec_decode_{name}", what, value=g(st, field, 0))
        for name, field, what in (
                ("steps", "steps", "engine steps run (non-empty batches)"),
                ("step_seconds", "step_seconds", "wall time of the engine's steps"),
                ("grammar_seconds", "grammar_seconds", "of the steps' time, the grammar rows' own work "
                 "(matchers, masks, masked softmax), which the whole batch waits for"),
                ("grammar_rows", "grammar_rows", "structured-output rows masked")):
            yield CounterMetricFamily(f"openlora_executor_{name}", what, value=g(st, field, 0))
        yield from self._tiers(st)

    def _tiers(self, st):
        adapters = GaugeMetricFamily("openlora_executor_tier_adapters", "adapters held, per tier", labels=["tier"])
        counted: dict[str, int] = {}
        for a in getattr(st, "adapters", ()) or ():
            name = _tier_name(getattr(a, "tier", "?"))
            counted[name] = counted.get(name, 0) + 1
        stats = list(getattr(st, "tier_stats", None) or ())
        if not stats:
            for name, n in sorted(counted.items()):
                adapters.add_metric([name], n)
            yield adapters
            return
        used = GaugeMetricFamily("openlora_executor_tier_bytes_used", "bytes held, per tier", labels=["tier"])
        cap = GaugeMetricFamily("openlora_executor_tier_bytes_capacity", "tier budget in bytes (0: none)",
                                labels=["tier"])
        counters = {c: CounterMetricFamily(f"openlora_executor_tier_{c}", f"adapter {c} per tier, since start",
                                           labels=["tier"]) for c in TIER_COUNTERS}
        for t in stats:
            name = _tier_name(getattr(t, "tier", "?"))
            adapters.add_metric([name], getattr(t, "adapters", counted.get(name, 0)))
            used.add_metric([name], getattr(t, "bytes_used", 0))
            cap.add_metric([name], getattr(t, "bytes_capacity", 0))
            for c in TIER_COUNTERS:
                counters[c].add_metric([name], getattr(t, c, 0))
        yield adapters
        yield used
        yield cap
        yield from counters.values()


class ExecutorMetrics:
    """One executor's metrics (own CollectorRegistry: several executors per process in tests)."""

    def __init__(self, engine=None, max_lora: int = 0):
        self.engine = engine
        self.max_lora = max_lora
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("openlora_executor_time_to_first_token_seconds",
                              "time from a request's arrival to its first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("openlora_executor_inter_token_latency_seconds",
                             "time between a request's successive tokens", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("openlora_executor_e2e_request_latency_seconds",
                             "time from a request's arrival to its last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.adapter_load = Histogram("openlora_executor_adapter_load_seconds",
                                      "time to place an adapter into a tier", ["tier"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}   # adapter -> requests with no token yet
        self._running: dict[str, int] = {}   # adapter -> requests generating
        r.register(_EngineCollector(self))

    # -- histograms (any thread) -------------------------------------------------------------------
    def observe_ttft(self, s: float) -> None:
        self.ttft.observe(s)

    def observe_itl(self, s: float) -> None:
        self.itl.observe(s)

    def observe_e2e(self, s: float) -> None:
        self.e2e.observe(s)

    def observe_adapter_load(self, tier: str, s: float) -> None:
        self.adapter_load.labels(_tier_name(tier)).observe(s)

    # -- which adapters are running / waiting (vllm:lora_requests_info) ----------------------------
    def request_started(self, adapter_id: str) -> None:
        if adapter_id:
            with self._lock:
                self._waiting[adapter_id] = self._waiting.get(adapter_id, 0) + 1

    def first_token(self, adapter_id: str) -> None:
        if adapter_id:
            with self._lock:
                _dec(self._waiting, adapter_id)
                self._running[adapter_id] = self._running.get(adapter_id, 0) + 1

    def request_finished(self, adapter_id: str, started: bool) -> None:
        if adapter_id:
            with self._lock:
                _dec(self._running if started else self._waiting, adapter_id)

    def lora_requests(self) -> tuple[list[str], list[str]]:
        with self._lock:
            return sorted(self._running), sorted(self._waiting)

    def serve_http(self, host: str, port: int):
        return start_http_server(port, addr=host, registry=self.registry)


def _dec(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
