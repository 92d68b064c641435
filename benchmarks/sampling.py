"""The sampler's cost per engine step: what sample_with_top takes for a batch of rows, by vocabulary.

    .venv/bin/python benchmarks/sampling.py [--rows 32] [--vocab 1024,32000,152064] [--rounds 5]

For each vocabulary size, the same logits (peaked: randn * 6, as a trained model's are) and four
kinds of batch, alternated over --rounds rounds (medians printed, ms per step, one thread):
greedy; sampled (temperature 1, OpenAI's defaults); sampled with top-p 0.9 and top-k 50; and half
the rows sampled under a JSON-schema grammar (structured.py, with the demo tokenizer's vocabulary
of 1024 only) beside half unconstrained. The grammar's own cost is the last column minus the second.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from services.executor.sampler import SamplingOptions, SamplingRow, make_generator, sample_with_top
from services.executor.structured import GrammarCache, StructuredOutput
from services.synthetic import ModelSpec, write_model

SCHEMA = json.dumps({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
KINDS = ("greedy", "sampled", "top-p/top-k", "half grammar")


def rows_for(kind: str, n: int, grammars: GrammarCache | None) -> list[SamplingRow]:
    opts = {"greedy": SamplingOptions(), "sampled": SamplingOptions(temperature=1.0),
            "top-p/top-k": SamplingOptions(temperature=1.0, top_p=0.9, top_k=50),
            "half grammar": SamplingOptions(temperature=1.0)}[kind]
    out = []
    for i in range(n):
        r = SamplingRow(opts, make_generator(i, torch.device("cpu")) if opts.temperature > 0 else None,
                        [1, 2, 3], prompt_len=3)
        if kind == "half grammar" and i < n // 2:
            r.grammar = grammars.new(StructuredOutput("json_schema", SCHEMA))
        out.append(r)
    return out


def step_ms(logits: torch.Tensor, rows: list[SamplingRow], steps: int) -> float:
    """Mean ms of one sample_with_top over `steps` steps, each row's history growing by its token."""
    t = time.perf_counter()
    for _ in range(steps):
        tokens, _, _ = sample_with_top(logits, rows)
        for r, tok in zip(rows, tokens, strict=True):
            r.history.append(tok)
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--vocab", default="1024,32000,152064")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_model(pathlib.Path(tmp), ModelSpec(arch="llama", hidden=64, intermediate=128, layers=1, heads=2,
                                                 kv_heads=1, vocab=1024, max_positions=256, seed=0))
        grammars = GrammarCache((pathlib.Path(tmp) / "tokenizer.json").read_text(), 1024, [2], 8)
        print(f"sample_with_top, {args.rows} rows, ms per step (medians of {args.rounds} alternated rounds, "
              f"1 thread)")
        print(f"{'vocab':>8} " + " ".join(f"{k:>13}" for k in KINDS))
        for vocab in (int(v) for v in args.vocab.split(",")):
            logits = torch.randn(args.rows, vocab, generator=torch.Generator().manual_seed(0)) * 6
            kinds = [k for k in KINDS if k != "half grammar" or vocab == 1024]
            steps = max(3, int(2e6 // (args.rows * vocab)))
            times = {k: [] for k in kinds}
            for r in range(args.rounds):
                for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                    rows = rows_for(k, args.rows, grammars)
                    step_ms(logits, rows, 1)                                   # warm-up
                    times[k].append(step_ms(logits, rows, steps))
            print(f"{vocab:>8} " + " ".join(f"{statistics.median(times[k]):13.2f}" if k in times else f"{'-':>13}"
                                            for k in KINDS))


if __name__ == "__main__":
    main()
