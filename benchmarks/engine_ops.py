"""Where an engine step's time goes: wall time per op kind, prefill and decode steps apart.

    .venv/bin/python benchmarks/engine_ops.py [--dtype float32|bfloat16] [--base-only] [--repeats 5]

The throughput benchmark's model and workload (benchmarks/throughput.py: 64 requests of 32 prompt
+ 32 new tokens over 32 rank-16 adapters on all seven projections, or --base-only). Each call the
model makes into services.executor.ops (linear_packed, lora_paged_add_, the layer ops) and its
paged_attention (K/V writes included) is timed, as is the whole forward pass; the medians over
--repeats runs (after one untimed run) are printed in ms per run. "forward" minus the ops listed is
the model's own Python and the small torch ops between them.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import throughput as tp

from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine
from services.executor.model import layers
from services.synthetic import ALL_MODULES, AdapterSpec, write_adapter, write_model


def _timed(fn, name: str, acc: dict, rows_of=lambda args: args[0].shape[0]):
    """fn, its wall time added to acc[(name, "prefill" | "decode")] at each call."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[(name, "prefill" if rows_of(args) > 64 else "decode")] += time.perf_counter() - t0
    return wrapper


class _TimedOps:
    """Stands in for services.executor.ops inside the model: every function call is timed."""

    def __init__(self, inner, acc: dict):
        self._inner, self._acc = inner, acc

    def __getattr__(self, name):
        fn = getattr(self._inner, name)
        return _timed(fn, name, self._acc) if callable(fn) else fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--base-only", action="store_true", help="requests without adapters")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = pathlib.Path(tempfile.mkdtemp(prefix="openlora-bench-"))
    model_dir = write_model(root / "model", tp.SPEC)
    names = [f"adapter-{i:02d}" for i in range(32)]
    for i, n in enumerate(names):
        write_adapter(root / "adapters" / n, tp.SPEC,
                      AdapterSpec(rank=16, alpha=32, targets=ALL_MODULES, seed=1000 + i))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, tp.SPEC.vocab, (64, 32), generator=g).tolist()
    adapters = [""] * 64 if args.base_only else [names[i % 32] for i in range(64)]
    engine = Engine(ExecutorConfig(base_model=str(model_dir), device="cpu", dtype=args.dtype,
                                   max_batch_size=64, max_device_adapters=32, max_lora_rank=16,
                                   enable_prefix_caching=False),   # the runs repeat their prompts
                    LocalDirSource(root / "adapters"))
    for n in names:
        engine.load_adapter(n, 0)

    acc: dict = collections.defaultdict(float)
    layers.ops = _TimedOps(layers.ops, acc)
    layers.paged_attention = _timed(layers.paged_attention, "paged_attention", acc)
    engine.model.forward = _timed(engine.model.forward, "forward", acc,
                                  rows_of=lambda args: args[0].input_ids.numel())

    engine.start()
    tp.run_engine(engine, prompts, adapters, 32)                 # untimed
    runs: dict = collections.defaultdict(list)
    walls = []
    for _ in range(args.repeats):
        acc.clear()
        walls.append(tp.run_engine(engine, prompts, adapters, 32)[0])
        for key, seconds in acc.items():
            runs[key].append(seconds)
    engine.stop()
    print(f"{args.dtype}, {'base-only' if args.base_only else 'mixed adapters'}: run wall "
          f"{statistics.median(walls) * 1e3:.1f} ms (median of {args.repeats}); per run, medians:")
    for (name, phase), v in sorted(runs.items(), key=lambda kv: (kv[0][1], -statistics.median(kv[1]))):
        print(f"  {phase:<8} {name:<22} {statistics.median(v) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
