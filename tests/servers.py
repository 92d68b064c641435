"""Real openlora servers as subprocesses on loopback ports, for end-to-end tests: the product's own
harness (services/common/harness.py, which `openlora up` and the benchmarks use too), plus building
the Go clients."""

from __future__ import annotations

import os
import pathlib
import subprocess

from services.common.harness import (  # noqa: F401  (re-exported for the tests)
    Service,
    cpu_seconds,
    deployment,
    free_port,
    free_port_block,
    health,
    register_adapters,
    wait_serving,
)

GOCODE = pathlib.Path("/usr/share/gocode")          # Debian's Go sources (golang-*-dev packages)


def go_build(gopath: pathlib.Path, package: str, binary: pathlib.Path) -> subprocess.CompletedProcess:
    """`go build` of `package` under gopath with Debian's Go sources behind it (GOPATH mode: no
    module downloads)."""
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:{GOCODE}", "GOFLAGS": "",
           "GOCACHE": os.environ.get("GOCACHE") or str(pathlib.Path.home() / ".cache" / "go-build")}
    return subprocess.run(["go", "build", "-o", str(binary), package], env=env,
                          capture_output=True, text=True, timeout=600)
