"""`openlora up` as a person uses it: start everything, add an adapter, generate, stop."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from services.synthetic import ALL_MODULES, AdapterSpec, ModelSpec, write_adapter
from tests.servers import free_port, free_port_block, health

CLI = [sys.executable, "-m", "services.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
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


@pytest.mark.slow
def test_up_with_mutual_tls_and_auth(tmp_path, llama_dir):
    """`openlora up --tls-cert --tls-key --tls-ca --auth-file`: every service serves TLS and calls the
    others over it (health checks too), the ready line comes, and the CLI and the gateway (HTTPS with
    a client certificate) work; a plaintext client gets nothing. Certificates made here (trustme)."""
    import ssl

    import trustme

    from services.common.tls import ClientSecurity
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pem = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(pem["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(pem["cert"]))
    leaf.private_key_pem.write_to_path(str(pem["key"]))
    auth_file = tmp_path / "tokens.json"
    auth_file.write_text(json.dumps({"tokens": [{"token": "up-admin", "tenant": "ops", "role": "admin"},
                                                {"token": "team-tok", "tenant": "team", "role": "tenant"}]}))
    tls = ["--tls-ca", str(pem["ca"]), "--tls-cert", str(pem["cert"]), "--tls-key", str(pem["key"])]
    port, http_port = free_port_block(3), free_port()
    log = tmp_path / "up.log"
    up = subprocess.Popen([*CLI, "up", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                           "--base-model", str(llama_dir), "--http-port", str(http_port), *tls,
                           "--auth-file", str(auth_file)],
                          stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                          env={**os.environ, "OPENLORA_TOKEN": "up-admin"})
    router, registry = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    sec = ClientSecurity(ca=pem["ca"].read_bytes(), cert=pem["cert"].read_bytes(), key=pem["key"].read_bytes())
    try:
        deadline = time.monotonic() + 240
        while "openlora up: ready:" not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        text = log.read_text()
        assert f"gateway https://127.0.0.1:{http_port}/v1" in text and "TLS (mutual)" in text, text
        assert health(router, security=sec) == 1 and health(registry, security=sec) == 1
        assert health(router) is None and health(registry) is None          # plaintext: no answer
        adapter = write_adapter(tmp_path / "a", ModelSpec(), AdapterSpec(targets=ALL_MODULES))
        team = ["--token", "team-tok", *tls]
        added = _cli("adapters", "add", "team/a", f"file://{adapter}", "--registry", registry,
                     "--token", "up-admin", *tls)
        assert added.returncode == 0, added.stderr
        tuned = _cli("generate", "--router", router, "--adapter", "team/a", "--max-new-tokens", "4",
                     *team, "Hello world")
        assert tuned.returncode == 0 and tuned.stdout.strip(), tuned.stderr
        no_tls = _cli("generate", "--router", router, "--token", "team-tok", "Hello")
        assert no_tls.returncode != 0
        ctx = ssl.create_default_context(cafile=str(pem["ca"]))
        ctx.load_cert_chain(str(pem["cert"]), str(pem["key"]))
        req = urllib.request.Request(
            f"https://127.0.0.1:{http_port}/v1/completions", method="POST",
            data=json.dumps({"model": "team/a", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}).encode(),
            headers={"content-type": "application/json", "authorization": "Bearer team-tok"})
        with urllib.request.urlopen(req, timeout=120, context=ctx) as r:
            assert json.load(r)["usage"]["completion_tokens"] == 3
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, log.read_text()[-2000:]


def test_readme_self_signed_certificate_works(tmp_path):
    """docs/reference.md's one-command self-signed set-up (the certificate is its own CA, server and client
    certificate): a registry with it serves mutual TLS, and the CLI talks to it."""
    import re
    import shutil

    import pytest
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary")
    readme = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text()
    m = re.search(r"^(openssl req -x509 .*?-out cert\.pem)$", readme, re.M | re.S)
    assert m, "docs/reference.md lost its one-command self-signed certificate"
    command = m.group(1).replace("\\\n", " ")
    made = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    tls = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", cert]
    from services.common.tls import ClientSecurity
    from tests.servers import Service
    sec = ClientSecurity(ca=open(cert, "rb").read(), cert=open(cert, "rb").read(), key=open(key, "rb").read())
    reg = Service("registry", "--data-dir", str(tmp_path / "reg"), *tls, log_path=tmp_path / "reg.log",
                  security=sec).start()
    try:
        listed = _cli("adapters", "list", "--registry", reg.address, *tls)
        assert listed.returncode == 0 and "no adapters" in listed.stdout, listed.stderr
        assert health(reg.address) is None
    finally:
        reg.stop()
