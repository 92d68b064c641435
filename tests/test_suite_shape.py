"""The suite's shape (tests/conftest.py): the quick loop keeps a pairwise cover of each kernel sweep,
skips PostgreSQL/S3 however a test reaches them, and a test with a wall-clock bound runs again when a
loaded machine makes it fail once."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys

from tests.conftest import SLOW_TESTS, TIMING_TESTS, pairwise_cover
from tests.readme import ROOT


def _covered(cases, kept) -> bool:
    def pairs(c):
        keys = sorted(c)
        return {(k, c[k]) for k in keys} | {((a, c[a]), (b, c[b])) for a, b in itertools.combinations(keys, 2)}
    return set().union(*(pairs(cases[i]) for i in kept)) == set().union(*map(pairs, cases))


def test_pairwise_cover_keeps_every_value_and_pair_in_fewer_cases():
    grid = [{"dtype": d, "rank": r, "layout": la, "tokens": t}
            for d, r, la, t in itertools.product("ab", "1234", "xyz", "pq")]
    kept = pairwise_cover(grid)
    assert _covered(grid, kept) and len(kept) < len(grid) / 3, len(kept)
    assert kept == pairwise_cover(grid) == sorted(kept)              # deterministic
    one = [{"n": str(i)} for i in range(5)]
    assert pairwise_cover(one) == list(range(5))                     # one parameter: every value
    assert pairwise_cover([]) == [] and pairwise_cover([{}]) == [0]
    sparse = [{"a": "1", "b": "1"}, {"a": "1", "b": "1"}, {"a": "2", "b": "1"}]
    assert pairwise_cover(sparse) == [0, 2]                          # duplicates dropped


def test_every_timing_and_slow_listed_test_exists():
    """TIMING_TESTS and SLOW_TESTS name tests by module::function: a rename must not silently drop the
    reruns, or put a whole deployment back in the quick loop."""
    for name in TIMING_TESTS | SLOW_TESTS:
        module, function = name.split("[")[0].split("::")
        tree = ast.parse((ROOT / "tests" / f"{module}.py").read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert function in names, name


def test_the_quick_loop_skips_postgres_and_s3_reached_through_the_backend_fixture():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow",
                          "-p", "no:cacheprovider", "tests/test_registry_api.py", "tests/test_blob_direct.py"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "sqlite-files" in out.stdout and "postgres" not in out.stdout


def test_a_timing_test_that_fails_once_runs_again_and_passes(tmp_path):
    counter = tmp_path / "runs"
    (tmp_path / "test_flaky_bound.py").write_text(f'''
import pathlib
import pytest

@pytest.mark.timing
def test_bound():
    p = pathlib.Path({str(counter)!r})
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    assert n >= 2, "too slow on a loaded machine"

@pytest.mark.timing
def test_always_too_slow():
    assert False
''')
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                          str(tmp_path / "test_flaky_bound.py")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert counter.read_text() == "2"
    assert "1 failed, 1 passed" in out.stdout, out.stdout
    assert out.stdout.count("running it again") == 3, out.stdout      # once, then twice for the other


def test_ci_runs_the_readme_set_up_line_and_the_complete_suite():
    """.ci/run is what a fresh clone does: the README's set-up line verbatim, lint, then every test."""
    from tests.readme import blocks
    setup = next(b for b in blocks() if b.text.startswith("python3 -m venv")).lines
    assert len(setup) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup[0] in ci
    runs = [line for line in ci if line.startswith(".venv/bin/python -m pytest")]
    assert runs == [".venv/bin/python -m pytest --durations=30"]      # no -m: sweeps, slow, compile
