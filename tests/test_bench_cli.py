"""`openlora bench` around its run, without servers: what it says when nothing serves, when every
request failed, where its plot goes, and synthetic adapters the registry takes as they are."""

from __future__ import annotations

import argparse
import subprocess
import sys

from services.bench import Result
from services.bench_setup import content_digest, plot_path, synthetic_adapter_files, why_all_failed
from tests.servers import free_port


def test_bench_against_nothing_says_how_to_wait_and_exits_1():
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--router", f"127.0.0.1:{port}",
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port} is not ready" in line and "--wait" in line and "openlora up" in line, line
    assert "Traceback" not in proc.stderr


def test_generate_against_nothing_says_how_to_wait():
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--router", f"127.0.0.1:{port}",
                           "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("openlora generate: UNAVAILABLE") and "--wait 600" in line, line


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"executor": None, "router": "127.0.0.1:50050", **kw})


def test_why_all_failed_names_the_commonest_code_its_message_and_the_remedy():
    results = [Result(0, code="NOT_FOUND", detail="adapter 'bench/a0' not found")] * 3 + \
        [Result(0, code="DEADLINE_EXCEEDED")]
    line = why_all_failed(results, _args())
    assert line.startswith("all 4 requests failed (3 NOT_FOUND: adapter 'bench/a0' not found)")
    assert "--synthetic-adapters N" in line
    line = why_all_failed([Result(0, code="UNAVAILABLE", detail="failed to connect")], _args())
    assert "openlora up" in line and "127.0.0.1:50050" in line


def test_plot_goes_where_asked_or_under_the_data_dir(tmp_path):
    assert plot_path(_args(plot=str(tmp_path / "a" / "p.png"), data_dir="x")) == str(tmp_path / "a" / "p.png")
    path = plot_path(_args(plot="<data-dir>", data_dir=str(tmp_path / "d")))
    assert path.startswith(str(tmp_path / "d" / "bench" / "latency-")) and path.endswith(".png")
    assert (tmp_path / "d" / "bench").is_dir()


def test_synthetic_adapters_are_deterministic_fit_the_model_and_digest_as_the_registry_does(tmp_path):
    from services.synthetic import ModelSpec, write_model
    model = write_model(tmp_path / "m", ModelSpec(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2,
                                                  vocab=300))
    files = synthetic_adapter_files(str(model), rank=4, seed=7)
    assert files == synthetic_adapter_files(str(model), rank=4, seed=7)
    assert files != synthetic_adapter_files(str(model), rank=4, seed=8)
    from services.registry.app import build_core
    from services.registry.config import RegistryConfig
    core = build_core(RegistryConfig(data_dir=str(tmp_path / "reg"), base_model=[str(model)]))
    try:
        adapter = core.upload("bench/a0", files, base_model=str(model))
    finally:
        core.metadata.close()
    assert adapter.digest == content_digest(files) and adapter.rank == 4 and len(adapter.target_modules) == 7


def test_percentile_is_nearest_rank():
    from services.bench import percentile, percentiles
    assert [percentile(range(1, 11), q) for q in (0.0, 0.5, 0.9, 0.99, 1.0)] == [1, 5, 9, 10, 10]
    assert percentile([7.0], 0.5) == 7.0
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles([float(i) for i in range(1, 101)]) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
