"""Mixed-adapter decode throughput: the executor's engine vs transformers + peft, side by side.

    .venv/bin/python benchmarks/throughput.py [--requests 64] [--adapters 32] [--skip-hf]
                                              [--dtype {float32,bfloat16}] [--device {cpu,cuda}]
                                              [--device-cache-bytes N] [--lora-dtype bfloat16]
                                              [--compare-prepack | --compare-prefix-cache |
                                               --compare-forms | --compare-lora-dtype |
                                               --quantization int8,int4]

A CPU-sized random Llama (4 layers, hidden 512, vocab 4096) written as a Hugging Face directory;
64 requests (32-token prompts, 32 new tokens, greedy, ignore_eos) over 32 rank-16 adapters (--rank) on
all seven projections. It prints the adapters' bytes against the base's: at hidden 512, rank 16 is as
heavy per token as rank 64 on a 2048-wide model (S-LoRA measured 32 adapters at about 5% of the base). Prints generated tokens/s of: the engine with mixed adapters, the engine
base-only, and transformers+peft's mixed-adapter batch generate (adapter_names=[...]).
--dtype (default float32) sets the dtype of both the engine and transformers+peft. --device cuda runs
the engine on the GPU (its device tier then holds the adapters; transformers+peft stays on the CPU
unless skipped); --device-cache-bytes gives a CPU engine a device tier too (a second page pool filled
by copy from the arena), to measure what the tier costs.

The runs repeat the same prompts, so the engine runs here with its prefix cache off: every prompt
token is computed in every run, as transformers+peft computes them.

--lora-dtype bfloat16 stores the engine's adapter pages in bfloat16 (the executor's flag); with
--compare-lora-dtype two float32 engines, fp32 pages and bf16 pages, run alternated in one process and
each one's mixed/base-only is printed.

--compare-prepack instead runs two float32 engines in this one process, one with its base weights
prepacked (the default) and one without (--no-prepack-weights), alternating their mixed-adapter and
base-only runs, and prints the tokens/s of each and the speedups (median and best).

--compare-prefix-cache instead runs two engines in this one process, with and without prefix
caching, alternated: each request's prompt is one shared --shared-prefix-token system prompt plus its
own 32 tokens (fresh in every run), over the mixed adapters. Prints tokens/s (generated, and prompt +
generated) of each, the speedups, and the prompt tokens each engine computed per run.

--compare-forms instead runs one engine over the same workload with: the 32 plain adapters (mixed);
32 DoRA twins of them (the same A/B, plus magnitudes: use_dora) mixed; base-only; every request on one
adapter X, then Y, then Z; and every request on merged_adapters cat(X, Y, Z). Alternated, best of
--repeats each. Prints DoRA / plain (goal <= 1.10) and the cat request's LoRA work (its time minus
base-only) against the sum of X's, Y's and Z's (goal <= 1.0).

--quantization int8|int4|int8,int4 instead runs benchmarks/quant.py's side-by-side on a model large
enough to be bandwidth-bound (hidden 2048, 8 layers; its flags --layers, --batch, --rounds, ... apply):
decode tokens/s of the base alone and of 32 adapters mixed for fp32, bf16 and each method (float32
activations), alternated in one process, with their ratios to fp32 and mixed/base.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import threading
import time
from statistics import median

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.synthetic import ALL_MODULES, AdapterSpec, ModelSpec, write_adapter, write_model

SPEC = ModelSpec(arch="llama", hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=4,
                 vocab=4096, max_positions=512, seed=3)


def run_engine(engine: Engine, prompts, adapters, new_tokens, merged=None) -> tuple[float, dict]:
    done, lock, out = threading.Event(), threading.Lock(), {}

    def on_event(ev):
        with lock:
            out.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.error is not None:
                raise SystemExit(f"request failed: {ev.error}")
            if ev.finish_reason:
                out[ev.request_id + ":done"] = True
                if sum(k.endswith(":done") for k in out) == len(prompts):
                    done.set()

    t0 = time.perf_counter()
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=False)):
        engine.submit(GenerationRequest(f"r{i}-{t0}", prompt_token_ids=p, adapter_id=a,
                                        sampling=SamplingOptions(max_new_tokens=new_tokens,
                                                                 ignore_eos=True),
                                        adapter_version=1 if merged and a == merged.derived_id else 0,
                                        merged=merged if merged and a == merged.derived_id else None),
                      on_event)
    done.wait()
    dt = time.perf_counter() - t0
    return dt, {k: v for k, v in out.items() if not k.endswith(":done")}


def load_hf(model_dir, adapter_root, names, dtype: torch.dtype = torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(model, adapter_root / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapter_root / n, adapter_name=n)
    return model.eval()


def run_hf(model, prompts, adapters, new_tokens) -> float:
    """One batched generate over every prompt, each row with its adapter (adapter_names=)."""
    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              adapter_names=list(adapters))
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, **kw)
    return time.perf_counter() - t0


def compare_prepack(make_engine, prompts, mixed, args) -> None:
    engines = {"prepacked": make_engine("float32"), "plain": make_engine("float32", prepack=False)}
    kinds = {"mixed": mixed, "base-only": [""] * args.requests}
    for e in engines.values():     # warm-up, untimed
        for adapters in kinds.values():
            run_engine(e, prompts, adapters, args.new_tokens)
    times = {(e, k): [] for e in engines for k in kinds}
    for _ in range(args.repeats):
        for k, adapters in kinds.items():
            for name, e in engines.items():
                times[(name, k)].append(run_engine(e, prompts, adapters, args.new_tokens)[0])
    for e in engines.values():
        e.stop()
    total = args.requests * args.new_tokens
    print(f"float32 engine, prepacked base weights vs plain, {args.repeats} alternated runs each")
    for k in kinds:
        p, q = times[("prepacked", k)], times[("plain", k)]
        print(f"{k:<10} prepacked {total / min(p):7.1f} tok/s best {total / median(p):7.1f} median | plain "
              f"{total / min(q):7.1f} best {total / median(q):7.1f} median | speedup {min(q) / min(p):.3f} "
              f"best, {median(q) / median(p):.3f} median")


def compare_lora_dtype(make_engine, prompts, mixed, args) -> None:
    """Two float32 engines, adapter pages in float32 (the default) and in bfloat16 (--lora-dtype
    bfloat16), alternated: mixed on each, base-only on each; mixed/base per engine."""
    engines = {"fp32 pages": make_engine("float32", lora_dtype="auto"),
               "bf16 pages": make_engine("float32", lora_dtype="bfloat16")}
    base = [""] * len(prompts)
    total = len(prompts) * args.new_tokens
    times = {(k, m): [] for k in engines for m in ("mixed", "base")}
    try:
        for e in engines.values():                      # warm-up, untimed
            run_engine(e, prompts, mixed, args.new_tokens)
            run_engine(e, prompts, base, args.new_tokens)
        for _ in range(args.repeats):
            for k, e in engines.items():
                times[k, "mixed"].append(run_engine(e, prompts, mixed, args.new_tokens)[0])
                times[k, "base"].append(run_engine(e, prompts, base, args.new_tokens)[0])
    finally:
        for e in engines.values():
            e.stop()
    print(f"float32 engines, adapter pages fp32 vs bf16; {args.threads} threads; {len(prompts)} requests x "
          f"({args.prompt_tokens} prompt + {args.new_tokens} new tokens), {args.adapters} rank-{args.rank} adapters; "
          f"medians of {args.repeats} alternated runs")
    for k in engines:
        m, b = median(times[k, "mixed"]), median(times[k, "base"])
        print(f"{k}: mixed {total / m:8.1f} tok/s, base-only {total / b:8.1f} tok/s, mixed / base-only "
              f"{b / m:.2f}x (goal >= 0.90)")
    ratio = median(times["fp32 pages", "mixed"]) / median(times["bf16 pages", "mixed"])
    print(f"bf16 pages / fp32 pages, mixed tok/s: {ratio:.3f}x")


def compare_prefix_cache(make_engine, names, args) -> None:
    g = torch.Generator().manual_seed(1)
    system = torch.randint(2, SPEC.vocab, (args.shared_prefix,), generator=g).tolist()

    def workload():
        own = torch.randint(2, SPEC.vocab, (args.requests, args.prompt_tokens), generator=g).tolist()
        return [system + p for p in own]

    engines = {"cached": make_engine(args.dtype, prefix_caching=True),
               "uncached": make_engine(args.dtype, prefix_caching=False)}
    mixed = [names[i % len(names)] for i in range(args.requests)]
    for e in engines.values():     # warm-up, untimed (it also fills the cached engine's prefixes)
        run_engine(e, workload(), mixed, args.new_tokens)
    times = {name: [] for name in engines}
    computed = {name: [] for name in engines}
    for _ in range(args.repeats):
        prompts = workload()
        for name, e in engines.items():
            before = e.scheduler.prefill_tokens
            times[name].append(run_engine(e, prompts, mixed, args.new_tokens)[0])
            computed[name].append(e.scheduler.prefill_tokens - before)
    for e in engines.values():
        e.stop()
    gen = args.requests * args.new_tokens
    prompt = args.requests * (args.shared_prefix + args.prompt_tokens)
    print(f"{args.dtype} engines with and without prefix caching, {args.repeats} alternated runs each: "
          f"{args.requests} requests x ({args.shared_prefix} shared + {args.prompt_tokens} own prompt tokens, "
          f"{args.new_tokens} new), {len(names)} adapters")
    for name, t in times.items():
        print(f"{name:<9} {gen / min(t):8.1f} tok/s best {gen / median(t):8.1f} median (generated); "
              f"{(gen + prompt) / median(t):8.1f} tok/s median (prompt + generated); prompt tokens "
              f"computed per run {median(computed[name]):.0f} of {prompt}")
    c, u = times["cached"], times["uncached"]
    print(f"speedup   {min(u) / min(c):.2f}x best, {median(u) / median(c):.2f}x median")


def write_dora_twins(root: pathlib.Path, model_dir: pathlib.Path, names: list[str]) -> list[str]:
    """names' adapters with use_dora and magnitudes ||W + s B A||_row * (1 +- 10%) (PEFT's layout)."""
    import json

    from safetensors.torch import load_file, save_file
    base = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    out = []
    for n in names:
        src, dst = root / "adapters" / n, root / "adapters" / f"dora-{n}"
        dst.mkdir(parents=True, exist_ok=True)
        cfg = json.loads((src / "adapter_config.json").read_text())
        t = load_file(str(src / "adapter_model.safetensors"))
        s = cfg["lora_alpha"] / cfg["r"]
        for key in [k for k in t if k.endswith("lora_A.weight")]:
            path = key[:-len(".lora_A.weight")]
            w = base[path.removeprefix("base_model.model.") + ".weight"].float()
            norm = torch.linalg.norm(w + s * t[path + ".lora_B.weight"] @ t[key], dim=1)
            t[path + ".lora_magnitude_vector"] = norm * (1 + 0.1 * (2 * torch.rand(norm.shape, generator=g) - 1))
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
        save_file(t, str(dst / "adapter_model.safetensors"))
        out.append(f"dora-{n}")
    return out


def compare_forms(engine: Engine, prompts, names, dora, args) -> None:
    from services.executor.adapters.merge import MergeSpec
    cat = MergeSpec.parse(names[:3], [1.0, 0.5, -0.7], "cat")
    engine.merged.register(cat)
    n = args.requests
    kinds = {"plain": [names[i % len(names)] for i in range(n)],
             "dora": [dora[i % len(dora)] for i in range(n)], "base": [""] * n,
             "X": [names[0]] * n, "Y": [names[1]] * n, "Z": [names[2]] * n,
             "cat(X,Y,Z)": [cat.derived_id] * n}

    def timed(adapters):
        return run_engine(engine, prompts, adapters, args.new_tokens, merged=cat)[0]

    for adapters in kinds.values():     # warm-up, untimed
        timed(adapters)
    times = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for k, adapters in kinds.items():
            times[k].append(timed(adapters))
    engine.stop()
    best = {k: min(v) for k, v in times.items()}
    total = n * args.new_tokens
    print(f"{args.dtype} {args.device}, {args.threads} threads; {n} requests x ({args.prompt_tokens} prompt + "
          f"{args.new_tokens} new tokens); rank-{args.rank} adapters on {len(ALL_MODULES)} modules; best of {args.repeats}")
    for k, t in best.items():
        print(f"{k:<11} {total / t:8.1f} tok/s  ({t:.3f} s; median {median(times[k]):.3f} s)")
    print(f"DoRA / plain ({len(dora)} adapters each, mixed): {best['dora'] / best['plain']:.3f}x time   (goal <= 1.10)")
    work = {k: best[k] - best["base"] for k in ("X", "Y", "Z", "cat(X,Y,Z)")}
    print(f"LoRA work over base-only: X {work['X']:.3f} s, Y {work['Y']:.3f} s, Z {work['Z']:.3f} s, sum "
          f"{work['X'] + work['Y'] + work['Z']:.3f} s; cat(X,Y,Z) {work['cat(X,Y,Z)']:.3f} s = "
          f"{work['cat(X,Y,Z)'] / (work['X'] + work['Y'] + work['Z']):.2f}x the sum   (goal <= 1.0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("llama", "qwen3moe", "mixtral"), default="llama",
                    help="qwen3moe / mixtral: an MoE of the same size, 8 experts top-2, adapters on attention "
                         "and every expert (benchmarks/families.py); transformers+peft skipped")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--arena-page-elems", type=int, default=0, help="the engine's flag (0: its default)")
    ap.add_argument("--rank", type=int, default=16,
                    help="the adapters' rank (the byte ratio printed: their bytes against the base's)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each kind (engine mixed, engine base-only, transformers+peft), alternated")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the engine's device")
    ap.add_argument("--device-cache-bytes", type=int, default=0,
                    help="the engine's device tier (CUDA: 0 -> automatic; CPU: 0 -> none)")
    ap.add_argument("--lora-dtype", choices=("auto", "bfloat16"), default="auto",
                    help="the engine's adapter pages (bfloat16 under float32: --lora-dtype bfloat16)")
    ap.add_argument("--compare-lora-dtype", action="store_true",
                    help="one process, alternated: mixed over fp32 pages, mixed over bf16 pages, base-only")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the engine and of transformers+peft")
    ap.add_argument("--compare-prepack", action="store_true",
                    help="float32 engine with vs without prepacked weights, alternated in one process")
    ap.add_argument("--compare-prefix-cache", action="store_true",
                    help="engine with vs without prefix caching on prompts sharing a system prompt")
    ap.add_argument("--compare-forms", action="store_true",
                    help="DoRA vs plain LoRA adapters, and a cat of 3 adapters vs their sum (see above)")
    ap.add_argument("--shared-prefix", type=int, default=192,
                    help="tokens of the shared system prompt (--compare-prefix-cache)")
    ap.add_argument("--quantization", help="int8, int4 or int8,int4: a quantized base beside fp32 and bf16 "
                                           "(benchmarks/quant.py, see above)")
    args, rest = ap.parse_known_args()
    if args.quantization:
        import quant
        qp = argparse.ArgumentParser(prog="throughput.py --quantization")
        qp.add_argument("--quantization")
        quant.add_arguments(qp)
        qargs = qp.parse_args()          # all of argv: --new-tokens, --adapters are quant.py's here
        methods = [m.strip() for m in args.quantization.split(",")]
        if not set(methods) <= {"int8", "int4"}:
            ap.error(f"--quantization takes int8, int4 or both, got {args.quantization!r}")
        quant.side_by_side(qargs, ["fp32", "bf16", *methods])
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.set_num_threads(args.threads)

    root = pathlib.Path(tempfile.mkdtemp(prefix="openlora-bench-"))
    if args.arch == "llama":
        model_dir = write_model(root / "model", SPEC)
        names = [f"adapter-{i:02d}" for i in range(args.adapters)]
        for i, n in enumerate(names):
            write_adapter(root / "adapters" / n, SPEC,
                          AdapterSpec(rank=args.rank, alpha=2 * args.rank, targets=ALL_MODULES, seed=1000 + i))
    else:
        from families import write_family
        model_dir, names = write_family(root, args.arch, args.adapters, args.rank)
        args.skip_hf = True
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, SPEC.vocab, (args.requests, args.prompt_tokens), generator=g).tolist()
    mixed = [names[i % len(names)] for i in range(args.requests)]
    total = args.requests * args.new_tokens

    def make_engine(dtype: str, prepack: bool = True, prefix_caching: bool = False,
                    lora_dtype: str | None = None) -> Engine:
        engine = Engine(ExecutorConfig(base_model=str(model_dir), device=args.device, dtype=dtype,
                                       lora_dtype=lora_dtype or args.lora_dtype,
                                       device_cache_bytes=args.device_cache_bytes,
                                       max_batch_size=args.requests, max_device_adapters=args.adapters,
                                       max_lora_rank=max(16, args.rank), prepack_weights=prepack,
                                       arena_page_elems=args.arena_page_elems,
                                       enable_prefix_caching=prefix_caching),
                        LocalDirSource(root / "adapters"))
        for n in names:
            engine.load_adapter(n, 0)
        engine.start()
        return engine

    if args.compare_prepack:
        compare_prepack(make_engine, prompts, mixed, args)
        return
    if args.compare_prefix_cache:
        compare_prefix_cache(make_engine, names, args)
        return
    if args.compare_lora_dtype:
        compare_lora_dtype(make_engine, prompts, mixed, args)
        return
    if args.compare_forms:
        dora = write_dora_twins(root, model_dir, names)
        engine = make_engine(args.dtype)
        for d in dora:
            engine.load_adapter(d, 0)
        compare_forms(engine, prompts, names, dora, args)
        return
    engine = make_engine(args.dtype)
    # Warm-up: each contender runs the whole workload once first, untimed (the first full-size runs
    # pay the allocator's fresh pages: ~20k page faults in the engine's first mixed run here).
    run_engine(engine, prompts, mixed, args.new_tokens)
    run_engine(engine, prompts, [""] * args.requests, args.new_tokens)
    hf = None
    if not args.skip_hf:
        hf = load_hf(model_dir, root / "adapters", names, getattr(torch, args.dtype))
        run_hf(hf, prompts, mixed, args.new_tokens)
    mixed_s, base_s, hf_s = [], [], []
    for _ in range(args.repeats):        # alternated, so a noisy neighbour hurts all three alike
        t, out_mixed = run_engine(engine, prompts, mixed, args.new_tokens)
        mixed_s.append(t)
        base_s.append(run_engine(engine, prompts, [""] * args.requests, args.new_tokens)[0])
        if hf is not None:
            hf_s.append(run_hf(hf, prompts, mixed, args.new_tokens))
    status = engine.status()
    device_tier = status.device_cache_bytes
    page_dtype = engine.lora_dtype         # the files hold fp32; the pages hold lora_dtype
    adapter_bytes = sum(f.stat().st_size for f in (root / "adapters").rglob("*.safetensors")) \
        * page_dtype.itemsize // 4
    engine.stop()
    assert all(len(v) == args.new_tokens for v in out_mixed.values())
    t_mixed, t_base = min(mixed_s), min(base_s)

    if args.arch != "llama":
        from families import describe
        print(f"model: {describe(args.arch)}; {args.dtype} {args.device}, "
              f"{args.threads} threads; adapters on q/k/v/o and every expert")
    else:
        print(f"model: llama {SPEC.layers} layers, hidden {SPEC.hidden}, intermediate {SPEC.intermediate}, "
              f"heads {SPEC.heads}/{SPEC.kv_heads}, vocab {SPEC.vocab}; {args.dtype} {args.device}, "
              f"{args.threads} threads; kernel {engine.kernel_backend}; device tier {device_tier} bytes")
    print(f"workload: {args.requests} requests x ({args.prompt_tokens} prompt + {args.new_tokens} new "
          f"tokens), {args.adapters} rank-{args.rank} adapters, greedy")
    print(f"adapter-to-base bytes: the {args.adapters} adapters {adapter_bytes / 2**20:.1f} MiB "
          f"({str(page_dtype).removeprefix('torch.')} pages) / base "
          f"{status.base_weight_bytes / 2**20:.1f} MiB = {adapter_bytes / status.base_weight_bytes:.1%} "
          f"(S-LoRA's shape: about 5% for 32 adapters)")
    print(f"engine mixed-adapter : {total / t_mixed:8.1f} tok/s best, {total / median(mixed_s):8.1f} median "
          f"of {args.repeats}  ({t_mixed:.2f} s)")
    print(f"engine base-only     : {total / t_base:8.1f} tok/s best, {total / median(base_s):8.1f} median "
          f"of {args.repeats}  ({t_base:.2f} s)")
    paired = median(b / m for b, m in zip(base_s, mixed_s, strict=True))
    print(f"mixed / base-only    : {t_base / t_mixed:8.2f}x best, {median(base_s) / median(mixed_s):.2f}x median, "
          f"{paired:.2f}x paired (the median of each round's own ratio)"
          f"   (goal >= {0.90 if args.arch == 'llama' else 0.85:.2f})")
    if hf_s:
        print(f"transformers+peft mixed (generate, adapter_names): {total / min(hf_s):8.1f} tok/s best, "
              f"{total / median(hf_s):8.1f} median of {args.repeats}  ({min(hf_s):.2f} s)")
        print(f"engine / transformers+peft: {min(hf_s) / t_mixed:8.2f}x best, "
              f"{median(hf_s) / median(mixed_s):.2f}x median   (goal >= 5)")


if __name__ == "__main__":
    main()
