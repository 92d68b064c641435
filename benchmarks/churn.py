"""Register / generate / delete churn against a real registry and executor: does memory stay flat,
and does any deleted version stay held?

    .venv/bin/python benchmarks/churn.py [--minutes 5] [--settle-minutes 1] [--adapters 4]
                                         [--device-cache-bytes N]

Each cycle registers a new version of each of --adapters ids (fresh random weights), generates 4
tokens with each (latest, and the superseded version by number), then deletes the superseded
version through the registry (the change feed tells the executor). Prints the executor's RSS after
--settle-minutes and at the end (goal: within 5%), the versions deleted, and how many deleted
versions GetStatus still reports held in any tier (goal: 0). The executor runs on the CPU with the
benchmark's tiny model; --device-cache-bytes gives it a device tier too.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.gen.openlora.v1 import (  # noqa: E402
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from services.common.harness import Service, rss_mib  # noqa: E402
from services.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model  # noqa: E402

SPEC = ModelSpec(arch="llama", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=1024,
                 seed=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--settle-minutes", type=float, default=1)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--device-cache-bytes", type=int, default=0)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="churn-"))
    model = write_model(work / "model", SPEC)
    reg = Service("registry", "--data-dir", str(work / "registry"), log_path=work / "registry.log").start()
    exe = Service("executor", "--registry", reg.address, "--base-model", str(model), "--device", "cpu",
                  "--disk-cache-dir", str(work / "disk"), "--host-cache-bytes", str(64 << 20),
                  "--device-cache-bytes", str(args.device_cache_bytes),
                  log_path=work / "executor.log").start()
    deleted: set[tuple[str, int]] = set()
    try:
        with grpc.insecure_channel(reg.address) as rc, grpc.insecure_channel(exe.address) as ec:
            registry = registry_pb2_grpc.AdapterRegistryStub(rc)
            ex = executor_pb2_grpc.ExecutorStub(ec)
            pid = exe.proc.pid
            t0 = time.monotonic()
            settled = None
            cycle = 0
            n_gen = 0
            while time.monotonic() - t0 < args.minutes * 60:
                cycle += 1
                for a in range(args.adapters):
                    aid = f"churn/a{a}"
                    path = write_adapter(work / "src" / f"{a}-{cycle}", SPEC,
                                         AdapterSpec(rank=8, seed=cycle * 100 + a))
                    v = registry.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                        adapter_id=aid, source=f"file://{path}"), timeout=60).version
                    for version in (0, v - 1) if v > 1 else (0,):
                        ex.Generate(common_pb2.GenerateRequest(
                            request_id=f"c{cycle}-{a}-{version}", adapter_id=aid, adapter_version=version,
                            prompt_token_ids=[3, 5, 7, 9],
                            sampling=common_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True)),
                            timeout=120)
                        n_gen += 1
                    if v > 1:
                        registry.DeleteAdapter(registry_pb2.DeleteAdapterRequest(adapter_id=aid, version=v - 1),
                                               timeout=30)
                        deleted.add((aid, v - 1))
                    for old in (work / "src").glob(f"{a}-{cycle - 1}"):   # keep the scratch small
                        for f in old.iterdir():
                            f.unlink()
                        old.rmdir()
                if settled is None and time.monotonic() - t0 >= args.settle_minutes * 60:
                    settled = rss_mib(pid)
            time.sleep(2)                                   # the last deletions reach the executor
            end = rss_mib(pid)
            st = ex.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
            held = [(a.adapter_id, a.version) for a in st.adapters if (a.adapter_id, a.version) in deleted]
    finally:
        exe.stop()
        reg.stop()
    settled = settled or end
    print(f"{args.minutes:g} min of churn: {cycle} cycles x {args.adapters} adapters, {n_gen} generations, "
          f"{len(deleted)} versions deleted")
    print(f"executor RSS {settled:.1f} MiB after {args.settle_minutes:g} min, {end:.1f} MiB at the end: "
          f"{100 * (end / settled - 1):+.1f}% (goal within 5%)")
    print(f"deleted versions still held (GetStatus, any tier): {len(held)} (goal 0); "
          f"tiers: " + ", ".join(f"{executor_pb2.AdapterTier.Name(t.tier)} {t.adapters}" for t in st.tier_stats))


if __name__ == "__main__":
    main()
