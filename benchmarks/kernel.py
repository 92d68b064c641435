"""Fused lora_linear vs the base matmul alone vs a gather+bmm LoRA, in interleaved rounds.

    .venv/bin/python benchmarks/kernel.py [--rounds 30] [--bf16] [--engine-shapes | --attention | --layer-ops]

--bf16 also runs every case (kernel cases, engine shapes, attention) in bfloat16.
--device cuda runs the kernel cases on the GPU in fp32, bf16 and fp16 (lora_linear, lora_linear_async,
torch.addmm, gather+bmm; each call alone and in bursts), and with --attention the attention cases there
(gather+SDPA, paged_attention_decode and paged_attention_decode_async).

Cases (d_in = d_out = 2048, S = 64 slots, r_max = 32, ranks cycling 8, 16, 32):
  decode:  T = 64 tokens, 64 distinct adapters, one token each
  prefill: T = 512 tokens, 8 adapters, 64 tokens each
  (--device cuda also) prefill: T = 2048 tokens of one adapter
Prints the median time of each and the ratios fused/base and gather/base (ratios of the medians, and
the medians of each round's own ratio: "paired"); fused runs with lora_b
row-major and, in parentheses, stored transposed as the executor's CPU adapter pool keeps it.
fp32 also runs with the weight prepacked once (ops.pack_weight, as the engine does on CPU):
lora_linear_packed with lora_b transposed, and the base matmul alone through the packed weight
(linear_packed); printed as ratios to torch.addmm on the plain weight and to the packed base alone.

--engine-shapes instead times the shapes the executor engine runs (hidden 512, intermediate 1376,
rank 16 in r_max = 64 slots, S = 33, 32 distinct adapters; T = 64 and T = 2048 tokens) against a plain
torch.mm, printing extra = fused - mm (the LoRA's cost on top of the base layer), with lora_b stored
transposed as the CPU adapter pool keeps it, and (in parentheses) with lora_b row-major; fp32 also
with the weight prepacked (lora_linear_packed and linear_packed), as the engine runs it.

--attention instead times one layer's decode attention at the throughput benchmark's shapes (N = 64
sequences of ~48 tokens, 8 heads / 4 kv heads, head_dim 64, block_size 16, scattered blocks), then at
long contexts (16 sequences of ~2048 tokens; 8 of ~1024 with 28 heads / 4 kv heads of 128, as in a
7B Qwen2): the old gather + masked SDPA path of model.attention.paged_attention vs the fused
paged_attention_decode op.

--mixed-ranks instead times the adapter arena's op (lora_paged_add_, the executor's CPU path: A and B
read in place from arena pages at their true ranks) at the engine's shapes (hidden 512, intermediate
1376; decode T = 64 over 32 adapters, prefill T = 512 over 8): a batch of mixed ranks {1, 8, 16, 64}
against the same batch with every adapter at rank 64, and the slot stacks' lora_linear with the mixed
ranks in r_max = 64 slots; the LoRA's cost only (each op's time minus the base matmul's). A batch costs
what its true ranks cost: mixed / all-64 near the ratio of their mean ranks (22.25 / 64 = 0.35).

--layer-ops instead times the decoder layer's elementwise ops at the engine's shapes (T = 64 and
2048 tokens; hidden 512, intermediate 1376, 8 heads of 64): each C++ op (add_rms_norm, silu_mul,
rotary) against its eager PyTorch reference, which is what the model ran before.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.executor import ops
from services.executor.ops import ensure_built, kernel_backend, lora_linear, paged_attention_decode

D, S, R_MAX, RANKS = 2048, 64, 32, (8, 16, 32)


def make_case(T: int, n_adapters: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    ranks = torch.tensor([RANKS[s % len(RANKS)] for s in range(S)], dtype=torch.int32)
    lora_a = torch.zeros(S, R_MAX, D)
    lora_b = torch.zeros(S, D, R_MAX)
    for s, r in enumerate(ranks.tolist()):  # zero past the rank, so gather+bmm's padding adds nothing
        lora_a[s, :r] = torch.randn(r, D, generator=g) * 0.02
        lora_b[s, :, :r] = torch.randn(D, r, generator=g) * 0.02
    per = T // n_adapters
    slots = torch.randperm(S, generator=g)[:n_adapters].to(torch.int32)
    return dict(
        x=torch.randn(T, D, generator=g).to(dtype), weight=(torch.randn(D, D, generator=g) * 0.02).to(dtype),
        bias=torch.randn(D, generator=g).to(dtype), lora_a=lora_a.to(dtype), lora_b=lora_b.to(dtype),
        scalings=torch.full((S,), 2.0), ranks=ranks,
        seg_indptr=torch.arange(0, T + 1, per, dtype=torch.int32), seg_slots=slots,
        token_slots=slots.repeat_interleave(per).long(),
        lora_b_t=lora_b.to(dtype).transpose(1, 2).contiguous().transpose(1, 2))  # as the CPU pool stores it


def fused(c):
    return lora_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scalings"],
                       c["ranks"], c["seg_indptr"], c["seg_slots"])


def fused_t(c):
    return lora_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b_t"], c["scalings"],
                       c["ranks"], c["seg_indptr"], c["seg_slots"])


def base(c):
    return torch.addmm(c["bias"], c["x"], c["weight"].t())


def gather_bmm(c):
    """Per-token gather of padded adapters + bmm: [T, 1, d_in] @ [T, d_in, r_max] @ [T, r_max, d_out]."""
    tok = c["token_slots"]
    a, b = c["lora_a"][tok], c["lora_b"][tok]  # [T, r_max, d_in], [T, d_out, r_max]
    v = torch.bmm(c["x"].unsqueeze(1), a.transpose(1, 2)) * c["scalings"][tok].view(-1, 1, 1).to(a.dtype)
    return base(c) + torch.bmm(v, b.transpose(1, 2)).squeeze(1)


def fused_packed(c):
    return ops.lora_linear_packed(c["x"], c["weight"], c["packed"], c["bias"], c["lora_a"], c["lora_b_t"],
                                  c["scalings"], c["ranks"], c["seg_indptr"], c["seg_slots"])


def base_packed(c):
    return ops.linear_packed(c["x"], c["weight"], c["packed"], c["bias"])


def bench(name: str, case: dict, rounds: int) -> None:
    fns = {"fused": fused, "fused_t": fused_t, "base": base, "gather+bmm": gather_bmm}
    case["packed"] = ops.pack_weight(case["weight"])
    if case["packed"] is not None:
        fns |= {"fused_packed": fused_packed, "base_packed": base_packed}
        torch.testing.assert_close(fused_packed(case), fused(case), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused(case), gather_bmm(case), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_t(case), fused(case), rtol=2e-2, atol=2e-2)
    times = {k: [] for k in fns}
    for _ in range(3):
        for f in fns.values():
            f(case)
    for _ in range(rounds):  # interleaved: each round times every variant once
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(case)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{name:<22} fused {med['fused']:7.3f} ms  base {med['base']:7.3f} ms  "
          f"gather+bmm {med['gather+bmm']:7.3f} ms  | fused/base {med['fused'] / med['base']:.3f}  "
          f"gather/base {med['gather+bmm'] / med['base']:.3f}  (lora_b stored transposed: fused/base "
          f"{med['fused_t'] / med['base']:.3f})")
    if "fused_packed" in med:
        print(f"{'':<22} weight prepacked: fused {med['fused_packed']:7.3f} ms  base {med['base_packed']:7.3f} ms"
              f"  | fused_packed/base {med['fused_packed'] / med['base']:.3f}  base_packed/base "
              f"{med['base_packed'] / med['base']:.3f}  fused_packed/base_packed "
              f"{med['fused_packed'] / med['base_packed']:.3f}")
    # Paired: each round's own ratio, then their median; a slow phase of the machine hits both sides
    # of a round alike, so this moves less from run to run than the ratio of the medians above.
    paired = {k: statistics.median(a / b for a, b in zip(times[k], times["base"], strict=True))
              for k in ("fused", "fused_packed") if k in times}
    print(f"{'':<22} paired (median of per-round ratios): "
          + "  ".join(f"{k}/base {v:.3f}" for k, v in paired.items()))


def fused_async(c):
    return ops.lora_linear_async(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scalings"],
                                 c["ranks"], c["seg_indptr"], c["seg_slots"])


def bench_cuda(name: str, case: dict, rounds: int, burst: int = 20) -> None:
    """On the GPU: lora_linear (its host checks copy the indices: one sync a call) and lora_linear_async
    (no copy), against torch.addmm and gather+bmm. Each call is timed alone (synchronized before and
    after), and in bursts of `burst` calls synchronized once, as a model's layers issue them, where a
    sync inside the op stalls the launches behind it."""
    case = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    fns = {"fused": fused, "fused_async": fused_async, "base": base, "gather+bmm": gather_bmm}
    tol = 1e-3 if case["x"].dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused(case), gather_bmm(case), rtol=tol, atol=tol)
    torch.testing.assert_close(fused_async(case), fused(case), rtol=tol, atol=tol)
    one = {k: [] for k in fns}
    many = {k: [] for k in fns}
    for _ in range(3):
        for f in fns.values():
            f(case)
    for _ in range(rounds):
        for k, f in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f(case)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(burst):
                f(case)
            torch.cuda.synchronize()
            one[k].append(t1 - t0)
            many[k].append((time.perf_counter() - t1) / burst)
    for label, times in (("alone", one), (f"burst of {burst}", many)):
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        print(f"{name:<22} {label:<12} fused {med['fused']:8.1f} us  fused_async {med['fused_async']:8.1f} us  "
              f"base {med['base']:8.1f} us  gather+bmm {med['gather+bmm']:8.1f} us  | fused/base "
              f"{med['fused'] / med['base']:.3f}  fused_async/base {med['fused_async'] / med['base']:.3f}  "
              f"gather/base {med['gather+bmm'] / med['base']:.3f}")


def bench_engine(T: int, G: int, d_in: int, d_out: int, rounds: int, r: int = 16, S: int = 33,
                 r_max: int = 64, dtype: torch.dtype = torch.float32) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(T, d_in, generator=g).to(dtype), torch.randn(d_out, d_in, generator=g).to(dtype)
    a = torch.randn(S, r_max, d_in, generator=g).to(dtype)
    b = torch.randn(S, d_out, r_max, generator=g).to(dtype)
    sc, rk = torch.ones(S), torch.full((S,), r, dtype=torch.int32)
    indptr = torch.linspace(0, T, G + 1).round().to(torch.int32)
    slots = torch.arange(G, dtype=torch.int32)
    bt = b.transpose(1, 2).contiguous().transpose(1, 2)  # lora_b as the CPU adapter pool stores it
    fns = {"fused": lambda: lora_linear(x, w, None, a, bt, sc, rk, indptr, slots),
           "fused_rows": lambda: lora_linear(x, w, None, a, b, sc, rk, indptr, slots),
           "mm": lambda: torch.mm(x, w.t())}
    packed = ops.pack_weight(w)
    if packed is not None:
        fns |= {"fused_packed": lambda: ops.lora_linear_packed(x, w, packed, None, a, bt, sc, rk, indptr, slots),
                "mm_packed": lambda: ops.linear_packed(x, w, packed)}
    times = {k: [] for k in fns}
    for _ in range(3):
        for f in fns.values():
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"T={T:<5} G={G} {d_in:>4}->{d_out:<4} {str(dtype)[6:]:<8}  fused {med['fused']:7.3f} ms  mm {med['mm']:7.3f} ms  "
          f"extra {med['fused'] - med['mm']:6.3f} ms  | fused/mm {med['fused'] / med['mm']:.3f}"
          f"  (lora_b row-major: extra {med['fused_rows'] - med['mm']:6.3f} ms)")
    if packed is not None:
        print(f"{'':<31}packed: fused {med['fused_packed']:7.3f} ms  mm {med['mm_packed']:7.3f} ms  "
              f"extra {med['fused_packed'] - med['mm_packed']:6.3f} ms  | mm_packed/mm "
              f"{med['mm_packed'] / med['mm']:.3f}  fused_packed/mm {med['fused_packed'] / med['mm']:.3f}")


def bench_attention(dtype: torch.dtype, rounds: int, N: int = 64, H: int = 8, KVH: int = 4,
                    D: int = 64, bs: int = 16, num_blocks: int = 1024, ctx_min: int = 40,
                    device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(0)
    ctx = torch.tensor([ctx_min + (7 * i) % 17 for i in range(N)], dtype=torch.int32)  # ctx_min + 0..16
    num_blocks = max(num_blocks, 2 * N * -(-int(ctx.max()) // bs))
    nb = -(-int(ctx.max()) // bs)
    tables = torch.randperm(num_blocks, generator=g)[:N * nb].view(N, nb).to(torch.int32)
    kc = torch.randn(num_blocks, bs, KVH, D, generator=g).to(device, dtype)
    vc = torch.randn(num_blocks, bs, KVH, D, generator=g).to(device, dtype)
    q = torch.randn(N, H, D, generator=g).to(device, dtype)
    ctx, tables = ctx.to(device), tables.to(device)
    keys = torch.arange(nb * bs, device=device)
    mask = (keys[None] < ctx[:, None].long())[:, None, None]  # [N, 1, 1, L], as build_group made it
    tables_long, scale = tables.long(), D ** -0.5
    cuda = device != "cpu"

    def gather_sdpa():  # model.attention.paged_attention's old decode path
        kg = kc[tables_long].flatten(1, 2).transpose(1, 2)  # [N, KVH, L, D]
        vg = vc[tables_long].flatten(1, 2).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], kg, vg, attn_mask=mask, scale=scale, enable_gqa=True)[:, :, 0]

    fns = {"gather+sdpa": gather_sdpa, "fused": lambda: paged_attention_decode(q, kc, vc, tables, ctx, scale)}
    if cuda:  # no host copy of the tables (the executor's op on CUDA)
        fns["fused_async"] = lambda: ops.paged_attention_decode_async(q, kc, vc, tables, ctx, scale)
    tol = 1e-5 if dtype == torch.float32 and not cuda else 2e-2
    for f in fns.values():
        torch.testing.assert_close(f(), gather_sdpa(), rtol=tol, atol=tol)
    times = {k: [] for k in fns}
    for _ in range(3):
        for f in fns.values():
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            if cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    extra = f"  fused_async {med['fused_async']:7.3f} ms" if cuda else ""
    print(f"decode attention N={N} H={H}/{KVH} D={D} bs={bs} ctx {ctx_min}-{ctx_min + 16} {str(dtype)[6:]:<8} "
          f"gather+sdpa {med['gather+sdpa']:7.3f} ms  fused {med['fused']:7.3f} ms{extra}  "
          f"| speedup {med['gather+sdpa'] / med['fused']:.1f}x")


def bench_layer_ops(dtype: torch.dtype, T: int, rounds: int) -> None:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    cases = {
        "add_rms_norm": (ops.add_rms_norm, ops.add_rms_norm_ref, (randn(T, 512), randn(T, 512), randn(512), 1e-6)),
        "silu_mul": (ops.silu_mul, ops.silu_mul_ref, (randn(T, 1376), randn(T, 1376))),
        "rotary": (ops.rotary, ops.rotary_ref, (randn(T, 8, 64), randn(T, 64), randn(T, 64))),
    }
    times = {(name, k): [] for name in cases for k in ("op", "eager")}
    for _ in range(rounds):
        for name, (op, ref, args) in cases.items():
            for k, fn in (("op", op), ("eager", ref)):
                t0 = time.perf_counter()
                fn(*args)
                times[(name, k)].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    print(f"T={T:<5d} {str(dtype)[6:]:<8} " + "  ".join(
        f"{name} {med[(name, 'op')]:6.0f} us vs eager {med[(name, 'eager')]:6.0f} us "
        f"({med[(name, 'eager')] / med[(name, 'op')]:.1f}x)" for name in cases))


def bench_mixed_ranks(T: int, G: int, d_in: int, d_out: int, rounds: int) -> None:
    """LoRA cost (op - base mm) of mixed ranks {1, 8, 16, 64} vs all rank 64, arena vs slot stacks."""
    from services.executor.adapters.arena import ArenaLayout, HostArena
    from services.executor.adapters.reader import HostAdapter
    g = torch.Generator().manual_seed(0)

    layout = ArenaLayout((((d_out, d_in),) * 7), 256)
    x = torch.randn(T, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    indptr = torch.arange(0, T + 1, T // G, dtype=torch.int32)
    out = {}
    for label, ranks in (("mixed", [(1, 8, 16, 64)[i % 4] for i in range(G)]), ("all-64", [64] * G)):
        arena = HostArena(layout, sum(r * sum(layout.chunks(0)) for r in ranks) * 256 * 4, torch.float32)
        entries = []
        for r in ranks:
            host = HostAdapter({(0, "q_proj"): (torch.randn(r, d_in, generator=g) * 0.02,
                                                torch.randn(d_out, r, generator=g) * 0.02, 2.0)}, r)
            entries.append(arena.write(arena.allocate(arena.pages_needed(host)), host))
        pb = arena.batch(entries)
        out[label] = (pb, ranks)
    slots_a = torch.zeros(G, 64, d_in)
    slots_b = torch.zeros(G, 64, d_out).transpose(1, 2)
    scal = torch.full((G,), 2.0)
    mixed_ranks = torch.tensor(out["mixed"][1], dtype=torch.int32)
    seg_slots = torch.arange(G, dtype=torch.int32)

    def paged(label):
        pb = out[label][0]
        y = torch.mm(x, w.t())
        ops.lora_paged_add_(y, x, pb.arena, pb.page_index, pb.seg_meta, pb.seg_scalings, 0, indptr)
        return y

    cases = {"mm": lambda: torch.mm(x, w.t()), "arena mixed": lambda: paged("mixed"),
             "arena all-64": lambda: paged("all-64"),
             "slots mixed (r_max 64)": lambda: lora_linear(x, w, None, slots_a, slots_b, scal, mixed_ranks,
                                                            indptr, seg_slots)}
    times = {k: [] for k in cases}
    for _ in range(3):
        for f in cases.values():
            f()
    for _ in range(rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    extra = {k: med[k] - med["mm"] for k in cases if k != "mm"}
    print(f"T={T:<4} G={G:<3} {d_in}->{d_out}: mm {med['mm'] * 1e6:8.1f} us; LoRA cost "
          + ", ".join(f"{k} {v * 1e6:7.1f} us" for k, v in extra.items())
          + f"; mixed / all-64 = {extra['arena mixed'] / extra['arena all-64']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--bf16", action="store_true", help="also run bfloat16")
    p.add_argument("--engine-shapes", action="store_true", help="time the executor engine's shapes instead")
    p.add_argument("--attention", action="store_true", help="time decode attention: gather+SDPA vs fused")
    p.add_argument("--layer-ops", action="store_true", help="time the layer's elementwise ops vs eager torch")
    p.add_argument("--mixed-ranks", action="store_true",
                   help="time the arena op: mixed ranks vs all at the maximum rank")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the kernel cases (and --attention) on the GPU, with the async ops")
    args = p.parse_args()
    ensure_built()   # importing ops builds nothing
    if args.mixed_ranks:
        print(f"backend={kernel_backend()} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"fp32, ranks cycling 1, 8, 16, 64 vs all 64, rounds={args.rounds} (medians)")
        for T, G in ((64, 32), (512, 8)):
            for d_in, d_out in ((512, 512), (512, 1376), (1376, 512)):
                bench_mixed_ranks(T, G, d_in, d_out, args.rounds)
        return
    if args.layer_ops:
        print(f"backend={kernel_backend()} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"rounds={args.rounds} (each op once per layer; medians)")
        for dtype in [torch.float32] + ([torch.bfloat16] if args.bf16 else []):
            for T in (64, 2048):
                bench_layer_ops(dtype, T, args.rounds if T <= 64 else max(10, args.rounds // 4))
        return
    if args.attention:
        print(f"backend={kernel_backend()} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"rounds={args.rounds} (per layer; the engine runs 4)")
        dev = args.device
        for dtype in [torch.float32] + ([torch.bfloat16] if args.bf16 else []):
            bench_attention(dtype, args.rounds, device=dev)
            bench_attention(dtype, max(5, args.rounds // 4), N=16, ctx_min=2040, device=dev)  # long contexts
            bench_attention(dtype, max(5, args.rounds // 4), N=8, H=28, KVH=4, D=128, ctx_min=1020,
                            device=dev)                                                     # 7B-like heads
        return
    if args.engine_shapes:
        print(f"backend={kernel_backend()} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"engine shapes: rank 16, r_max 64, S 33, 32 adapters, rounds={args.rounds}")
        for dtype in [torch.float32] + ([torch.bfloat16] if args.bf16 else []):
            for T in (64, 2048):
                for d_in, d_out in ((512, 512), (512, 1376), (1376, 512)):
                    bench_engine(T, 32, d_in, d_out, args.rounds if T <= 64 else max(10, args.rounds // 4),
                                 dtype=dtype)
        return
    print(f"backend={kernel_backend()} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"d={D} S={S} r_max={R_MAX} ranks={RANKS} rounds={args.rounds}")
    if args.device == "cuda":
        print(f"device={torch.cuda.get_device_name()}")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            tag = str(dtype).removeprefix("torch.")
            bench_cuda(f"decode  T=64  G=64 {tag}", make_case(64, 64, dtype), args.rounds)
            bench_cuda(f"prefill T=512 G=8  {tag}", make_case(512, 8, dtype), args.rounds)
            # one adapter's 2,048-token prefill: the async op spreads it over the grid (64 tokens a block)
            bench_cuda(f"prefill T=2048 G=1 {tag}", make_case(2048, 1, dtype), args.rounds)
        return
    for dtype in [torch.float32] + ([torch.bfloat16] if args.bf16 else []):
        tag = str(dtype).removeprefix("torch.")
        bench(f"decode  T=64  G=64 {tag}", make_case(64, 64, dtype), args.rounds)
        bench(f"prefill T=512 G=8  {tag}", make_case(512, 8, dtype), args.rounds)


if __name__ == "__main__":
    main()
