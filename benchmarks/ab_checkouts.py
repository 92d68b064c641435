"""Before/after in one run: benchmarks/throughput.py of two checkouts, alternated, medians side by side.

    git archive OLD_COMMIT | tar -x -C /tmp/old      # or a worktree of the old commit
    .venv/bin/python benchmarks/ab_checkouts.py /tmp/old . --rounds 5 [-- throughput.py args]

Each round runs `throughput.py --skip-hf --repeats 1` (plus the args after --) once from each
checkout, in a fresh process, alternating which goes first, so a noisy neighbour hurts both alike.
Prints the median tokens/s of the engine's mixed-adapter and base-only runs of each, and new / old.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import subprocess
import sys

LINES = {"mixed": re.compile(r"engine mixed-adapter\s*:\s*([\d.]+) tok/s"),
         "base": re.compile(r"engine base-only\s*:\s*([\d.]+) tok/s")}


def run(checkout: pathlib.Path, extra: list[str]) -> dict[str, float]:
    cmd = [sys.executable, str(checkout / "benchmarks" / "throughput.py"), "--skip-hf",
           "--repeats", "1", *extra]
    out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{checkout}: throughput.py failed ({out.returncode}):\n{out.stderr[-3000:]}")
    found = {k: float(m.group(1)) for k, rx in LINES.items() if (m := rx.search(out.stdout))}
    if len(found) != len(LINES):
        raise SystemExit(f"{checkout}: unexpected output:\n{out.stdout}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=pathlib.Path)
    ap.add_argument("new", type=pathlib.Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("extra", nargs="*", help="after --: more throughput.py arguments")
    args = ap.parse_args()
    results = {"old": [], "new": []}
    for i in range(args.rounds):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for name in order:
            r = run(getattr(args, name).resolve(), args.extra)
            results[name].append(r)
            print(f"round {i + 1} {name}: mixed {r['mixed']:.1f} tok/s, base-only {r['base']:.1f} tok/s",
                  flush=True)
    print(f"\nmedian of {args.rounds} rounds (tok/s)      old        new    new/old")
    for kind in LINES:
        old = statistics.median(r[kind] for r in results["old"])
        new = statistics.median(r[kind] for r in results["new"])
        print(f"engine {kind:<10}             {old:8.1f}   {new:8.1f}    {new / old:6.3f}")


if __name__ == "__main__":
    main()
