"""The cluster over real servers on loopback: discovery (DNS included), health streaming, metrics.

Executors and the registry run as subprocesses; a router runs in-process where the test plays DNS
(an injected resolve function, driving the real discovery loop), and as a subprocess for a real
`dns:///localhost:PORT` target.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
import urllib.request

import grpc
import pytest

from services.common.gen.openlora.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.router.app import build as build_router
from services.router.config import RouterConfig
from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import Service, free_port

ADAPTERS = {f"team/a{i}": AdapterSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=300 + i)
            for i in range(4)}


@pytest.fixture(scope="module")
def cluster(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    registry = Service("registry", "--data-dir", str(root / "registry"),
                       log_path=root / "registry.log").start()
    ports = [free_port() for _ in range(2)]
    executors = [Service("executor", "--registry", registry.address, "--base-model", str(llama_dir),
                         "--disk-cache-dir", str(root / f"disk{i}"), "--max-batch-size", "8",
                         "--metrics-port", str(ports[i]), "--grace-seconds", "5",
                         # "latest" never re-resolved by age: only the change feed moves it (feed test)
                         "--adapter-latest-ttl-s", "3600",
                         log_path=root / f"executor{i}.log") for i in range(2)]
    for e in executors:
        e.start()
    with grpc.insecure_channel(registry.address) as ch:
        stub = registry_pb2_grpc.AdapterRegistryStub(ch)
        for aid, spec in ADAPTERS.items():
            path = write_adapter(root / aid.replace("/", "_"), TINY["llama"], spec)
            stub.RegisterAdapter(registry_pb2.RegisterAdapterRequest(adapter_id=aid, source=f"file://{path}"),
                                 timeout=30)
    yield {"registry": registry, "executors": executors, "metrics_ports": ports, "root": root}
    for s in [*executors, registry]:
        s.stop()


def _req(adapter="", max_new=4):
    return common_pb2.GenerateRequest(adapter_id=adapter, prompt_token_ids=[5, 17, 42, 99],
                                      sampling=common_pb2.SamplingParams(max_new_tokens=max_new,
                                                                         ignore_eos=True))


async def _listed(stub) -> dict[str, bool]:
    resp = await stub.ListExecutors(router_pb2.ListExecutorsRequest(), timeout=10)
    return {e.address: e.healthy for e in resp.executors}


async def _until(pred, timeout_s: float, step: float = 0.02) -> float:
    """Seconds until pred() (async) is true; fails after timeout_s."""
    t0 = time.monotonic()
    while not await pred():
        assert time.monotonic() - t0 < timeout_s, "condition not met in time"
        await asyncio.sleep(step)
    return time.monotonic() - t0


def test_dns_discovery_follows_the_records(cluster):
    """The real discovery loop with a resolver the test controls: executors join and leave."""
    a, b = (e.address for e in cluster["executors"])
    records = {"executors.test": [a]}
    lookups = []

    async def resolve(name: str, port: int) -> list[str]:
        lookups.append((name, port))
        if name not in records:
            raise OSError(f"no such host {name}")
        return list(records[name])

    async def scenario():
        config = RouterConfig(port=0, executor=["dns:///executors.test:1234"], resolve_interval_s=0.1,
                              registry=cluster["registry"].address)
        server, servicer = await build_router(config, resolve=resolve)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                assert await _listed(stub) == {a: True}
                assert (await stub.Generate(_req(), timeout=60)).executor_id == a
                records["executors.test"] = [a, b]                         # a pod joins
                await _until(lambda: _has(stub, {a: True, b: True}), 5)
                served = {(await stub.Generate(_req(f"team/a{i}"), timeout=60)).executor_id
                          for i in range(4) for _ in range(2)}
                assert served <= {a, b}
                del records["executors.test"]                              # a DNS failure: keep both
                await asyncio.sleep(0.3)
                assert set(await _listed(stub)) == {a, b}
                records["executors.test"] = [b]                            # a leaves
                await _until(lambda: _has(stub, {b: True}), 5)
                assert {(await stub.Generate(_req("team/a0"), timeout=60)).executor_id
                        for _ in range(3)} == {b}
        finally:
            await server.stop(0)
            await servicer.pool.close()
            await servicer.adapters.close()

    async def _has(stub, expected) -> bool:
        return await _listed(stub) == expected

    asyncio.run(scenario())
    assert lookups and all(x == ("executors.test", 1234) for x in lookups)


def test_dns_target_with_a_real_resolver(cluster):
    """dns:///localhost:PORT through the system resolver, in a router subprocess."""
    ex = cluster["executors"][0]
    router = Service("router", "--executor", f"dns:///localhost:{ex.port}", "--resolve-interval-s", "1",
                     log_path=cluster["root"] / "router-dns.log").start()
    try:
        with grpc.insecure_channel(router.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            listed = stub.ListExecutors(router_pb2.ListExecutorsRequest(), timeout=10).executors
            assert ex.address in {e.address for e in listed if e.healthy}
            assert stub.Generate(_req(), timeout=60).executor_id == ex.address
    finally:
        router.stop()


def test_bad_dns_target_is_a_flag_error():
    from services.common.config import ConfigError
    with pytest.raises(ConfigError, match="--executor.*dns:///NAME:PORT"):
        RouterConfig(executor=["dns:///nameonly"])


def test_a_draining_executor_gets_no_new_requests_at_once(cluster, llama_dir, tmp_path):
    """SIGTERM: its health stream says NOT_SERVING, and the router stops sending there within 1 s,
    while its in-flight stream finishes."""
    extra = Service("executor", "--base-model", str(llama_dir), "--disk-cache-dir", str(tmp_path / "d"),
                    "--grace-seconds", "20", log_path=tmp_path / "extra.log").start()
    other = cluster["executors"][0].address

    async def scenario():
        config = RouterConfig(port=0, executor=[extra.address, other])
        server, servicer = await build_router(config)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                # a long stream pinned to `extra` (the only executor for a moment: `other` marked down)
                servicer.pool.mark_unhealthy(other)
                stream = stub.GenerateStream(_req("", 48), timeout=120)
                first = await stream.read()
                assert first.executor_id == extra.address
                extra.proc.send_signal(15)
                took = await _until(lambda: _healthy(stub, extra.address, False), 30.0)
                await servicer.pool.poll_once()
                served = {(await stub.Generate(_req(), timeout=60)).executor_id for _ in range(3)}
                assert served == {other}
                rest = [first]                          # the in-flight stream drains to its end
                while (chunk := await stream.read()) is not grpc.aio.EOF:
                    rest.append(chunk)
                assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
                return took
        finally:
            await server.stop(0)
            await servicer.pool.close()
            await servicer.adapters.close()

    async def _healthy(stub, address, want) -> bool:
        return (await _listed_fast(stub)).get(address) == want

    try:
        asyncio.run(scenario())
        assert extra.proc.wait(timeout=30) == 0
    finally:
        extra.stop()


async def _listed_fast(stub):
    return await _listed(stub)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name) + (r"\{[^}]*" + labels + r"[^}]*\}" if labels else r"(\{[^}]*\})?") + r" (\S+)"
    m = re.search(pattern, text, re.M)
    assert m, f"{name} {labels} not in the scrape"
    return float(m.groups()[-1])


def test_executor_metrics_present_and_moving_under_load(cluster):
    ex, port = cluster["executors"][1], cluster["metrics_ports"][1]
    before = _scrape(port)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert _value(before, name) >= 0
    assert re.search(r'vllm:lora_requests_info\{max_lora="32",running_lora_adapters="[^"]*",'
                     r'waiting_lora_adapters="[^"]*"\} \d', before) or \
        re.search(r'vllm:lora_requests_info\{[^}]*running_lora_adapters=', before)
    n0 = _value(before, "openlora_executor_time_to_first_token_seconds_count")
    e0 = _value(before, "openlora_executor_e2e_request_latency_seconds_count")
    i0 = _value(before, "openlora_executor_inter_token_latency_seconds_count")
    seen_running, seen_kv, seen_lora = 0.0, 0.0, set()
    with grpc.insecure_channel(ex.address) as ch:
        from services.common.gen.openlora.v1 import executor_pb2_grpc
        stub = executor_pb2_grpc.ExecutorStub(ch)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stub.Generate, _req(f"team/a{i % 4}", 32), timeout=120) for i in range(16)]
            while not all(f.done() for f in futures):
                text = _scrape(port)
                seen_running = max(seen_running, _value(text, "vllm:num_requests_running"))
                seen_kv = max(seen_kv, _value(text, "vllm:kv_cache_usage_perc"))
                m = re.search(r'running_lora_adapters="([^"]*)"', text)
                seen_lora.update(x for x in m.group(1).split(",") if x)
                time.sleep(0.05)
            assert all(len(f.result().token_ids) == 32 for f in futures)
    after = _scrape(port)
    assert seen_running > 0 and seen_kv > 0 and seen_lora <= set(ADAPTERS) and seen_lora
    assert _value(after, "openlora_executor_time_to_first_token_seconds_count") == n0 + 16
    assert _value(after, "openlora_executor_e2e_request_latency_seconds_count") == e0 + 16
    assert _value(after, "openlora_executor_inter_token_latency_seconds_count") == i0 + 16 * 31
    assert 'openlora_executor_tier_adapters{tier=' in after
    # every adapter load placed into the arena is timed, labelled by the tier it came from
    loads = sum(float(v) for v in re.findall(
        r'^openlora_executor_adapter_load_seconds_count\{tier="(?:disk|registry|host)"\} (\S+)', after, re.M))
    assert loads >= 1, "no adapter load was timed"
    m = re.search(r'vllm:lora_requests_info\{([^}]*)\} (\S+)', after)
    assert abs(float(m.group(2)) - time.time()) < 60          # the value is a Unix timestamp


def test_router_metrics_count_placements(cluster):
    mport = free_port()
    router = Service("router", "--registry", cluster["registry"].address, "--metrics-port", str(mport),
                     *[x for e in cluster["executors"] for x in ("--executor", e.address)],
                     log_path=cluster["root"] / "router-metrics.log").start()
    try:
        with grpc.insecure_channel(router.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            for _ in range(3):
                for aid in ADAPTERS:
                    stub.Generate(_req(aid, 2), timeout=60)
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(_req("team/missing", 2), timeout=60)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        text = _scrape(mport)
        hits = _value(text, "openlora_router_placements_total", 'adapter_hit="true"')
        misses = _value(text, "openlora_router_placements_total", 'adapter_hit="false"')
        assert hits + misses == 12 and hits >= 8          # each adapter's later requests find it held
        assert _value(text, "openlora_router_requests_total", 'code="OK",method="Generate"') == 12
        assert _value(text, "openlora_router_requests_total", 'code="NOT_FOUND",method="Generate"') == 1
        assert _value(text, "openlora_router_request_seconds_count", 'method="Generate"') == 13
        assert _value(text, "openlora_router_executors_healthy") == 2
        assert "openlora_router_failovers_total" in text
    finally:
        router.stop()


def test_bench_reports_json_plot_and_counts_errors(cluster, tmp_path):
    """`openlora bench` through a router: Zipf over the adapters plus one that does not exist (its
    requests are counted under NOT_FOUND, not fatal), Poisson arrivals, length ranges, --plot."""
    import json
    import subprocess
    import sys
    router = Service("router", "--registry", cluster["registry"].address,
                     *[x for e in cluster["executors"] for x in ("--executor", e.address)],
                     log_path=cluster["root"] / "router-bench.log").start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "services.cli", "bench", "--router", router.address,
             *[x for a in [*ADAPTERS, "team/missing"] for x in ("--adapter", a)], "--zipf", "0.5",
             "--requests", "24", "--rate", "40", "--prompt-len", "4:12", "--token-id-max", "500", "--output-len", "2:6",
             "--json", "--plot", str(tmp_path / "lat.png"), "--no-progress"],
            capture_output=True, text=True, timeout=300, check=True)
        rep = json.loads(out.stdout)
        assert rep["requests"] == 24 and rep["completed"] + sum(rep["errors"].values()) == 24
        assert set(rep["errors"]) <= {"NOT_FOUND"} and rep["completed"] > 0
        for key in ("ttft_s", "itl_s", "e2e_s"):
            p = rep[key]
            assert set(p) == {"p50", "p90", "p99"} and 0 < p["p50"] <= p["p90"] <= p["p99"]
        assert rep["output_tokens_per_s"] > 0 and rep["requests_per_s"] > 0
        assert rep["config"]["rate"] == 40 and rep["config"]["output_len"] == [2, 6]
        assert set(rep["executors"]) <= {e.address for e in cluster["executors"]}
        assert (tmp_path / "lat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # straight to the executors, round-robin, closed loop; the old flags still work
        out = subprocess.run(
            [sys.executable, "-m", "services.cli", "bench", "--no-progress",
             *[x for e in cluster["executors"] for x in ("--executor", e.address)],
             "--adapter", "team/a0", "--requests", "6", "--concurrency", "3", "--max-new-tokens", "3"],
            capture_output=True, text=True, timeout=300, check=True)
        assert "throughput" in out.stdout and "TTFT" in out.stdout and "p99" in out.stdout
        assert "served" in out.stdout      # both executors, round-robin
    finally:
        router.stop()


def test_change_feed_reaches_every_executor_and_router_within_a_second(cluster, tmp_path):
    """`openlora adapters rm`: no executor holds or serves it and the router answers NOT_FOUND; a new
    version: "latest" is it, on every executor. Only the change feed can do either (the executors never
    re-resolve "latest" by age here, the router never re-checks a confirmed adapter), so a generous
    deadline tests it without a wall-clock bound (it takes well under a second)."""
    import subprocess
    import sys

    from services.common.gen.openlora.v1 import executor_pb2, executor_pb2_grpc
    reg = cluster["registry"].address
    executors = cluster["executors"]
    router = Service("router", "--registry", reg, "--adapter-check-ttl-s", "3600",
                     *[x for e in executors for x in ("--executor", e.address)],
                     log_path=cluster["root"] / "router-feed.log").start()
    v1, v2 = (write_adapter(tmp_path / f"v{i}", TINY["llama"], AdapterSpec(rank=4, seed=900 + i)) for i in (1, 2))
    channels = [grpc.insecure_channel(x) for x in (reg, router.address, *(e.address for e in executors))]
    try:
        registry = registry_pb2_grpc.AdapterRegistryStub(channels[0])
        routed = router_pb2_grpc.RouterStub(channels[1])
        direct = [executor_pb2_grpc.ExecutorStub(c) for c in channels[2:]]
        registry.RegisterAdapter(registry_pb2.RegisterAdapterRequest(adapter_id="team/feed", source=f"file://{v1}"),
                                 timeout=30)
        first = routed.Generate(_req("team/feed"), timeout=60)
        for ex in direct:                                   # resident on every executor
            assert ex.Generate(_req("team/feed"), timeout=60).token_ids == first.token_ids

        def pinned(version):
            return direct[0].Generate(common_pb2.GenerateRequest(
                adapter_id="team/feed", adapter_version=version, prompt_token_ids=[5, 17, 42, 99],
                sampling=common_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True)), timeout=60).logprobs

        # a new version becomes "latest" everywhere within a second
        registry.RegisterAdapter(registry_pb2.RegisterAdapterRequest(adapter_id="team/feed", source=f"file://{v2}"),
                                 timeout=30)
        t0 = time.monotonic()
        want = pinned(2)
        assert want != pinned(1)
        _wait(lambda: all(list(ex.Generate(_req("team/feed"), timeout=60).logprobs) == list(want)
                          for ex in direct), 30.0, t0)

        # deletion: gone from every executor and the router within a second
        subprocess.run([sys.executable, "-m", "services.cli", "adapters", "rm", "team/feed", "--registry", reg],
                       check=True, capture_output=True, timeout=60)
        t0 = time.monotonic()

        def gone() -> bool:
            held = [a.adapter_id for ex in direct
                    for a in ex.GetStatus(executor_pb2.GetStatusRequest(), timeout=10).adapters]
            return "team/feed" not in held and all(_code(lambda s=s: s.Generate(_req("team/feed"), timeout=60))
                                                   == grpc.StatusCode.NOT_FOUND for s in (routed, *direct))
        _wait(gone, 30.0, t0)
    finally:
        for c in channels:
            c.close()
        router.stop()


def _code(call):
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _wait(pred, limit: float, t0: float) -> float:
    """Seconds from t0 until pred() holds, polled; fails past `limit`."""
    while not pred():
        assert time.monotonic() - t0 < limit, f"not within {limit} s"
        time.sleep(0.02)
    return time.monotonic() - t0
