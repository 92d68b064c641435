"""Prefix-aware routing vs routing by load and adapter only, side by side over the same executors.

Two executors (one thread each, so they share this machine's two cores fairly) behind two routers,
one with prefix affinity (the default) and one started with --no-prefix-affinity. Each run sends
--prompts system prompts of --prefix-tokens tokens, each followed by --per-prompt requests with their
own --suffix-tokens tokens (fresh random tokens every run, so no run inherits another's cache), from
--concurrency client threads, base model, greedy, --new-tokens each. Runs alternate between the two
routers. Printed per router, medians over --repeats runs: the prompt tokens the executors computed
(GetStatus prefill_tokens_computed, summed), the share of prompt tokens served from their prefix
caches, and wall time / generated tokens per second.

    .venv/bin/python benchmarks/routing.py [--repeats 5] [--prompts 4] [--per-prompt 12]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import random
import statistics
import sys
import tempfile
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.gen.openlora.v1 import common_pb2, executor_pb2, executor_pb2_grpc, router_pb2_grpc  # noqa: E402
from services.common.harness import Service  # noqa: E402
from services.synthetic import ModelSpec, write_model  # noqa: E402

SPEC = ModelSpec(arch="llama", hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=4096,
                 seed=5)


def counters(addresses: list[str]) -> tuple[int, int]:
    """(prompt tokens computed, prompt tokens taken from the prefix cache), summed over executors."""
    computed = hits = 0
    for address in addresses:
        with grpc.insecure_channel(address) as ch:
            s = executor_pb2_grpc.ExecutorStub(ch).GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
        computed += s.prefill_tokens_computed
        hits += s.prefix_cache_hit_tokens
    return computed, hits


def workload(rng: random.Random, args) -> list[list[int]]:
    prompts = []
    for _ in range(args.prompts):
        system = [rng.randrange(2, SPEC.vocab) for _ in range(args.prefix_tokens)]
        prompts += [system + [rng.randrange(2, SPEC.vocab) for _ in range(args.suffix_tokens)]
                    for _ in range(args.per_prompt)]
    rng.shuffle(prompts)
    return prompts


def run(router: str, executors: list[str], prompts: list[list[int]], args) -> dict:
    before = counters(executors)
    sampling = common_pb2.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    with grpc.insecure_channel(router) as ch:
        stub = router_pb2_grpc.RouterStub(ch)

        def one(ids):
            return stub.Generate(common_pb2.GenerateRequest(prompt_token_ids=ids, sampling=sampling),
                                 timeout=600)

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            generated = sum(len(r.token_ids) for r in pool.map(one, prompts))
        wall = time.perf_counter() - t0
    after = counters(executors)
    computed, hits = after[0] - before[0], after[1] - before[1]
    return {"computed": computed, "hit_share": hits / max(hits + computed, 1), "wall": wall,
            "tok_s": generated / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4, help="system prompts per run")
    ap.add_argument("--per-prompt", type=int, default=12, help="requests per system prompt")
    ap.add_argument("--prefix-tokens", type=int, default=192)
    ap.add_argument("--suffix-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="openlora-routing-"))
    model = write_model(work / "model", SPEC)
    env = {"OMP_NUM_THREADS": "1"}
    executors = [Service("executor", "--base-model", str(model), "--device", "cpu", "--dtype", "float32",
                         "--max-batch-size", "32", "--executor-id", f"e{i}", env=env,
                         log_path=work / f"executor{i}.log") for i in range(2)]
    routers = {}
    try:
        for e in executors:
            e.start()
        flags = [x for e in executors for x in ("--executor", e.address)]
        routers = {"prefix-aware": Service("router", *flags, log_path=work / "router-a.log").start(),
                   "load+adapter only": Service("router", *flags, "--no-prefix-affinity",
                                                log_path=work / "router-b.log").start()}
        rng = random.Random(0)
        addresses = [e.address for e in executors]
        run(routers["prefix-aware"].address, addresses, workload(rng, args)[:4], args)   # warm-up
        results = {name: [] for name in routers}
        for _ in range(args.repeats):       # alternated, fresh prompts every run
            for name, router in routers.items():
                results[name].append(run(router.address, addresses, workload(rng, args), args))
        total = args.prompts * args.per_prompt * (args.prefix_tokens + args.suffix_tokens)
        print(f"2 executors (1 thread each), {args.prompts} system prompts x {args.per_prompt} requests "
              f"({args.prefix_tokens} + {args.suffix_tokens} prompt tokens, {args.new_tokens} new), "
              f"concurrency {args.concurrency}; {total} prompt tokens a run; medians of {args.repeats} runs")
        for name, rs in results.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(f"{name:<18} prompt tokens computed {med['computed']:7.0f}  from cache {med['hit_share']:6.1%}"
                  f"  wall {med['wall']:6.2f} s  {med['tok_s']:7.1f} generated tok/s")
        a, b = ([statistics.median(r[k] for r in results[n]) for n in routers] for k in ("computed", "wall"))
        print(f"prefix-aware / load+adapter only: prompt tokens computed {a[0] / max(a[1], 1):.2f}x, "
              f"wall time {b[0] / b[1]:.2f}x")
    finally:
        for s in [*routers.values(), *executors]:
            s.stop()


if __name__ == "__main__":
    main()
