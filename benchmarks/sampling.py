"""The sampler's cost per engine step: what sample_with_top takes for a batch of rows, by vocabulary.

    .venv/bin/python benchmarks/sampling.py [--rows 32] [--vocab 1024,32000,152064] [--rounds 5]
                                            [--clock {wall,cpu}]

For each vocabulary size, the same logits (peaked: randn * 6, as a trained model's are) and five
kinds of batch, alternated over --rounds rounds (medians printed, ms per step, one thread):
greedy; sampled (temperature 1, OpenAI's defaults); sampled with top-p 0.9 and top-k 50; half the
rows sampled under a JSON-schema grammar (structured.py) beside half unconstrained, the masks
applied by the served kernels (ops.token_bitmask_fill_ zeroing the grammar rows' forbidden tokens
in the softmax in place; ops.token_bitmask_fill for greedy or filtered grammar rows); and the same
with the masks applied by their pure-PyTorch references (unpack to bool, masked_fill), side by side. The grammar's own cost is the
grammar column minus "sampled". The grammars run over the demo tokenizer (1,024 tokens) padded to
each vocabulary, so the matchers' work stays that of a small tokenizer while the masks and logits
have the vocabulary's size. --clock cpu times the thread's CPU time (steadier on a shared machine).
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

from services.executor import ops
from services.executor.sampler import SamplingOptions, SamplingRow, make_generator, sample_with_top
from services.executor.structured import GrammarCache, StructuredOutput
from services.synthetic import ModelSpec, write_model

SCHEMA = json.dumps({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
KINDS = ("greedy", "sampled", "top-p/top-k", "half grammar", "grammar (ref)")


def rows_for(kind: str, n: int, grammars: GrammarCache | None) -> list[SamplingRow]:
    opts = {"greedy": SamplingOptions(), "sampled": SamplingOptions(temperature=1.0),
            "top-p/top-k": SamplingOptions(temperature=1.0, top_p=0.9, top_k=50),
            "half grammar": SamplingOptions(temperature=1.0),
            "grammar (ref)": SamplingOptions(temperature=1.0)}[kind]
    out = []
    for i in range(n):
        r = SamplingRow(opts, make_generator(i, torch.device("cpu")) if opts.temperature > 0 else None,
                        [1, 2, 3], prompt_len=3)
        if kind in ("half grammar", "grammar (ref)") and i < n // 2:
            r.grammar = grammars.new(StructuredOutput("json_schema", SCHEMA))
        out.append(r)
    return out


def step_ms(logits: torch.Tensor, rows: list[SamplingRow], steps: int, clock=time.perf_counter,
            reference: bool = False) -> float:
    """Mean ms of one sample_with_top over `steps` steps, each row's history growing by its token;
    reference: the grammar masks applied by token_bitmask_fill's pure-PyTorch reference."""
    served = ops.token_bitmask_fill, ops.token_bitmask_fill_
    if reference:
        ops.token_bitmask_fill, ops.token_bitmask_fill_ = ops.token_bitmask_fill_ref, ops.token_bitmask_fill_ref_
    try:
        t = clock()
        for _ in range(steps):
            tokens, _, _ = sample_with_top(logits, rows)
            for r, tok in zip(rows, tokens, strict=True):
                r.history.append(tok)
        return (clock() - t) / steps * 1e3
    finally:
        ops.token_bitmask_fill, ops.token_bitmask_fill_ = served


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--vocab", default="1024,32000,152064")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(1)
    ops.ensure_built()
    with tempfile.TemporaryDirectory() as tmp:
        write_model(pathlib.Path(tmp), ModelSpec(arch="llama", hidden=64, intermediate=128, layers=1, heads=2,
                                                 kv_heads=1, vocab=1024, max_positions=256, seed=0))
        tokenizer = (pathlib.Path(tmp) / "tokenizer.json").read_text()
        print(f"sample_with_top, {args.rows} rows, ms per step (medians of {args.rounds} alternated rounds, "
              f"1 thread, {args.clock} clock; kernels: {ops.kernel_backend()})")
        print(f"{'vocab':>8} " + " ".join(f"{k:>13}" for k in KINDS))
        for vocab in (int(v) for v in args.vocab.split(",")):
            logits = torch.randn(args.rows, vocab, generator=torch.Generator().manual_seed(0)) * 6
            grammars = GrammarCache(tokenizer, vocab, [2], 8)
            kinds = list(KINDS)
            steps = max(3, int(2e6 // (args.rows * vocab)))
            times = {k: [] for k in kinds}
            for r in range(args.rounds):
                for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                    rows = rows_for(k, args.rows, grammars)
                    ref = k == "grammar (ref)"
                    step_ms(logits, rows, 1, clock, ref)                       # warm-up
                    times[k].append(step_ms(logits, rows, steps, clock, ref))
            print(f"{vocab:>8} " + " ".join(f"{statistics.median(times[k]):13.2f}" if k in times else f"{'-':>13}"
                                            for k in KINDS))


if __name__ == "__main__":
    main()
