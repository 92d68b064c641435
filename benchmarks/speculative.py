"""Prompt-lookup (n-gram) speculative decoding: the engine with vs without it, side by side.

    .venv/bin/python benchmarks/speculative.py [--rounds 5] [--new-tokens 64] [--streams 32]
                                               [--num-speculative-tokens 4] [--workloads 1,2,3]

One CPU-sized Llama (4 layers, hidden 512, 8 heads, vocab 4096) whose weights are set so that greedy
decoding copies from its context (synthetic.write_copy_model: an induction circuit in the first two
layers, every other weight random at scale 0.05, so each step costs what a random model of this
shape costs), and two random rank-16 adapters on all seven projections, scaled (alpha 1) so that the
model still copies under them. Two engines in this one process, --speculative-method none and ngram
(K = --num-speculative-tokens, n-grams 2..5), are run alternately, --rounds times each workload:

1. repetitive, one stream: each prompt is a document of distinct random tokens, a separator, and
   the document's first 4 tokens again, so the greedy output quotes the document (as an extraction
   or editing fine-tune quotes its input); requests one at a time, cycling base, adapter a, adapter
   b. Reported: decode tokens/s of one stream (tokens after the first / time after the first).
2. non-repeating, --streams concurrent streams: a random model of the same shape (write_model) and
   the same adapters, prompts of 32 distinct random tokens, adapters mixed, sampled at temperature 1
   with a seed per request (near-uniform over 4096 tokens: the text does not repeat, so n-grams
   rarely match; greedy decoding of a random model falls into loops, which prompt lookup would
   predict). Reported: generated tokens/s over the run.
3. an adapter that breaks the copying, one stream: workload 1's prompts on the copying model under a
   strong random adapter (alpha 16). The output no longer quotes the document; the drafts the
   prompt suggests first are rejected, but greedy decoding then falls into short loops (as greedy
   decoding of random weights does), which prompt lookup predicts: this shows that speculation
   stays exact under an adapter that changes the output, not a case where it cannot help.

Printed per workload: tokens/s of each engine (median over rounds), the speedup (median of the
per-round ratios), the acceptance rate and draft tokens of the ngram engine, and whether the outputs
of the two engines were the same (greedy: they must be).
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
from services.synthetic import (
    ALL_MODULES,
    AdapterSpec,
    ModelSpec,
    write_adapter,
    write_copy_model,
    write_model,
)

SPEC = ModelSpec(arch="llama", hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8,
                 vocab=4096, max_positions=512, rope_theta=1e6, seed=3)
ADAPTERS = {"a": AdapterSpec(rank=16, alpha=1.0, targets=ALL_MODULES, seed=11),
            "b": AdapterSpec(rank=16, alpha=1.0, targets=ALL_MODULES, seed=12),
            "strong": AdapterSpec(rank=16, alpha=16.0, targets=ALL_MODULES, seed=13)}
NAMES = ["", "a", "b"]


def run(engine: Engine, prompts: list[list[int]], adapters: list[str], new_tokens: int,
        tag: str, temperature: float) -> tuple[float, float, list[list[int]]]:
    """All requests at once -> (wall seconds, seconds from each stream's first token to its last,
    summed, outputs)."""
    done, lock = threading.Event(), threading.Lock()
    out: dict[str, list] = {}

    def on_event(ev):
        now = time.perf_counter()
        with lock:
            o = out.setdefault(ev.request_id, [[], now, now, False])
            if ev.error is not None:
                raise SystemExit(f"request failed: {ev.error}")
            o[0] += ev.token_ids
            o[2] = now
            if ev.finish_reason:
                o[3] = True
                if sum(v[3] for v in out.values()) == len(prompts):
                    done.set()

    t0 = time.perf_counter()
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        engine.submit(GenerationRequest(f"{tag}-{i}", prompt_token_ids=p, adapter_id=a,
                                        sampling=SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True,
                                                                 temperature=temperature, seed=i)),
                      on_event)
    done.wait()
    wall = time.perf_counter() - t0
    outs = [out[f"{tag}-{i}"] for i in range(len(prompts))]
    return wall, sum(o[2] - o[1] for o in outs), [o[0] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--workloads", default="1,2,3", help="which of the workloads to run (comma-separated)")
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        models = {"copy": write_copy_model(root / "copy", SPEC, noise=0.05),
                  "random": write_model(root / "random", SPEC)}
        for name, spec in ADAPTERS.items():
            write_adapter(root / "adapters" / name, SPEC, spec)

        def make_engines(model):
            engines = {}
            for method in ("none", "ngram"):
                e = Engine(ExecutorConfig(base_model=str(model), device="cpu", dtype="float32",
                                          max_batch_size=max(32, args.streams), max_model_len=512,
                                          enable_prefix_caching=False, speculative_method=method,
                                          num_speculative_tokens=args.num_speculative_tokens,
                                          prompt_lookup_min=2, prompt_lookup_max=5),
                           LocalDirSource(root / "adapters"))
                for name in ADAPTERS:
                    e.load_adapter(name)
                e.start()
                engines[method] = e
            return engines

        def docs(count: int, length: int) -> list[list[int]]:
            return [(torch.randperm(SPEC.vocab - 8, generator=g)[:length] + 4).tolist()
                    for _ in range(count)]

        def repetitive(rnd: int):
            d = docs(1, n + 24)[0]
            return [d + [2] + d[:4]], [NAMES[rnd % 3]]

        def rejected(rnd: int):
            d = docs(1, n + 24)[0]
            return [d + [2] + d[:4]], ["strong"]

        def plain(rnd: int):
            return docs(args.streams, 32), [NAMES[i % 3] for i in range(args.streams)]

        chosen = {int(w) for w in args.workloads.split(",")}
        for number, (label, model, make, single, temp) in enumerate((
                ("repetitive, 1 stream", "copy", repetitive, True, 0.0),
                (f"non-repeating, {args.streams} streams", "random", plain, False, 1.0),
                ("adapter breaking the copying, 1 stream", "copy", rejected, True, 0.0)), 1):
            if number not in chosen:
                continue
            engines = make_engines(models[model])
            try:
                rates = {m: [] for m in engines}
                ratios, same = [], True
                before = engines["ngram"].status()
                for rnd in range(args.rounds + 1):           # round 0: warm-up, not counted
                    prompts, adapters = make(rnd)
                    order = list(engines) if rnd % 2 == 0 else list(reversed(engines))
                    outs, this = {}, {}
                    for m in order:
                        wall, decode, outs[m] = run(engines[m], prompts, adapters, n, f"{label}{rnd}{m}",
                                                 temp)
                        toks = sum(len(o) for o in outs[m])
                        this[m] = (toks - len(prompts)) / decode if single else toks / wall
                    same &= outs["none"] == outs["ngram"]
                    if rnd:
                        for m in engines:
                            rates[m].append(this[m])
                        ratios.append(this["ngram"] / this["none"])
                after = engines["ngram"].status()
                drafted = after.spec_draft_tokens - before.spec_draft_tokens
                accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
                what = "decode tok/s of the stream" if single else "generated tok/s"
                print(f"{label}: {what}: none {statistics.median(rates['none']):.1f}, "
                      f"ngram {statistics.median(rates['ngram']):.1f}; speedup median "
                      f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); "
                      f"acceptance {accepted / drafted if drafted else 0:.2f} of {drafted} drafted; "
                      f"outputs identical: {same}", flush=True)
            finally:
                for e in engines.values():
                    e.stop()


if __name__ == "__main__":
    main()
