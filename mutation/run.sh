#!/bin/bash
# usage: mutation/run.sh NAME [SAMPLE]  (config mutation/NAME.toml -> mutation/out/NAME.sqlite, .report)
# Mutates the files of this checkout in place while it runs: use a clean worktree.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/main/.venv/bin/python}
BIN=$(dirname "$PY")
mkdir -p mutation/out
"$BIN/cosmic-ray" init mutation/$1.toml mutation/out/$1.sqlite
if [ -n "$2" ]; then "$PY" mutation/sample.py mutation/out/$1.sqlite "$2"; fi
nice -n 19 "$BIN/cosmic-ray" exec mutation/$1.toml mutation/out/$1.sqlite
"$BIN/cr-report" mutation/out/$1.sqlite --show-pending > mutation/out/$1.report || true
tail -3 mutation/out/$1.report
