"""The engine's served ops: the base GEMM, then lora_paged_add_ (each segment's adapter read in place
from page memory), against the base GEMM alone; medians of alternated rounds.

    .venv/bin/python benchmarks/kernel.py [--rounds 30] [--bf16] [--lora-bf16] [--isa all|auto|avx2,...]
    .venv/bin/python benchmarks/kernel.py --engine-shapes | --attention | --layer-ops | --mixed-ranks

Cases (d_in = d_out = 2048, pages of 512 elements scattered over the arena, ranks cycling 8, 16, 32;
the arena's memory allocated as the engine's is, ops.memory.host_pages):
  decode:  T = 64 tokens, 64 distinct adapters, one token each   (goal: fused/base <= 1.15)
  prefill: T = 512 tokens, 8 adapters, 64 tokens each            (goal: fused/base <= 1.06)
base is what the engine runs for the projection: fp32 through the prepacked weight (ops.linear_packed,
where MKL packing is available), bf16 through F.linear; fused = base + lora_paged_add_. --lora-bf16 adds
"float32/bf16 pages": the fp32 base under bfloat16 pages (the executor's --lora-dtype bfloat16). Run once per
instruction set this CPU has (--isa all, the default; set_cpu_isa between runs), printing the
medians, fused/base as the ratio of the medians, and "paired" (the median of each round's own ratio,
which moves less when the machine's speed changes during a run). --clock cpu times the calling
thread's CPU time instead of the wall clock (one thread only): on a shared host, time slices given to
other processes then count for neither side.

--device cuda runs the same cases on the GPU (F.linear, then lora_paged_add_'s CUDA kernel on device
pages) in fp32, bf16 and fp16, each call alone and in bursts.

--engine-shapes: the executor benchmark's shapes (hidden 512, intermediate 1376, rank 16, 32 adapters;
T = 64 and 2048), fused vs base.
--attention: one layer's decode attention, gather + masked SDPA vs paged_attention_decode.
--layer-ops: add_rms_norm, silu_mul, rotary vs their eager PyTorch references.
--mixed-ranks: lora_paged_add_ with ranks {1, 8, 16, 64} mixed vs all 64 (the LoRA's cost only: a
batch costs what its true ranks cost, mixed / all-64 near 22.25 / 64 = 0.35).
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
from services.executor.ops import ensure_built, kernel_backend, paged_attention_decode
from services.executor.ops.memory import host_pages

D, P, RANKS = 2048, 512, (8, 16, 32)
ISAS = ("avx512_bf16", "avx512", "avx2", "generic")


def make_case(T: int, n_adapters: int, dtype: torch.dtype, d_in: int = D, d_out: int = D, page: int = P,
              ranks=RANKS, device: str = "cpu", seed: int = 0, page_dtype: torch.dtype | None = None) -> dict:
    """x, the base weight, and n_adapters adapters' pages scattered over an arena with room to spare
    (pages of page_dtype: default x's; bfloat16 under float32 is --lora-dtype bfloat16)."""
    page_dtype = page_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    rk = [ranks[i % len(ranks)] for i in range(n_adapters)]
    ca, cb = -(-d_in // page), -(-d_out // page)
    need = sum(r * (ca + cb) for r in rk)
    num_pages = need + need // 4 + 16
    page_ids = torch.randperm(num_pages, generator=g)[:need].to(torch.int32)
    meta = torch.zeros(n_adapters, 1, 2, dtype=torch.int32)
    off = 0
    for i, r in enumerate(rk):
        meta[i, 0] = torch.tensor([off, r], dtype=torch.int32)
        off += r * (ca + cb)
    per = T // n_adapters
    c = dict(x=torch.randn(T, d_in, generator=g).to(dtype), weight=(torch.randn(d_out, d_in, generator=g) * 0.02).to(dtype),
             arena=(torch.randn(num_pages, page, generator=g) * 0.02).to(page_dtype), page_index=page_ids, seg_meta=meta,
             seg_scalings=torch.full((n_adapters, 1), 2.0), seg_indptr=torch.arange(0, T + 1, per, dtype=torch.int32))
    c = {k: v.to(device) for k, v in c.items()}
    if device == "cpu":   # page memory as the engine's arena has it (huge pages where the OS has them)
        c["arena"] = host_pages(c["arena"].shape, page_dtype).copy_(c["arena"])
    c["packed"] = ops.pack_weight(c["weight"])
    return c


def base(c):
    if c["packed"] is not None:
        return ops.linear_packed(c["x"], c["weight"], c["packed"])
    return torch.nn.functional.linear(c["x"], c["weight"])


def fused(c):
    y = base(c)
    ops.lora_paged_add_(y, c["x"], c["arena"], c["page_index"], c["seg_meta"], c["seg_scalings"], 0, c["seg_indptr"])
    return y


def check(c):
    want = base(c)
    ops.lora_paged_add_ref(want, c["x"], c["arena"], c["page_index"], c["seg_meta"], c["seg_scalings"], 0,
                           c["seg_indptr"])
    tol = 1e-3 if c["x"].dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused(c), want, rtol=tol, atol=tol)


CLOCK = time.perf_counter   # --clock cpu: time.thread_time


def timed(fns: dict, rounds: int, sync=lambda: None) -> dict:
    """Alternated rounds: each round times every variant once (warm-up rounds first)."""
    times = {k: [] for k in fns}
    for _ in range(3):
        for f in fns.values():
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            sync()
            t0 = CLOCK()
            f()
            sync()
            times[k].append(CLOCK() - t0)
    return times


def report(name: str, times: dict) -> str:
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["fused"], times["base"], strict=True))
    return (f"{name:<28} base {med['base']:8.3f} ms  fused {med['fused']:8.3f} ms  | fused/base "
            f"{med['fused'] / med['base']:.3f}  paired {paired:.3f}")


def bench(name: str, c: dict, rounds: int) -> None:
    check(c)
    print(report(name, timed({"base": lambda: base(c), "fused": lambda: fused(c)}, rounds)), flush=True)


def bench_cuda(name: str, c: dict, rounds: int, burst: int = 20) -> None:
    """Each call alone (synchronized before and after) and in bursts of `burst` calls synchronized once,
    as a model's layers issue them."""
    check(c)
    fns = {"base": lambda: base(c), "fused": lambda: fused(c)}
    print(report(f"{name} alone", timed(fns, rounds, torch.cuda.synchronize)))
    many = {k: (lambda f=f: [f() for _ in range(burst)]) for k, f in fns.items()}
    print(report(f"{name} burst of {burst}", timed(many, max(5, rounds // 4), torch.cuda.synchronize)), flush=True)


def isas_to_run(choice: str) -> list[str]:
    if choice == "auto":
        return [ops.cpu_isa()]
    wanted = ISAS if choice == "all" else tuple(choice.split(","))
    have = []
    for isa in wanted:
        try:
            ops.set_cpu_kernels(isa)
            have.append(isa)
        except RuntimeError:   # this CPU lacks it
            continue
    ops.set_cpu_kernels("auto")
    return have


def variant_tag(dtype: torch.dtype, page_dtype: torch.dtype) -> str:
    tag = str(dtype).removeprefix("torch.")
    return tag if page_dtype == dtype else f"{tag}/bf16 pages"


def bench_engine(T: int, G: int, d_in: int, d_out: int, rounds: int, dtype: torch.dtype,
                 page_dtype: torch.dtype | None = None) -> None:
    c = make_case(T, G, dtype, d_in, d_out, page=256, ranks=(16,), page_dtype=page_dtype)  # that model's page
    bench(f"T={T:<5} G={G} {d_in:>4}->{d_out:<4} {variant_tag(dtype, page_dtype or dtype)}", c, rounds)


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
    """LoRA cost (op - base mm) of mixed ranks {1, 8, 16, 64} vs all rank 64 in the arena."""
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
    def paged(label):
        pb = out[label][0]
        y = torch.mm(x, w.t())
        ops.lora_paged_add_(y, x, pb.arena, pb.page_index, pb.seg_meta, pb.seg_scalings, 0, indptr)
        return y

    cases = {"mm": lambda: torch.mm(x, w.t()), "arena mixed": lambda: paged("mixed"),
             "arena all-64": lambda: paged("all-64")}
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
    p.add_argument("--lora-bf16", action="store_true",
                   help="also run float32 activations over bfloat16 pages (the executor's --lora-dtype bfloat16)")
    p.add_argument("--isa", default="all", help="all (every instruction set this CPU has), auto, or a list")
    p.add_argument("--engine-shapes", action="store_true", help="time the executor engine's shapes instead")
    p.add_argument("--attention", action="store_true", help="time decode attention: gather+SDPA vs fused")
    p.add_argument("--layer-ops", action="store_true", help="time the layer's elementwise ops vs eager torch")
    p.add_argument("--mixed-ranks", action="store_true",
                   help="time the arena op: mixed ranks vs all at the maximum rank")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the served ops (and --attention) on the GPU")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: the calling thread's CPU time (time.thread_time), which a busy host's time "
                        "slicing does not inflate; only with one thread on CPU")
    args = p.parse_args()
    if args.clock == "cpu":
        if args.device != "cpu" or torch.get_num_threads() != 1:
            p.error("--clock cpu needs --device cpu and one thread (OMP_NUM_THREADS=1)")
        global CLOCK
        CLOCK = time.thread_time
    ensure_built()   # importing ops builds nothing
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t") \
        if Path("/proc/cpuinfo").exists() else "?"
    print(f"backend={kernel_backend()} torch={torch.__version__} threads={torch.get_num_threads()} cpu={cpu} "
          f"rounds={args.rounds} clock={args.clock}")
    dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 else [])
    variants = [(dt, dt) for dt in dtypes] + ([(torch.float32, torch.bfloat16)] if args.lora_bf16 else [])
    if args.mixed_ranks:
        print("fp32, ranks cycling 1, 8, 16, 64 vs all 64 (medians)")
        for T, G in ((64, 32), (512, 8)):
            for d_in, d_out in ((512, 512), (512, 1376), (1376, 512)):
                bench_mixed_ranks(T, G, d_in, d_out, args.rounds)
        return
    if args.layer_ops:
        for dtype in dtypes:
            for T in (64, 2048):
                bench_layer_ops(dtype, T, args.rounds if T <= 64 else max(10, args.rounds // 4))
        return
    if args.attention:
        dev = args.device
        for dtype in dtypes:
            bench_attention(dtype, args.rounds, device=dev)
            bench_attention(dtype, max(5, args.rounds // 4), N=16, ctx_min=2040, device=dev)  # long contexts
            bench_attention(dtype, max(5, args.rounds // 4), N=8, H=28, KVH=4, D=128, ctx_min=1020,
                            device=dev)                                                     # 7B-like heads
        return
    if args.device == "cuda":
        print(f"device={torch.cuda.get_device_name()} d={D} page={P} ranks={RANKS}")
        for dtype, pd in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                          (torch.float16, torch.float16), (torch.float32, torch.bfloat16)):
            tag = variant_tag(dtype, pd)
            bench_cuda(f"decode  T=64  G=64 {tag}", make_case(64, 64, dtype, device="cuda", page_dtype=pd),
                       args.rounds)
            bench_cuda(f"prefill T=512 G=8  {tag}", make_case(512, 8, dtype, device="cuda", page_dtype=pd),
                       args.rounds)
            bench_cuda(f"prefill T=2048 G=1 {tag}", make_case(2048, 1, dtype, device="cuda", page_dtype=pd),
                       args.rounds)
        return
    for isa in isas_to_run(args.isa):
        ops.set_cpu_kernels(isa)
        print(f"isa={isa}" + ("" if not args.engine_shapes else " engine shapes: rank 16, 32 adapters, pages of 256"))
        for dtype, pd in variants:
            if args.engine_shapes:
                for T in (64, 2048):
                    for d_in, d_out in ((512, 512), (512, 1376), (1376, 512)):
                        bench_engine(T, 32, d_in, d_out, args.rounds if T <= 64 else max(10, args.rounds // 4),
                                     dtype, pd)
                continue
            tag = variant_tag(dtype, pd)
            bench(f"decode  T=64  G=64 {tag}", make_case(64, 64, dtype, page_dtype=pd), args.rounds)
            bench(f"prefill T=512 G=8  {tag}", make_case(512, 8, dtype, page_dtype=pd), max(5, args.rounds // 2))
    ops.set_cpu_kernels("auto")


if __name__ == "__main__":
    main()
