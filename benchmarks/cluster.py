"""The router against round-robin straight to the executors (what a plain Kubernetes Service does).

Two stacks side by side, each a registry + 2 executors (one thread each) with the same 128 adapters;
one stack is used through a router, the other round-robin by `openlora bench --executor A
--executor B`. Each executor's adapter tiers hold about a quarter of the adapters (--max-device-
adapters 8, --host-cache-bytes for 16, --disk-cache-bytes for 24 full copies: files and packed image,
about 2x an adapter's file size; --disk-factor 1 gives room for 24 of the image-only copies the host
tier writes back, about 1x). Traffic: Zipf(1) over the 128,
closed loop. Runs alternate between the stacks after one warm-up run each of --warmup-requests (long
enough that nearly every adapter has been asked for once: under Zipf(1) the 128th adapter is 0.14% of
traffic, so after 200 requests a third of a run's fetches are first-time fetches, the same for any
placement, and the comparison measures the warm-up, not the steady state); per run, the registry
fetches (its openlora_registry_fetches counter), output tokens/s and p90 TTFT; medians printed side
by side, and the CPU time the router process spent per run. Then the router's own cost: 1-token
requests one at a time (a warm adapter), straight to an executor, through the router, and through
benchmarks/bare_relay.py (a hop that only relays bytes to that executor: the floor of any Python gRPC
hop on this machine), and, where Go and grpc-go are installed, through benchmarks/go_relay (the same
hop compiled), alternated; medians of the runs' p50s and the CPU time per request of each hop.

    .venv/bin/python benchmarks/cluster.py [--rounds 3] [--requests 200] [--concurrency 8] [--blobs s3]

--blobs s3 keeps each registry's blobs in an S3 bucket (moto's server, a subprocess on loopback) instead
of files under its data directory, so a registry fetch is what it is in production: a read from object
storage (here a local one; a real bucket is further away still).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bare_relay import PYTHON_RELAY, build_go_relay, start_relay  # noqa: E402
from services import bench  # noqa: E402
from services.common.harness import Service, cpu_seconds, free_port, register_adapters  # noqa: E402
from services.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model  # noqa: E402

SPEC = ModelSpec(arch="llama", hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=1024,
                 seed=5)
ADAPTER = AdapterSpec(rank=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def fetches(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        m = re.search(r"^openlora_registry_fetches_total (\S+)", r.read().decode(), re.M)
    return float(m.group(1))


def bench_args(argv: list[str]):
    p = bench.build_parser()
    args = p.parse_args([*argv, "--no-progress"])
    bench.check_args(p, args)
    return args


def run_bench(argv: list[str]) -> dict:
    args = bench_args(argv)
    t0 = time.perf_counter()
    results = asyncio.run(bench.run(args))
    return bench.report(results, args, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup-requests", type=int, default=1500,
                    help="requests of the warm-up run per stack, before the measured runs")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-len", default="4:16")
    ap.add_argument("--prompt-len", default="16:48")
    ap.add_argument("--latency-requests", type=int, default=60)
    ap.add_argument("--disk-factor", type=int, default=2, help="disk bytes per adapter / its file size: 2 "
                    "holds 24 full copies (files + packed image) or about 48 written-back images, 1 holds "
                    "24 written-back images")
    ap.add_argument("--blobs", choices=("files", "s3"), default="files",
                    help="where the registries keep adapter blobs: files, or S3 buckets on a moto server")
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="openlora-cluster-"))
    s3 = None
    reg_env: dict[str, str] = {}
    if args.blobs == "s3":
        import boto3
        port = free_port()
        s3 = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reg_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        client = boto3.client("s3", endpoint_url=reg_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        for _ in range(100):
            try:
                client.list_buckets()
                break
            except Exception:
                time.sleep(0.1)
        for name in ("router", "round-robin"):
            client.create_bucket(Bucket=f"cluster-{name}")
    model = write_model(work / "model", SPEC)
    dirs = [write_adapter(work / "adapters" / f"a{i}", SPEC, dataclasses.replace(ADAPTER, seed=1000 + i))
            for i in range(args.adapters)]
    size = sum(f.stat().st_size for f in dirs[0].iterdir())
    # the disk tier keeps each adapter's files and the arena's packed image beside them: ~2x its size
    tiers = ["--max-device-adapters", "8", "--host-cache-bytes", str(16 * size),
             "--disk-cache-bytes", str(24 * size * args.disk_factor)]
    env = {"OMP_NUM_THREADS": "1"}
    services: list[Service] = []
    try:
        stacks = {}
        for name in ("router", "round-robin"):
            mport = free_port()
            blobs = ["--blob-url", f"s3://cluster-{name}"] if s3 else []
            reg = Service("registry", "--data-dir", str(work / name / "registry"), "--metrics-port", str(mport),
                          *blobs, env=reg_env, log_path=work / f"{name}-registry.log").start()
            services.append(reg)
            register_adapters(reg.address, {f"bench/a{i}": d for i, d in enumerate(dirs)})
            exes = [Service("executor", "--registry", reg.address, "--base-model", str(model),
                            "--device", "cpu", "--dtype", "float32", "--max-batch-size", "16",
                            "--disk-cache-dir", str(work / name / f"disk{i}"), *tiers, env=env,
                            log_path=work / f"{name}-executor{i}.log") for i in range(2)]
            stacks[name] = {"registry": reg, "metrics": mport, "executors": exes}
            services += exes
        for s in stacks.values():
            for e in s["executors"]:
                e.start()
        rs = stacks["router"]
        router = Service("router", "--registry", rs["registry"].address,
                         *[x for e in rs["executors"] for x in ("--executor", e.address)],
                         log_path=work / "router.log").start()
        services.append(router)
        targets = {"router": ["--router", router.address],
                   "round-robin": [x for e in stacks["round-robin"]["executors"] for x in ("--executor", e.address)]}
        load = ["--adapters", str(args.adapters), "--zipf", "1", "--requests", str(args.requests),
                "--concurrency", str(args.concurrency), "--prompt-len", args.prompt_len,
                "--output-len", args.output_len, "--token-id-max", str(SPEC.vocab)]
        print(f"blobs: {args.blobs}; 2 executors per stack (1 thread each); {args.adapters} adapters (rank {ADAPTER.rank}, "
              f"{size / 1024:.0f} KiB), tiers per executor: 8 device slots, host {16 * size // 1024} KiB "
              f"(16), disk {24 * size * args.disk_factor // 1024} KiB (x{args.disk_factor} of 24 adapters' files); Zipf(1), {args.requests} requests a run, "
              f"concurrency {args.concurrency}, prompt {args.prompt_len}, output {args.output_len} tokens; "
              f"medians of {args.rounds} alternated runs after one warm-up of {args.warmup_requests} each", flush=True)
        warm = [*load]
        warm[warm.index("--requests") + 1] = str(args.warmup_requests)
        for name in targets:                                      # warm-up: caches reach steady state
            run_bench([*targets[name], *warm, "--seed", "999"])
        rows = {name: [] for name in targets}
        cores = os.cpu_count() or 1
        for r in range(args.rounds):
            for name in targets:
                before, cpu0 = fetches(stacks[name]["metrics"]), cpu_seconds(router.proc.pid)
                rep = run_bench([*targets[name], *load, "--seed", str(r)])
                rep["fetches"] = fetches(stacks[name]["metrics"]) - before
                router_cpu = cpu_seconds(router.proc.pid) - cpu0
                rows[name].append(rep)
                used = (f"  router CPU {router_cpu:5.2f} s = {router_cpu / rep['wall_s'] / cores:4.0%} of the "
                        f"{cores} cores" if name == "router" else "")
                print(f"  round {r} {name:<12} fetches {rep['fetches']:4.0f}  "
                      f"{rep['output_tokens_per_s']:7.1f} tok/s  p90 TTFT {rep['ttft_s']['p90'] * 1e3:7.1f} ms"
                      f"  errors {rep['errors'] or 0}{used}", flush=True)
        med = {n: {"fetches": statistics.median(r["fetches"] for r in rs_),
                   "tok_s": statistics.median(r["output_tokens_per_s"] for r in rs_),
                   "req_s": statistics.median(r["requests_per_s"] for r in rs_),
                   "ttft90": statistics.median(r["ttft_s"]["p90"] for r in rs_),
                   "e2e90": statistics.median(r["e2e_s"]["p90"] for r in rs_)} for n, rs_ in rows.items()}
        for n, m in med.items():
            print(f"{n:<12} registry fetches {m['fetches']:5.0f}  {m['tok_s']:7.1f} output tok/s  "
                  f"{m['req_s']:5.2f} req/s  p90 TTFT {m['ttft90'] * 1e3:7.1f} ms  p90 e2e {m['e2e90'] * 1e3:7.1f} ms")
        a, b = med["router"], med["round-robin"]
        print(f"router / round-robin: registry fetches {a['fetches'] / max(b['fetches'], 1):.2f}x "
              f"(goal <= 0.5x), throughput {a['tok_s'] / b['tok_s']:.2f}x (goal >= 1.2x), "
              f"p90 TTFT {a['ttft90'] * 1e3:.0f} ms vs {b['ttft90'] * 1e3:.0f} ms", flush=True)

        # the router's own cost: 1-token requests, one at a time, a warm adapter
        direct = rs["executors"][0].address
        relay, relay_address = start_relay(PYTHON_RELAY, direct)
        services.append(relay)
        one = ["--adapter", "bench/a0", "--requests", str(args.latency_requests), "--concurrency", "1",
               "--prompt-len", "8", "--output-len", "1", "--token-id-max", str(SPEC.vocab)]
        hops = {"direct": (["--executor", direct], None), "router": (["--router", router.address], router.proc),
                "bare relay": (["--router", relay_address], relay)}
        go = build_go_relay(work / "go")
        if isinstance(go, str):
            print(f"  (no Go relay: {go})")
        else:
            go_relay, go_address = start_relay([str(go)], direct)
            services.append(go_relay)
            hops["go relay"] = (["--router", go_address], go_relay)
        for target, _ in hops.values():
            run_bench([*target, *one])
        p50 = {name: [] for name in hops}
        cpu = {name: [] for name in hops}
        for r in range(max(args.rounds, 3) * 2):
            for name, (target, proc) in hops.items():
                cpu0 = cpu_seconds(proc.pid) if proc else 0.0
                p50[name].append(run_bench([*target, *one, "--seed", str(r)])["e2e_s"]["p50"])
                if proc:
                    cpu[name].append((cpu_seconds(proc.pid) - cpu0) / args.latency_requests)
        d, t, b = (statistics.median(p50[n]) * 1e3 for n in ("direct", "router", "bare relay"))
        tc, bc = (statistics.median(cpu[n]) * 1e3 for n in ("router", "bare relay"))
        print(f"1-token requests, p50: direct {d:.2f} ms, through the router {t:.2f} ms = {t / d:.3f}x "
              f"(+{t - d:.2f} ms; goal <= 1.05x + 1 ms = {1.05 * d + 1:.2f} ms); medians of "
              f"{len(p50['direct'])} alternated runs of {args.latency_requests}")
        print(f"  the floor of a Python gRPC hop here: through benchmarks/bare_relay.py {b:.2f} ms (+{b - d:.2f} ms); "
              f"CPU per request: router {tc:.2f} ms, bare relay {bc:.2f} ms")
        if "go relay" in hops:
            g, gc = statistics.median(p50["go relay"]) * 1e3, statistics.median(cpu["go relay"]) * 1e3
            print(f"  the same hop compiled (benchmarks/go_relay, grpc-go): {g:.2f} ms (+{g - d:.2f} ms), "
                  f"CPU per request {gc:.2f} ms")
    finally:
        for svc in reversed(services):
            if isinstance(svc, subprocess.Popen):
                svc.terminate()
                svc.wait(10)
            else:
                svc.stop()
        if s3 is not None:
            s3.terminate()
            s3.wait(10)


if __name__ == "__main__":
    main()
