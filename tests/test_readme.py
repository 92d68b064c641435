"""The README as a newcomer reads it: its first screen is what openlora is and a quick start, and every
command block in it runs against a fresh `openlora up` and exits 0; `up` then restarts at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.readme import ROOT, blocks
from tests.servers import free_port, free_port_block

CLI = f"{sys.executable} -m services.cli"
# blocks that are not run here, and why
NOT_RUN = {
    "set-up": "the set-up line (python3 -m venv ...) is what .ci/run runs on a fresh clone",
    "up": "this test runs `up` itself, on free ports",
    "tests": "the test commands are what runs this test",
}


def _kind(block) -> str:
    if block.text.startswith("python3 -m venv"):
        return "set-up"
    if block.lang == "" and block.commands and all(" up" in c.split("#")[0] for c in block.commands):
        return "up"
    if "pytest" in block.text:
        return "tests"
    return "run"


def test_readme_opens_with_what_it_is_and_a_quick_start():
    """The quick start (set-up, `up`, generate, curl, the OpenAI SDK) is on the README's first screen,
    not after a page of architecture."""
    lines = (ROOT / "README.md").read_text().splitlines()
    first = "\n".join(lines[:60])
    assert lines[0] == "# openlora" and "LoRA" in "\n".join(lines[:8])
    for needle in ("## Quick start", "python3 -m venv .venv", ".venv/bin/openlora up",
                   ".venv/bin/openlora generate", "curl ", "from openai import OpenAI"):
        assert needle in first, needle
    assert len(lines) < 150, "details belong in docs/ (linked from the README)"
    for doc in ("docs/architecture.md", "docs/reference.md", "docs/benchmarks.md", "docs/deploy.md"):
        assert f"]({doc})" in "\n".join(lines) and (ROOT / doc).is_file(), doc
    kinds = [_kind(b) for b in blocks()]
    assert kinds.count("run") >= 4 and set(kinds) <= {"run", *NOT_RUN}, kinds


def _wait_ready(up: subprocess.Popen, err, timeout: float) -> float:
    t0 = time.monotonic()
    while "openlora up: ready" not in err.read_text():
        assert up.poll() is None, err.read_text()
        assert time.monotonic() - t0 < timeout, err.read_text()
        time.sleep(0.1)
    return time.monotonic() - t0


def _bench_reruns_and_failures(env: dict, cwd) -> None:
    """After the README's bench examples: the plot went under the default data dir, a rerun of
    --synthetic-adapters registers nothing new, and a run whose every request fails says why."""
    plots = list((cwd / "openlora-data" / "bench").glob("latency-*.png"))
    assert plots and plots[0].stat().st_size > 1000, plots
    assert not list(cwd.glob("*.png"))
    bench = [*CLI.split(), "bench", "--no-progress", "--requests", "4", "--max-new-tokens", "2"]
    again = subprocess.run([*bench, "--synthetic-adapters", "16"], capture_output=True, text=True,
                           timeout=300, env=env, cwd=cwd)
    assert again.returncode == 0 and ": 0 registered" in again.stderr and "16 already there" in again.stderr, \
        again.stderr
    missing = subprocess.run([*bench, "--adapters", "3", "--adapter-prefix", "nobody/x"], capture_output=True,
                             text=True, timeout=300, env=env, cwd=cwd)
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 1 and "all 4 requests failed (4 NOT_FOUND" in last, missing.stderr
    assert "--synthetic-adapters N" in last and "openlora adapters add" in last, last


def _stop(up: subprocess.Popen) -> int:
    up.send_signal(signal.SIGINT)
    try:
        return up.wait(timeout=60)
    except subprocess.TimeoutExpired:
        up.kill()
        return up.wait()


@pytest.mark.slow
def test_every_readme_block_runs_against_a_fresh_up_and_up_restarts_at_once(tmp_path):
    """Each README block (but those in NOT_RUN) runs as written, with the default addresses mapped to
    this test's free ports and `.venv/bin/` to this interpreter, and exits 0. Then Ctrl-C and `up`
    again: it starts at once (the router's port was refused for a minute: TIME_WAIT) and says nothing
    about compiling kernels it does not compile (the last run's log line was read as this run's)."""
    from services.synthetic import ALL_MODULES, AdapterSpec, write_adapter
    from services.up import DEMO, demo_spec
    port, http, metrics = free_port_block(3), free_port(), free_port_block(3)
    data = tmp_path / "data"
    adapter = write_adapter(tmp_path / "peft-adapter", demo_spec(),
                            AdapterSpec(rank=8, targets=ALL_MODULES, seed=3, base_model=DEMO))
    env = {**os.environ, "OPENLORA_ROUTER": f"127.0.0.1:{port}", "OPENLORA_REGISTRY": f"127.0.0.1:{port + 1}"}
    up_cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--http-port", str(http),
              "--data-dir", str(data), "--metrics-port", str(metrics)]

    def mapped(text: str) -> str:
        text = re.sub(r"(?<![\w/.])\.venv/bin/(openlora|python)\b",
                      lambda m: CLI if m.group(1) == "openlora" else sys.executable, text)
        return text.replace("localhost:8000", f"127.0.0.1:{http}").replace("./path/to/peft-adapter", str(adapter))

    err = tmp_path / "up.err"
    up = subprocess.Popen(up_cmd, stdout=subprocess.DEVNULL, stderr=open(err, "wb"), env=env)
    try:
        _wait_ready(up, err, 900)
        ran = 0
        for block in blocks():
            if _kind(block) != "run":
                continue
            if block.lang == "python":
                cmd = [sys.executable, "-c", mapped(block.text)]
            else:
                cmd = ["bash", "-euo", "pipefail", "-c", mapped(block.text)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
            assert proc.returncode == 0, (block.text, proc.stdout[-2000:], proc.stderr[-2000:])
            assert proc.stdout.strip(), block.text          # each says something
            ran += 1
        assert ran >= 4
        # --metrics-port: each service's metrics on its own port, the executor's vllm:* among them
        import urllib.request
        assert f"metrics registry :{metrics}  executor-0 :{metrics + 1}  router :{metrics + 2}" in err.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics + 1}/metrics", timeout=10) as reply:
            assert "vllm:num_requests_running" in reply.read().decode()
        _bench_reruns_and_failures(env, tmp_path)
    finally:
        code = _stop(up)
    assert code == 0, err.read_text()

    err2 = tmp_path / "up2.err"
    up = subprocess.Popen(up_cmd, stdout=subprocess.DEVNULL, stderr=open(err2, "wb"), env=env)
    try:
        took = _wait_ready(up, err2, 300)
        text = err2.read_text()
        assert "in use" not in text and "compiling" not in text, text
        print(f"up ready again {took:.1f} s after the first one stopped")
        again = subprocess.run([*CLI.split(), "generate", "--adapter", "demo/sql", "--max-new-tokens", "4",
                                "Hi"], capture_output=True, text=True, timeout=300, env=env)
        assert again.returncode == 0, again.stderr
    finally:
        code = _stop(up)
    assert code == 0, err2.read_text()
