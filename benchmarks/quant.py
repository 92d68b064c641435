"""A quantized base against fp32 and bf16, side by side: base bytes, decode tokens/s (base only and
mixed adapters) and quality.

    .venv/bin/python benchmarks/quant.py [--hidden 2048] [--layers 8] [--batch 32] [--new-tokens 16]
                                         [--adapters 32] [--rounds 3] [--group-size 128] [--skip-kl]
                                         [--engines fp32,bf16,int8,int4,int8+bf16,int4+bf16]
    (benchmarks/throughput.py --quantization int8,int4 runs the same with fp32, bf16 and those)

A random Llama (hidden 2048, 8 layers, intermediate 5632, vocab 4096 by default: 1.5 GB of float32
weights, far past the caches) written as a Hugging Face directory, served by six engines in this one
process:
fp32, bf16, and int8 / int4 with float32 and with bfloat16 activations. Each round runs every engine
in turn, base only and then mixed (--batch requests, each with its own of --adapters rank-8 adapters
on all seven projections, round-robin), --new-tokens greedy tokens from 16-token prompts; decode
tokens/s counts the tokens after each request's first, from the moment every request has its first
token to the last. Prints, per engine, the base's bytes (GetStatus' base_weight_bytes) and the
medians over rounds of both rates, their ratio to fp32's, and mixed/base: once by the wall clock and
once by the engine thread's CPU time over the same spans (one torch thread: all the step's work runs
there; on a shared host other processes' load swings the first, much less the second).

First, one projection's GEMM alone (gate_proj's shape) at 1 and 32 tokens, ms a call, all six kinds
alternated (--gemm-only: only that). Quality (unless --skip-kl): mean KL(fp32 || quantized) of next-token distributions, teacher-forced over
512 positions of a smaller random model (hidden 512, 4 layers, vocab 4096), transformers on the
dequantized weights with the projections' inputs rounded to bfloat16 (what the engine serves;
tests/test_quant.py checks the engine equals them).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.executor.model import quant
from services.synthetic import ALL_MODULES, AdapterSpec, ModelSpec, write_adapter, write_model

ENGINES = {   # name -> (dtype, quantization)
    "fp32": ("float32", "none"), "bf16": ("bfloat16", "none"),
    "int8": ("float32", "int8"), "int4": ("float32", "int4"),
    "int8+bf16": ("bfloat16", "int8"), "int4+bf16": ("bfloat16", "int4"),
}
PROMPT_LEN = 16


def decode_rate(engine: Engine, prompts: list[list[int]], adapters: list[str], new_tokens: int,
                cpu: bool = False) -> float | tuple[float, float]:
    """Decode tokens/s: tokens after each request's first, from the last first token to the end.
    cpu: also those tokens per second of the engine thread's CPU time over the same span (the
    callbacks run on that thread), which other processes' load on a shared host barely moves."""
    lock, done, first, count, end_cpu = threading.Lock(), threading.Event(), {}, {}, []
    tag = time.perf_counter()

    def on_event(ev):
        with lock:
            if ev.error is not None:
                raise SystemExit(f"request failed: {ev.error}")
            first.setdefault(ev.request_id, (time.perf_counter(), time.thread_time()))
            count[ev.request_id] = count.get(ev.request_id, 0) + len(ev.token_ids)
            if ev.finish_reason and sum(c == new_tokens for c in count.values()) == len(prompts):
                end_cpu.append(time.thread_time())
                done.set()

    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        engine.submit(GenerationRequest(f"r{i}-{tag}", prompt_token_ids=p, adapter_id=a,
                                        sampling=SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)),
                      on_event)
    done.wait()
    end = time.perf_counter()
    tokens = len(prompts) * (new_tokens - 1)
    wall = tokens / (end - max(w for w, _ in first.values()))
    return (wall, tokens / (end_cpu[0] - max(c for _, c in first.values()))) if cpu else wall


def mean_kl(group_size: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM
    spec = ModelSpec(arch="llama", hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4,
                     vocab=4096, max_positions=512, seed=5, tokenizer=False)
    ids = torch.randint(0, spec.vocab, (1, 512), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        src = write_model(pathlib.Path(tmp) / "fp32", spec)

        def logprobs(path, served=True):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            if served:   # the quantized GEMMs multiply the projections' inputs rounded to bfloat16
                quant.round_projection_inputs(model, ALL_MODULES)
            with torch.no_grad():
                return torch.log_softmax(model(ids).logits[0].double(), -1)

        ref, out = logprobs(src, served=False), {}
        for method in ("int8", "int4"):
            quant.write_dequantized(src, pathlib.Path(tmp) / method, method, group_size, ALL_MODULES)
            lq = logprobs(pathlib.Path(tmp) / method)
            out[method] = float((ref.exp() * (ref - lq)).sum(-1).mean())
    return out


def gemm_times(n: int, k: int, group: int, rounds: int) -> None:
    """One projection's base GEMM alone (ms of this thread's CPU time a call, medians of alternated
    rounds), T = 1 and 32."""
    from services.executor import ops
    ops.ensure_built()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    q, s = quant.quantize_int8(w)
    wt = quant.quantize_int4(w, group)
    packed = ops.pack_weight(w)
    fp32 = quant.Prepacked(w, packed, None) if packed is not None else (lambda x: x @ w.T)
    wb = w.bfloat16()
    cpu = torch.device("cpu")
    gemms = {"fp32": (fp32, torch.float32), "bf16": (lambda x: x @ wb.T, torch.bfloat16),
             "int8": (quant.Int8Linear(q, s, None, torch.float32), torch.float32),
             "int4": (quant.Int4Linear(wt, None, torch.float32, cpu), torch.float32),
             "int8+bf16": (quant.Int8Linear(q, s, None, torch.bfloat16), torch.bfloat16),
             "int4+bf16": (quant.Int4Linear(wt, None, torch.bfloat16, cpu), torch.bfloat16)}
    for tokens in (1, 32):
        times = {name: [] for name in gemms}
        for _ in range(rounds):
            for name, (f, dtype) in gemms.items():
                x = torch.randn(tokens, k).to(dtype)
                f(x)
                t0 = time.thread_time()
                for _ in range(10):
                    f(x)
                times[name].append((time.thread_time() - t0) / 10 * 1e3)
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"GEMM {n}x{k}, {tokens} token(s), CPU ms a call (medians of {rounds}): " + ", ".join(
            f"{name} {m:.2f} ({med['fp32'] / m:.2f}x)" for name, m in med.items()), flush=True)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--skip-kl", action="store_true")
    ap.add_argument("--lora-dtype", default="auto", choices=("auto", "bfloat16"),
                    help="the adapter pages' dtype in every engine (bfloat16: --lora-dtype bfloat16; the "
                         "bf16 engine's pages are bfloat16 either way)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--gemm-only", action="store_true", help="only time one projection's GEMM (gate_proj's shape)")
    args = ap.parse_args()
    gemm_times(args.intermediate, args.hidden, args.group_size, max(args.rounds, 5))
    if args.gemm_only:
        return
    side_by_side(args, [n.strip() for n in args.engines.split(",")])


def side_by_side(args, names: list[str]) -> None:
    """KL (unless args.skip_kl), then decode tokens/s of the engines names (keys of ENGINES), base only
    and mixed, alternated over args.rounds rounds; prints the table."""
    if not args.skip_kl:
        kl = mean_kl(args.group_size)
        print(f"mean KL vs fp32 over 512 positions (hidden 512 model, group {args.group_size}): "
              f"int8 {kl['int8']:.2e} nats, int4 {kl['int4']:.2e} nats", flush=True)

    spec = ModelSpec(arch="llama", hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                     heads=args.hidden // 128, kv_heads=max(1, args.hidden // 256), vocab=4096,
                     max_positions=256, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model_dir = write_model(tmp / "model", spec)
        root = tmp / "adapters"
        adapter_ids = [f"a{i:02d}" for i in range(args.adapters)]
        for i, a in enumerate(adapter_ids):
            write_adapter(root / a, spec, AdapterSpec(rank=8, alpha=16, targets=ALL_MODULES, seed=100 + i))
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, spec.vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(args.batch)]
        mixed = [adapter_ids[i % len(adapter_ids)] for i in range(args.batch)]
        kv_bytes = 2 * spec.layers * spec.kv_heads * spec.head_dim * 4 * max(args.batch, 4) * 64
        per_adapter = sum(8 * (n + k) for n, k in map(spec.module_shape, ALL_MODULES)) * spec.layers * 4
        arena = 2 * per_adapter * len(set(mixed)) + 64 * 2**20      # the adapters in float32, twice over
        engines = {}
        for name in names:
            dtype, method = ENGINES[name]
            engines[name] = Engine(ExecutorConfig(
                base_model=str(model_dir), device="cpu", dtype=dtype, quantization=method,
                quantization_group_size=args.group_size, max_lora_rank=8, max_batch_size=args.batch,
                max_prefill_tokens=args.batch * PROMPT_LEN, kv_cache_bytes=kv_bytes,
                host_cache_bytes=arena, enable_prefix_caching=False, lora_dtype=args.lora_dtype),
                LocalDirSource(root))
            for a in set(mixed):
                engines[name].load_adapter(a, 0)
            engines[name].start()
        rates = {(n, m): [] for n in names for m in ("base", "mixed")}       # (wall, CPU) tok/s
        try:
            decode_rate(engines[names[0]], prompts[:2], [""] * len(prompts[:2]), 3)      # warm-up
            for r in range(args.rounds):
                for name in names:
                    for mode, ads in (("base", [""] * len(prompts)), ("mixed", mixed)):
                        rates[name, mode].append(decode_rate(engines[name], prompts, ads, args.new_tokens, cpu=True))
                print(f"round {r + 1}/{args.rounds} (wall; engine-thread CPU): " + ", ".join(
                    f"{n} {rates[n, 'base'][-1][0]:.1f}/{rates[n, 'mixed'][-1][0]:.1f}; "
                    f"{rates[n, 'base'][-1][1]:.1f}/{rates[n, 'mixed'][-1][1]:.1f}" for n in names), flush=True)
            status = {n: e.status() for n, e in engines.items()}
        finally:
            for e in engines.values():
                e.stop()

    ref = names[0]
    print(f"\nmodel: hidden {spec.hidden}, {spec.layers} layers, intermediate {spec.intermediate}, vocab "
          f"{spec.vocab}; {args.batch} sequences, {args.new_tokens} new tokens, {args.adapters} rank-8 "
          f"adapters on all projections (mixed, --lora-dtype {args.lora_dtype}); int4 group {args.group_size}; torch threads "
          f"{torch.get_num_threads()}; medians of {args.rounds} alternated rounds")
    for i, clock in enumerate(("wall clock", "engine-thread CPU time")):
        med = {k: statistics.median(r[i] for r in v) for k, v in rates.items()}
        print(f"decode tokens/s by {clock}:")
        print(f"{'engine':<10} {'base MiB':>9} {'base tok/s':>11} {'vs ' + ref:>8} {'mixed tok/s':>12} "
              f"{'vs ' + ref:>8} {'mixed/base':>11}")
        for n in names:
            b, m = med[n, "base"], med[n, "mixed"]
            print(f"{n:<10} {status[n].base_weight_bytes / 2**20:>9.1f} {b:>11.1f} {b / med[ref, 'base']:>7.2f}x "
                  f"{m:>12.1f} {m / med[ref, 'mixed']:>7.2f}x {m / b:>11.2f}")


if __name__ == "__main__":
    main()
