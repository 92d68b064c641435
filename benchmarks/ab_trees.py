"""Before and after in one run: benchmarks/throughput.py of two checkouts, alternated round by round.

    .venv/bin/python benchmarks/ab_trees.py BEFORE_DIR AFTER_DIR [--rounds 5] [-- extra throughput.py flags]

Each round runs `throughput.py --skip-hf --repeats 1` once in each checkout (a fresh process each, the
order flipped every round so neither always runs second), with this interpreter, and reads the
engine's mixed-adapter and base-only tokens/s from its output. Prints every round, then the medians of
each and the after/before ratios. Make BEFORE_DIR with `git worktree add /tmp/before <commit>`.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
from statistics import median

LINE = re.compile(r"engine (mixed-adapter|base-only)\s*:\s*([\d.]+) tok/s best")


def run(tree: pathlib.Path, extra: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "benchmarks/throughput.py", "--skip-hf", "--repeats", "1", *extra],
                         cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: throughput.py exited {out.returncode}:\n{out.stderr[-2000:]}")
    found = {m.group(1): float(m.group(2)) for m in LINE.finditer(out.stdout)}
    if len(found) != 2:
        raise SystemExit(f"{tree}: no tokens/s lines in its output:\n{out.stdout[-2000:]}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=pathlib.Path, help="checkout to compare against")
    ap.add_argument("after", type=pathlib.Path, help="checkout under test")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each one run of each checkout")
    ap.add_argument("extra", nargs="*", help="flags passed on to throughput.py (after --)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    got: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for name in order:
            got[name].append(run(trees[name], args.extra))
        print(f"round {r + 1}: " + "  ".join(
            f"{n} mixed {got[n][-1]['mixed-adapter']:.1f} base {got[n][-1]['base-only']:.1f} tok/s"
            for n in ("before", "after")), flush=True)
    for kind in ("mixed-adapter", "base-only"):
        b = median(x[kind] for x in got["before"])
        a = median(x[kind] for x in got["after"])
        print(f"{kind:14s} median of {args.rounds}: before {b:8.1f} tok/s  after {a:8.1f} tok/s  "
              f"after/before {a / b:.3f}x")


if __name__ == "__main__":
    main()
