"""Issue 14: the Hugging Face Hub on a machine without network, and its log lines under `up`.

`hf://` used to block ~25 s (huggingface_hub's five retries with backoff) before UNAVAILABLE, and each
"Retrying in Ns" warning appeared twice: once as plain text from huggingface_hub's own handler, once
as JSON; the same for a hub id given as an executor's --base-model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from services.common import hub
from tests.servers import Service

CLI = [sys.executable, "-m", "services.cli"]
NO_HOST = "http://openlora-no-such-host.invalid"     # .invalid never resolves (RFC 6761)


@pytest.fixture
def dead_endpoint():
    """A loopback port that refuses connections (bound, never listening)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _no_proxy(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in hub._PROXY_VARS}


def test_unreachable_names_why(dead_endpoint, monkeypatch):
    for name in hub._PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    assert "cannot connect to 127.0.0.1" in hub.unreachable(dead_endpoint)
    assert "cannot resolve openlora-no-such-host.invalid" in hub.unreachable(NO_HOST)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    try:
        assert hub.unreachable(f"http://127.0.0.1:{listening.getsockname()[1]}") is None
    finally:
        listening.close()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")     # the proxy resolves it
    assert hub.unreachable(NO_HOST) is None


@pytest.mark.parametrize("endpoint", ["dead", "no-host"])
def test_hf_source_without_network_fails_fast_and_logs_json_only(tmp_path, dead_endpoint, endpoint):
    env = _no_proxy({**os.environ, "HF_ENDPOINT": dead_endpoint if endpoint == "dead" else NO_HOST,
                     "HF_HOME": str(tmp_path / "hf-home"), "OPENLORA_LOG_SERVICE": "registry"})
    log = tmp_path / "registry.log"
    registry = Service("registry", "--data-dir", str(tmp_path / "r"), env=env, log_path=log).start()
    try:
        t0 = time.monotonic()
        proc = subprocess.run([*CLI, "adapters", "add", "team/x", "hf://org/name", "--registry",
                               registry.address], capture_output=True, text=True, timeout=120,
                              env=env)
        took = time.monotonic() - t0
    finally:
        registry.stop()
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr, proc.stderr
    assert "cannot reach the Hugging Face Hub" in proc.stderr
    assert took < 15, f"took {took:.1f}s (huggingface_hub's retries take ~25 s)"
    text = log.read_text()
    assert "Retrying" not in text
    for line in text.splitlines():
        assert json.loads(line)["service"] == "registry", line


def test_hub_base_model_without_network_fails_fast(tmp_path, dead_endpoint, monkeypatch):
    from services.executor.model.loader import resolve_model_dir
    for name in hub._PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_dir("org/model")
    assert time.monotonic() - t0 < 15
    assert "cannot be reached" in str(info.value) and "not in the Hugging Face cache" in str(info.value)


def test_hub_warnings_are_one_json_line_each_and_records_never_share_a_line():
    code = textwrap.dedent("""
        import logging, threading
        import structlog
        from services.common.logging import configure_logging
        configure_logging()
        from services.common.hub import import_hub
        import_hub()
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        log = structlog.get_logger()
        def burst(n):
            for i in range(300):
                log.info("burst", thread=n, i=i, pad="x" * 200)
                logging.getLogger("stdlib").info("stdlib %d %d", n, i)
        threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENLORA_LOG_SERVICE": "executor-0"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    records = [json.loads(line) for line in lines]          # every line one whole JSON record
    assert all(r["service"] == "executor-0" for r in records)
    assert [r["event"] for r in records].count("Retrying in 1s [Retry 1/5].") == 1
    assert "Retrying" not in "".join(line for line in lines if not line.startswith("{"))
    assert len(records) == 1 + 8 * 300 * 2
