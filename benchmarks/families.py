"""The model families' benchmark models, and the MoE grouped-experts measurement.

    .venv/bin/python benchmarks/families.py [--tokens 64] [--repeats 20] [--threads 1]
    .venv/bin/python benchmarks/families.py --decode-step qwen3moe|mixtral [--requests 64] [--adapters 32] [--rank 16]
                                            [--lora-dtype bfloat16]

Prints, for one Qwen3-MoE layer's experts (hidden 512, 8 experts, top-2, expert intermediate 384,
float32 CPU), the time of the engine's grouped path (model/moe.py: pairs sorted by expert, one GEMM
per expert) and of a per-token loop over each token's experts, and their ratio (goal >= 3x at 64
tokens). `write_family(root, arch, adapters)` writes the model and PEFT adapters that
`benchmarks/throughput.py --arch qwen3moe|mixtral` serves (both of the same size: 8 experts top-2,
expert intermediate 384).

--decode-step ARCH instead captures one decode step of that workload (64 tokens, 32 adapters mixed, and
base-only) and runs the model on it alone, alternated, timed by CPU time: the mixed/base ratio of the
forward pass without the host's wall-clock noise, and the LoRA op's time and the adapter bytes it reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from services.executor import ops
from services.executor.model.config import ModelConfig
from services.executor.model.moe import Experts

# the CPU-sized MoE of the throughput benchmark: throughput.py's Llama's shape with 8 experts, top-2
QWEN3MOE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, moe_intermediate_size=384,
                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
# Mixtral of the same size (its experts' width is intermediate_size; no dense layers, no q/k norm)
MIXTRAL = dict(vocab_size=4096, hidden_size=512, intermediate_size=384, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_local_experts=8,
               num_experts_per_tok=2, max_position_embeddings=512, sliding_window=None,
               bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _family(arch: str):
    """-> (config class, model class, config kwargs) of a benchmarked MoE."""
    if arch == "qwen3moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        return Qwen3MoeConfig, Qwen3MoeForCausalLM, QWEN3MOE
    if arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM
        return MixtralConfig, MixtralForCausalLM, MIXTRAL
    raise SystemExit(f"--arch {arch}: only llama, qwen3moe and mixtral are benchmarked")


def describe(arch: str) -> str:
    """One line naming the benchmarked MoE's shape."""
    m = _family(arch)[2]
    experts = m.get("num_experts") or m["num_local_experts"]
    width = m.get("moe_intermediate_size") or m["intermediate_size"]
    return (f"{arch} {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {experts} experts "
            f"top-{m['num_experts_per_tok']} (expert intermediate {width}), vocab {m['vocab_size']}")


def write_family(root: pathlib.Path, arch: str, adapters: int, rank: int = 16) -> tuple[pathlib.Path, list[str]]:
    """-> (model dir, adapter names under root/"adapters"): a random model written by transformers
    and `adapters` PEFT adapters (random non-zero A and B) on the attention projections and, through
    target_parameters, on every expert."""
    from peft import LoraConfig, get_peft_model
    config_cls, model_cls, shape = _family(arch)
    torch.manual_seed(3)
    model = model_cls(config_cls(**shape))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    names = []
    state = model.state_dict()
    for i in range(adapters):
        base = model_cls(config_cls(**shape))
        base.load_state_dict(state)
        peft = get_peft_model(base, LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=EXPERT_PARAMS))
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        names.append(f"adapter-{i:02d}")
        peft.save_pretrained(root / "adapters" / names[-1])
    return model_dir, names


def per_token_loop(experts: Experts, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
    """The naive MoE: each token through each of its experts, one matrix-vector product at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_i.shape[1]):
            e = int(top_i[t, j])
            gate, up = (x[t] @ experts.gate_up_proj[e].T).chunk(2)
            out[t] += top_w[t, j] * ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)
    return out


def _snapshot(obj):
    """A copy of a step's ForwardBatch whose tensors outlive the runner's reused input buffers (the
    adapter arena, shared memory, is kept as is)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _snapshot(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init and f.name != "arena"})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    return obj


def decode_step(args) -> None:
    """throughput.py --arch ARCH's workload, one decode step (every request's next token, the adapters
    mixed vs base-only) captured from the engine and run again through the model alone, alternated,
    timed by the thread's CPU time (less of the host's load than wall time); then the LoRA op's own
    time and the adapter bytes it reads in that step (attention projections and experts apart)."""
    import tempfile

    from throughput import run_engine

    from services.executor.adapters.source import LocalDirSource
    from services.executor.config import ExecutorConfig
    from services.executor.engine import Engine

    root = pathlib.Path(tempfile.mkdtemp(prefix="openlora-families-"))
    model_dir, names = write_family(root, args.decode_step, args.adapters, args.rank)
    engine = Engine(ExecutorConfig(base_model=str(model_dir), dtype="float32", max_batch_size=args.requests,
                                   max_device_adapters=args.adapters, max_lora_rank=max(16, args.rank),
                                   lora_dtype=args.lora_dtype,
                                   enable_prefix_caching=False), LocalDirSource(root / "adapters"))
    for n in names:
        engine.load_adapter(n, 0)
    engine.start()
    steps, prepare, kind = {}, engine.runner.prepare, [""]

    def capture(batch, entries, spans=()):
        fb = prepare(batch, entries, spans)
        if fb.input_ids.numel() == args.requests and kind[0] not in steps:   # the first decode step
            steps[kind[0]] = _snapshot(fb)
        return fb

    engine.runner.prepare = capture
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, QWEN3MOE["vocab_size"], (args.requests, 32), generator=g).tolist()
    for kind[0], adapters in (("mixed", [names[i % len(names)] for i in range(args.requests)]),
                              ("base-only", [""] * args.requests)):
        run_engine(engine, prompts, adapters, 3)
    engine.stop()
    model, kv = engine.model, engine.kv
    times = {k: [] for k in steps}
    with torch.no_grad():
        for fb in steps.values():
            model(fb, kv)
        for _ in range(args.repeats):
            for k, fb in steps.items():
                t0 = time.thread_time()
                model(fb, kv)
                times[k].append(time.thread_time() - t0)
        op, spent = ops.lora_paged_add_, {}

        def timed(y, x, arena, page_index, seg_meta, seg_scalings, lm, seg_indptr):
            caller = "experts" if sys._getframe(1).f_globals["__name__"].endswith(".moe") else "attention"
            ip, rb = seg_indptr.tolist(), seg_meta[:, lm, 1].tolist()
            nbytes = sum(r * (x.shape[1] + y.shape[1]) * arena.element_size()
                         for g_, r in enumerate(rb) if ip[g_ + 1] > ip[g_])
            t0 = time.thread_time()
            op(y, x, arena, page_index, seg_meta, seg_scalings, lm, seg_indptr)
            t, b = spent.get(caller, (0.0, 0))
            spent[caller] = (t + time.thread_time() - t0, b + nbytes)

        ops.lora_paged_add_ = timed
        try:
            for _ in range(args.repeats):
                model(steps["mixed"], kv)
        finally:
            ops.lora_paged_add_ = op
    best = {k: min(v) for k, v in times.items()}
    print(f"{describe(args.decode_step)}: one decode step ({args.requests} tokens, {args.adapters} rank-{args.rank} "
          f"adapters mixed on q/k/v/o and every expert), float32 CPU, pages {args.lora_dtype}, {args.threads} threads; model forward "
          f"CPU time, best / median of {args.repeats} alternated")
    for k, v in times.items():
        print(f"{k:<10}: {best[k] * 1e3:7.2f} ms / {sorted(v)[len(v) // 2] * 1e3:7.2f} ms")
    print(f"mixed / base-only: {best['base-only'] / best['mixed']:.2f}x (best)")
    total_t = sum(t for t, _ in spent.values()) / args.repeats
    total_b = sum(b for _, b in spent.values()) / args.repeats
    parts = ", ".join(f"{k} {b / args.repeats / 1e6:.1f} MB in {t / args.repeats * 1e3:.2f} ms"
                      for k, (t, b) in sorted(spent.items()))
    print(f"LoRA op per step: {total_t * 1e3:.2f} ms (mean of {args.repeats}), {total_b / 1e6:.1f} MB of adapter "
          f"weights read: {total_b / total_t / 1e9:.1f} GB/s ({parts})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-step", choices=("qwen3moe", "mixtral"),
                    help="instead: one decode step of throughput.py --arch ARCH, mixed vs base-only, and "
                         "the LoRA op's time and bytes read (see decode_step)")
    ap.add_argument("--requests", type=int, default=64, help="--decode-step: tokens in the step")
    ap.add_argument("--rank", type=int, default=16, help="--decode-step: the adapters' rank")
    ap.add_argument("--adapters", type=int, default=32, help="--decode-step: adapters mixed")
    ap.add_argument("--lora-dtype", choices=("auto", "bfloat16"), default="auto",
                    help="--decode-step: the adapter pages' dtype (bfloat16: half the bytes read)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops.ensure_built()
    if args.decode_step:
        decode_step(args)
        return
    cfg = ModelConfig.from_hf({**QWEN3MOE, "architectures": ["Qwen3MoeForCausalLM"]})
    experts = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) / 23)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) / 20)
    x = torch.randn(args.tokens, cfg.hidden, generator=g)
    probs = torch.softmax(torch.randn(args.tokens, cfg.num_experts, generator=g), -1)
    top_w, top_i = probs.topk(cfg.experts_per_token, -1)

    class NoLora:   # a base-only batch: the grouped path without adapters
        paged = None

    with torch.no_grad():
        want = per_token_loop(experts, x, top_i, top_w)
        got = experts(x, top_i, top_w, NoLora)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        times = {}
        for name, fn in (("grouped", lambda: experts(x, top_i, top_w, NoLora)),
                         ("per-token loop", lambda: per_token_loop(experts, x, top_i, top_w))):
            fn()
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            times[name] = min(ts)
    print(f"MoE experts: hidden {cfg.hidden}, {cfg.num_experts} experts, top-{cfg.experts_per_token}, "
          f"expert intermediate {cfg.moe_intermediate}; {args.tokens} tokens, float32 CPU, "
          f"{args.threads} threads; best of {args.repeats}")
    for name, t in times.items():
        print(f"{name:15s}: {t * 1e3:8.3f} ms")
    print(f"grouped / per-token loop: {times['per-token loop'] / times['grouped']:.1f}x faster   (goal >= 3)")


if __name__ == "__main__":
    main()
