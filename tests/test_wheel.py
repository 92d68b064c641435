"""A non-editable install works outside the checkout: `pip install .` shipped no cpp/, so importing
the ops failed on cpp/ops.cpp (and deploy/executor.Dockerfile installs that way). The wheel is built,
installed into a fresh venv (its dependencies taken from this interpreter's site-packages, not
fetched), and its `openlora up` serves a request from a directory outside the repo, compiling the
kernels from the sources the wheel installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest

from tests.readme import ROOT
from tests.servers import free_port_block

pytestmark = [pytest.mark.slow, pytest.mark.compile]


def _wheel(tmp_path) -> str:
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, cwd=tmp_path, timeout=600)
    (wheel,) = out.glob("openlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for source in ("services/_cpp/ops.cpp", "services/_cpp/lora_paged.cpp", "services/_cpp/cuda/lora_paged.cu",
                   "services/common/gen/openlora/v1/executor_pb2.py"):
        assert source in names, source
    assert not any(n.endswith((".so", ".o")) for n in names)
    return str(wheel)


def _venv(tmp_path) -> tuple[str, dict]:
    """A fresh venv whose only extra path is this interpreter's site-packages (torch, grpc, ...):
    a .pth line adds it without running its .pth files, so the checkout's editable install is not seen."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OPENLORA_BUILD_DIR"] = str(tmp_path / "kernels")        # not ~/.cache: a build per temp path
    return str(venv / "bin"), env


def test_the_wheel_installs_and_serves_from_outside_the_checkout(tmp_path):
    wheel = _wheel(tmp_path)
    bin_dir, env = _venv(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "--python", f"{bin_dir}/python", "install", "--no-deps",
                    "--no-index", "-q", wheel], check=True, timeout=300, env=env)
    where = subprocess.run([f"{bin_dir}/python", "-c", "import services, services.cpp_sources as c; "
                            "print(services.__file__); print(c.CPP_DIR)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout.split()
    assert all(str(tmp_path / "venv") in w and str(ROOT) not in w for w in where), where

    port = free_port_block(3)
    err = tmp_path / "up.err"
    up = subprocess.Popen([f"{bin_dir}/openlora", "up", "--port", str(port), "--http-port", "0",
                           "--data-dir", str(tmp_path / "data")], cwd=tmp_path, env=env,
                          stdout=subprocess.DEVNULL, stderr=open(err, "wb"))
    try:
        deadline = time.monotonic() + 900
        while "openlora up: ready" not in err.read_text():
            assert up.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.5)
        out = subprocess.run([f"{bin_dir}/openlora", "generate", "--router", f"127.0.0.1:{port}",
                              "--adapter", "demo/poet", "--max-new-tokens", "8", "Hello"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        assert list((tmp_path / "kernels").glob("openlora_ops_*/*.so")), "the kernels were not built"
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
    assert code == 0, err.read_text()
