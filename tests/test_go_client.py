"""Issue 14: a Go client generated from protos/ alone (Debian's protoc-gen-go and protoc-gen-go-grpc,
grpc-go from golang-google-grpc-dev, GOPATH mode: no network) against a real deployment: registry +
executor + router subprocesses on loopback. Go generation used to fail outright ("unable to determine
Go import path": no go_package)."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import pytest
from grpc_tools import protoc

from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import GOCODE, deployment, go_build

ROOT = pathlib.Path(__file__).resolve().parents[1]
GO_DIR = ROOT / "tests" / "go"
IMPORT = "github.com/openlora/openlora"
# what .ci/run installs where missing (Debian 12: go 1.19, grpc-go 1.33; protobuf 1.5's APIv2 shim,
# without which grpc-go's codec panics on the generated messages)
PACKAGES = ("golang-go protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev golang-google-protobuf-dev "
            "golang-github-golang-protobuf-1-5-dev")


def _go_missing() -> str | None:
    for tool in ("go", "protoc-gen-go", "protoc-gen-go-grpc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {PACKAGES})"
    if not (GOCODE / "src" / "google.golang.org" / "grpc").is_dir():
        return f"grpc-go sources are not under {GOCODE} (apt-get install {PACKAGES})"
    if not (GOCODE / "src" / "github.com" / "golang" / "protobuf" / "proto" / "registry.go").is_file():
        return f"github.com/golang/protobuf under {GOCODE} is older than 1.4 (apt-get install {PACKAGES})"
    return None


def generate_go(out: pathlib.Path) -> list[pathlib.Path]:
    """protoc --go_out --go-grpc_out over protos/ (grpcio-tools' protoc, Debian's plugins)."""
    out.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    code = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{include}",
                        f"--plugin=protoc-gen-go={shutil.which('protoc-gen-go')}",
                        f"--plugin=protoc-gen-go-grpc={shutil.which('protoc-gen-go-grpc')}",
                        f"--go_out={out}", f"--go-grpc_out={out}", *protos])
    assert code == 0, "protoc --go_out failed (see stderr)"
    return sorted(out.rglob("*.go"))


def _build(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "gopath" / "src"
    files = generate_go(src)
    pkg = src / IMPORT / "gen" / "go" / "openlora" / "v1"
    assert {f.name for f in files} >= {"router.pb.go", "router_grpc.pb.go", "common.pb.go",
                                       "executor_grpc.pb.go", "registry_grpc.pb.go"}
    assert all(f.parent == pkg for f in files)          # go_package: one Go package, its import path
    cmd = src / IMPORT / "cmd" / "client"
    cmd.mkdir(parents=True)
    shutil.copy(GO_DIR / "client.go", cmd / "client.go")
    binary = tmp_path / "client"
    proc = go_build(tmp_path / "gopath", f"{IMPORT}/cmd/client", binary)
    assert proc.returncode == 0, proc.stderr
    return binary


@pytest.mark.slow
def test_go_client_health_checked_generate_stream_and_error_details(llama_dir, tmp_path):
    missing = _go_missing()
    if missing:
        pytest.skip(missing)
    binary = _build(tmp_path)
    adapter = write_adapter(tmp_path / "adapter", TINY["llama"], AdapterSpec(seed=302))
    with deployment(tmp_path, llama_dir, {"go/a": adapter}) as (registry, executor, router):
        proc = subprocess.run([str(binary), router.address, "go/a"], capture_output=True, text=True,
                              timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["generate"]["tokens"] == 8 and out["generate"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert out["stream"]["text"] == out["generate"]["text"] and out["stream"]["chunks"] >= 1
    assert out["stream"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert out["not_found"]["code"] == "NotFound" and out["not_found"]["reason"], out

