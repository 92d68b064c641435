"""`openlora up` as a person uses it: start everything, add an adapter, generate, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from services.synthetic import ALL_MODULES, AdapterSpec, ModelSpec, write_adapter
from tests.servers import free_port, free_port_block, health

CLI = [sys.executable, "-m", "services.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_up_adapters_generate_and_sigterm(tmp_path, llama_dir):
    # ports: router P, registry P+1, executor P+2 -- pick P with the next two free too
    port, http_port = free_port_block(3), free_port()
    up = subprocess.Popen([*CLI, "up", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                           "--base-model", str(llama_dir), "--http-port", str(http_port)],
                          stdout=subprocess.DEVNULL, stderr=open(tmp_path / "up.log", "wb"))
    router, registry = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    try:
        deadline = time.monotonic() + 180
        while health(router) != 1:   # SERVING
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.3)
        adapter = write_adapter(tmp_path / "a", ModelSpec(), AdapterSpec(targets=ALL_MODULES))
        added = _cli("adapters", "add", "team/a", f"file://{adapter}", "--registry", registry)
        assert added.returncode == 0, added.stderr
        listed = _cli("adapters", "list", "--registry", registry)
        assert "team/a" in listed.stdout

        base = _cli("generate", "--router", router, "--max-new-tokens", "8", "Hello world")
        tuned = _cli("generate", "--router", router, "--adapter", "team/a", "--max-new-tokens", "8",
                     "Hello world")
        streamed = _cli("generate", "--router", router, "--adapter", "team/a", "--max-new-tokens",
                        "8", "--stream", "Hello world")
        assert base.returncode == tuned.returncode == streamed.returncode == 0, tuned.stderr
        assert tuned.stdout == streamed.stdout and tuned.stdout.strip()
        missing = _cli("generate", "--router", router, "--adapter", "team/none", "x")
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
        # the gateway `up` started: the base model by its directory's name, and the adapter
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=5) as r:
                    models = {m["id"]: m["parent"] for m in json.load(r)["data"]}
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        assert models[llama_dir.name] is None and models["team/a"] == llama_dir.name
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0
    assert health(router) is None and health(registry) is None


def test_up_refuses_bad_flags():
    proc = _cli("up", "--executors", "0")
    assert proc.returncode == 2 and "--executors" in proc.stderr
    env_bad = subprocess.run([*CLI, "up"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "OPENLORA_PORT": "nope"})
    assert env_bad.returncode == 2 and "OPENLORA_PORT" in env_bad.stderr
