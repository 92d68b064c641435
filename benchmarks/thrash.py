"""Many adapters, skewed traffic: the tiered executor against the same executor with all resident.

    .venv/bin/python benchmarks/thrash.py [--rounds 3] [--requests 192] [--concurrency 32]
                                          [--skip-many] [--skip-tiers] [--many-shapes heavy,slora]
                                          [--device {cpu,cuda}] [--device-cache-bytes N]
                                          [--lora-dtype bfloat16]

The CPU benchmark model (4 layers, hidden 512, fp32; benchmarks/throughput.py's) and 256 rank-16
adapters on all seven projections (2.3 MiB each). Printed, side by side, medians of interleaved rounds:

1. Zipf(1) over 256 adapters, closed loop at --concurrency requests in flight (32-token prompts,
   16 new tokens): an engine whose host arena holds 48 adapters (the rest on its disk tier, which a
   real registry subprocess filled, in steady state: every adapter fetched and packed once) against
   one holding all 256, preloaded; on CPU there are no device slots, the arena is what the kernel
   reads. Throughput (generated tokens/s) and median / p90 time to first token, and the ratios
   (goals: throughput >= 0.90x, median TTFT <= 1.2x). The tiered engine's measured host hit rate.
2. The eviction policy: hit rates of GDSF and plain LRU replaying the same Zipf trace with room for
   48 adapters.
3. Idle TTFT of one request whose adapter is in each tier: host arena, disk tier, registry only
   (a real registry subprocess; fetched, verified, parsed and packed), and on the all-resident engine.
   On CPU there is no device tier: the host arena is what the kernel reads (goal: host hit <= 1.2x the
   all-resident engine's).
4. Throughput with 5 against 2,000 adapters resident (uniform traffic over them; goal: loss <= 3%).
   The 2,000 are distinct arena entries whose weights are read from 16 adapter files in turn (their
   pages, page indexes and traffic are distinct; only the bytes on disk repeat). Two shapes: the
   adapter-heavy one above ("heavy": rank 16 on all seven projections of a hidden-512 model), and
   S-LoRA's adapter-to-base byte ratio ("slora": rank 8 on q, k, v, o of a hidden-2048 model, one
   layer so that 2,000 fit in a CPU box's memory; the ratio of 32 adapters' bytes to the base's is printed).

--lora-dtype bfloat16 gives every engine bfloat16 adapter pages under the float32 model (the executor's
flag): each adapter takes half the arena, and the printed byte ratio is the pages' (half fp32's).

--device cuda runs the engines on the GPU: their kernel reads the device tier (--device-cache-bytes,
0 -> automatic), filled from the host arena; on CPU (default) the kernel reads the host arena unless
--device-cache-bytes gives a device tier (a second page pool filled by copy), whose hit rate is then
printed too.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from throughput import SPEC

from services.bench import percentile
from services.executor.adapters.policy import GDSFPolicy, LRUPolicy, simulate
from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.synthetic import ALL_MODULES, AdapterSpec, ModelSpec, write_adapter, write_model

N_ADAPTERS, HOST_SLOTS = 256, 48
PROMPT, NEW = 32, 16
DEVICE = {"device": "cpu", "device_cache_bytes": 0, "lora_dtype": "auto"}   # from --device, ..., --lora-dtype
SLORA_SPEC = ModelSpec(arch="llama", hidden=2048, intermediate=5504, layers=1, heads=16, kv_heads=16,
                       vocab=4096, max_positions=512, seed=5)   # 1 layer: 2,000 adapters fit a CPU box
SLORA_ADAPTER = AdapterSpec(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def zipf_trace(n_keys: int, n: int, seed: int, alpha: float = 1.0) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** alpha for k in range(n_keys)]
    return rng.choices(range(n_keys), weights, k=n)


class CyclingSource(LocalDirSource):
    """adapter ids "m/<i>" read from the files of adapter i % len(files) (section 4)."""

    def __init__(self, dirs: list[pathlib.Path]):
        super().__init__(dirs[0].parent)
        self.dirs = dirs

    def read(self, adapter_id, version, reader):
        i = int(adapter_id.split("/")[1])
        return 1, reader(self.dirs[i % len(self.dirs)]), "disk"


def run_closed_loop(engine: Engine, adapters: list[str], concurrency: int, seed: int, spec=SPEC):
    """Every request in `adapters` order, `concurrency` in flight. -> (tokens/s, TTFTs in s)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, spec.vocab, (PROMPT,), generator=g).tolist() for _ in adapters]
    lock, done_all = threading.Lock(), threading.Event()
    state = {"next": 0, "done": 0, "tokens": 0}
    first: dict[str, float] = {}
    start: dict[str, float] = {}
    errors = []

    def submit_next() -> None:
        i = state["next"]
        if i >= len(adapters):
            return
        state["next"] += 1
        rid = f"t{seed}-{i}"
        start[rid] = time.perf_counter()
        engine.submit(GenerationRequest(rid, prompt_token_ids=prompts[i], adapter_id=adapters[i],
                                        sampling=SamplingOptions(max_new_tokens=NEW, ignore_eos=True)),
                      on_event)

    def on_event(ev) -> None:
        with lock:
            if ev.request_id not in first and ev.token_ids:
                first[ev.request_id] = time.perf_counter() - start[ev.request_id]
            state["tokens"] += len(ev.token_ids)
            if ev.error is not None:
                errors.append(ev.error)
            if ev.finish_reason or ev.error:
                state["done"] += 1
                if state["done"] == len(adapters):
                    done_all.set()
                else:
                    submit_next()

    t0 = time.perf_counter()
    with lock:
        for _ in range(min(concurrency, len(adapters))):
            submit_next()
    if not done_all.wait(600):
        raise SystemExit("requests did not finish")
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]!r}")
    return state["tokens"] / dt, sorted(first.values())


pct = percentile       # services.bench's: one percentile helper everywhere


def host_stat(engine: Engine):
    return next(t for t in engine.status().tier_stats if t.tier == "host")


def make_engine(model_dir, source, host_bytes, **kw) -> Engine:
    cfg = ExecutorConfig(base_model=str(model_dir), dtype="float32", max_batch_size=64,
                         max_lora_rank=16, host_cache_bytes=host_bytes, enable_prefix_caching=False,
                         **{**DEVICE, **kw})
    e = Engine(cfg, source)
    e.start()
    return e


def registry_source(reg, disk: pathlib.Path):
    from services.executor.registry_source import DiskAdapterStore, RegistryAdapterSource
    return RegistryAdapterSource(reg.address, DiskAdapterStore(disk))


def start_registry(work: pathlib.Path, root: pathlib.Path, names: list[str]):
    import grpc

    from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
    from services.common.harness import Service
    reg = Service("registry", "--data-dir", str(work / "registry")).start()
    with grpc.insecure_channel(reg.address) as ch:
        stub = registry_pb2_grpc.AdapterRegistryStub(ch)
        for n in names:
            stub.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                adapter_id=n, source=f"file://{root / n}"), timeout=60)
    return reg


def tiers_section(args, model_dir, work, reg, names, per_adapter):
    tiered = make_engine(model_dir, registry_source(reg, work / "disk-tiered"), HOST_SLOTS * per_adapter)
    resident = make_engine(model_dir, registry_source(reg, work / "disk-resident"),
                           (N_ADAPTERS + 2) * per_adapter)
    for n in names:
        resident.load_adapter(n, 0)
        tiered.load_adapter(n, 0)       # steady state: on its disk tier, packed image made once
    engines = {"tiered": tiered, "all-resident": resident}
    warm = [names[k] for k in zipf_trace(N_ADAPTERS, args.requests, seed=999)]
    for e in engines.values():
        run_closed_loop(e, warm, args.concurrency, 999)            # warm-up, untimed
    res = {k: {"tps": [], "ttft50": [], "ttft90": []} for k in engines}
    h0 = host_stat(tiered)
    for rnd in range(args.rounds):
        adapters = [names[k] for k in zipf_trace(N_ADAPTERS, args.requests, seed=rnd)]
        order = list(engines.items()) if rnd % 2 == 0 else list(engines.items())[::-1]
        for name, e in order:
            tps, ttfts = run_closed_loop(e, adapters, args.concurrency, rnd)
            res[name]["tps"].append(tps)
            res[name]["ttft50"].append(statistics.median(ttfts))
            res[name]["ttft90"].append(pct(ttfts, 0.9))
    h1 = host_stat(tiered)
    d1 = next(t for t in tiered.status().tier_stats if t.tier == "device")
    hits, misses = h1.hits - h0.hits, h1.misses - h0.misses
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    print(f"\n1. Zipf(1) over {N_ADAPTERS} adapters, {args.requests} requests/round at concurrency "
          f"{args.concurrency} ({PROMPT}-token prompts, {NEW} new tokens), {args.rounds} interleaved rounds")
    for k in engines:
        print(f"   {k:<13} {med[k]['tps']:8.1f} tok/s   TTFT p50 {med[k]['ttft50'] * 1e3:7.1f} ms   "
              f"p90 {med[k]['ttft90'] * 1e3:7.1f} ms")
    t, r = med["tiered"], med["all-resident"]
    print(f"   tiered / all-resident: throughput {t['tps'] / r['tps']:.3f}x (goal >= 0.90), "
          f"median TTFT {t['ttft50'] / r['ttft50']:.3f}x (goal <= 1.2)")
    print(f"   tiered host arena ({HOST_SLOTS} adapters): hit rate {hits / max(hits + misses, 1):.3f} "
          f"over the timed rounds, {h1.evictions - h0.evictions} evictions")
    if d1.bytes_capacity:
        print(f"   tiered device tier ({d1.bytes_capacity / 2**20:.0f} MiB): {d1.hits} hits, {d1.misses} misses, "
              f"{d1.evictions} evictions since start")

    trace = zipf_trace(N_ADAPTERS, 20_000, seed=7)
    print(f"\n2. eviction policy, Zipf(1) trace of 20,000 over {N_ADAPTERS} adapters, room for {HOST_SLOTS}: "
          f"GDSF hit rate {simulate(trace, HOST_SLOTS, GDSFPolicy()):.3f}, "
          f"LRU {simulate(trace, HOST_SLOTS, LRUPolicy()):.3f}")
    return tiered, resident


def idle_ttft(engine: Engine, adapter: str, seed: int) -> float:
    return run_closed_loop(engine, [adapter], 1, seed)[1][0]


def idle_section(args, model_dir, work, reg, names, per_adapter, resident):
    disk = work / f"disk-idle-{time.time_ns()}"
    src = registry_source(reg, disk)
    e = make_engine(model_dir, src, 8 * per_adapter)
    samples = {"host": [], "disk": [], "disk (packed)": [], "registry": [], "all-resident": []}
    k = args.idle_samples
    for i in range(k):
        a_reg, a_disk, a_packed = names[i], names[k + i], names[2 * k + i]
        src.read(a_disk, 0, lambda p: None)                  # on disk, never parsed here
        e.load_adapter(a_packed, 0)                           # on disk with its packed image
        e.adapters.unload(a_packed)
        samples["registry"].append(idle_ttft(e, a_reg, i))
        samples["disk"].append(idle_ttft(e, a_disk, i))
        samples["disk (packed)"].append(idle_ttft(e, a_packed, i))
        samples["host"].append(idle_ttft(e, a_reg, 100 + i))  # now in the arena
        samples["all-resident"].append(idle_ttft(resident, a_reg, 100 + i))
        for a in (a_reg, a_disk, a_packed):                  # keep the arena from filling
            e.adapters.unload(a)
    e.stop()
    src.close()
    med = {t: statistics.median(v) * 1e3 for t, v in samples.items()}
    print(f"\n3. idle TTFT by the tier holding the adapter (medians of {args.idle_samples}; "
          "CPU: no device tier, the host arena is what the kernel reads)")
    for t, v in med.items():
        print(f"   {t:<13} {v:7.2f} ms")
    print(f"   host hit / all-resident: {med['host'] / med['all-resident']:.3f}x (goal <= 1.2)")


def many_section(args, model_dir, dirs, per_adapter, spec, label):
    counts = (5, 2000)
    engines = {n: make_engine(model_dir, CyclingSource(dirs), (n + 2) * per_adapter,
                              device_cache_bytes=(n + 2) * per_adapter if DEVICE["device_cache_bytes"]
                              else 0) for n in counts}
    for n, e in engines.items():
        t0 = time.perf_counter()
        for i in range(n):
            e.load_adapter(f"m/{i}", 0)
        print(f"   loaded {n} adapters in {time.perf_counter() - t0:.1f} s")
    base = engines[5].base_weight_bytes
    tps = {n: [] for n in counts}
    for rnd in range(args.rounds):
        for n in (counts if rnd % 2 == 0 else counts[::-1]):
            rng = random.Random(rnd)
            adapters = [f"m/{rng.randrange(n)}" for _ in range(args.many_requests)]
            tps[n].append(run_closed_loop(engines[n], adapters, args.concurrency, 50 + rnd, spec)[0])
    for e in engines.values():
        e.stop()
    a, b = statistics.median(tps[5]), statistics.median(tps[2000])
    print(f"\n4. [{label}] uniform traffic over 5 vs 2,000 resident adapters ({args.rounds} interleaved "
          f"rounds of {args.many_requests}): {a:.1f} vs {b:.1f} tok/s, loss {100 * (1 - b / a):.1f}% "
          f"(goal <= 3%; S-LoRA 5.5%); 32 adapters' bytes / base bytes = "
          f"{32 * per_adapter / base:.3f} (one adapter {per_adapter / 2**20:.2f} MiB of pages, base "
          f"{base / 2**20:.0f} MiB)")


def slora_shape(work: pathlib.Path):
    """S-LoRA's byte ratio: (model dir, 16 adapter dirs, one adapter's arena bytes)."""
    model_dir = work / "model-slora"
    if not (model_dir / "config.json").exists():
        write_model(model_dir, SLORA_SPEC)
    dirs = []
    for i in range(16):
        d = work / "adapters-slora" / f"s{i:02d}"
        if not (d / "adapter_model.safetensors").exists():
            write_adapter(d, SLORA_SPEC, AdapterSpec(**{**SLORA_ADAPTER.__dict__, "seed": 2000 + i}))
        dirs.append(d)
    probe = make_engine(model_dir, LocalDirSource(dirs[0].parent), 64 << 20)
    probe.load_adapter(dirs[0].name, 0)
    per_adapter = host_stat(probe).bytes_used
    probe.stop()
    return model_dir, dirs, per_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--idle-samples", type=int, default=5)
    ap.add_argument("--skip-many", action="store_true")
    ap.add_argument("--skip-tiers", action="store_true")
    ap.add_argument("--many-shapes", default="heavy,slora",
                    help="section 4's shapes, comma-separated: heavy (adapter-heavy), slora (S-LoRA's ratio)")
    ap.add_argument("--many-requests", type=int, default=96, help="requests per round in section 4")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--device-cache-bytes", type=int, default=0,
                    help="the engines' device tier (CUDA: 0 -> automatic; CPU: 0 -> none)")
    ap.add_argument("--lora-dtype", choices=("auto", "bfloat16"), default="auto",
                    help="the engines' adapter pages (bfloat16 under the float32 model: half the bytes)")
    ap.add_argument("--work-dir", default="", help="reuse the model and adapters written there")
    args = ap.parse_args()
    DEVICE.update(device=args.device, device_cache_bytes=args.device_cache_bytes, lora_dtype=args.lora_dtype)
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="thrash-"))
    for old in [*work.glob("disk-*"), work / "registry"]:   # an earlier run's tiers: start cold
        shutil.rmtree(old, ignore_errors=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        write_model(model_dir, SPEC)
    root = work / "adapters"
    names = [f"z{i:03d}" for i in range(N_ADAPTERS)]
    for i, n in enumerate(names):
        if not (root / n / "adapter_model.safetensors").exists():
            write_adapter(root / n, SPEC, AdapterSpec(rank=16, alpha=32, targets=ALL_MODULES, seed=1000 + i))
    probe = make_engine(model_dir, LocalDirSource(root), 64 << 20)
    probe.load_adapter(names[0], 0)
    per_adapter = host_stat(probe).bytes_used
    probe.stop()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; adapter pages {args.lora_dtype}; "
          f"model {work / 'model'}; "
          f"one rank-16 adapter takes {per_adapter / 2**20:.2f} MiB of arena")
    if not args.skip_tiers:
        reg = start_registry(work, root, names)
        try:
            tiered, resident = tiers_section(args, model_dir, work, reg, names, per_adapter)
            tiered.stop()
            idle_section(args, model_dir, work, reg, names, per_adapter, resident)
            resident.stop()
        finally:
            reg.stop()
    if not args.skip_many:
        shapes = args.many_shapes.split(",")
        if "heavy" in shapes:
            many_section(args, model_dir, [root / n for n in names[:16]], per_adapter, SPEC,
                         "adapter-heavy: rank 16 on 7 modules, hidden 512")
        if "slora" in shapes:
            m, dirs, per = slora_shape(work)
            many_section(args, m, dirs, per, SLORA_SPEC, "S-LoRA ratio: rank 8 on q,k,v,o, hidden 2048")


if __name__ == "__main__":
    main()
