"""`openlora registry` as a real process: health, reflection, SIGTERM, and kill -9 crash safety."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.common.gen.openlora.v1 import registry_pb2 as pb
from services.common.gen.openlora.v1 import registry_pb2_grpc
from services.common.harness import Service, free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]


class RegistryProcess:
    """The harness's registry Service with a stub and a health stub on one channel."""

    def __init__(self, data_dir: pathlib.Path, port: int, args: list[str] = (), env: dict | None = None):
        self.service = Service("registry", "--data-dir", str(data_dir), "--grace-seconds", "2", *args,
                               port=port, env=env, log_path=data_dir.with_suffix(".log")).start(timeout=30)
        self.proc, self.address = self.service.proc, self.service.address
        self.channel = grpc.insecure_channel(self.address)
        self.stub = registry_pb2_grpc.AdapterRegistryStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.channel.close()
        self.proc.send_signal(sig)
        return self.proc.wait(15)


def _files(path: pathlib.Path) -> dict[str, bytes]:
    return {n: (path / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def _upload(stub, adapter_id, files, chunk=8192):
    def msgs():
        yield pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id=adapter_id))
        for name, data in files.items():
            for off in range(0, len(data), chunk):
                yield pb.UploadAdapterRequest(chunk=pb.FileChunk(file_name=name,
                                                                 data=data[off:off + chunk]))
    return stub.UploadAdapter(msgs(), timeout=20)


def _fetch(stub, adapter_id, version):
    it = stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id, version=version), timeout=20)
    meta = next(it).adapter
    data: dict[str, bytearray] = {}
    for m in it:
        data.setdefault(m.chunk.file_name, bytearray()).extend(m.chunk.data)
    return meta, data


def _check_whole(meta, data):
    assert [f.name for f in meta.files] == sorted(data)
    for f in meta.files:
        assert hashlib.sha256(data[f.name]).hexdigest() == f.sha256 and len(data[f.name]) == f.size_bytes
    manifest = "".join(f"{f.name}\t{f.sha256}\n" for f in meta.files)
    assert meta.digest == "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def test_health_reflection_sigterm(tmp_path, backend):
    reg = RegistryProcess(tmp_path / "data", free_port(), backend.args(backend.config()), backend.env)
    watch = reg.stub.WatchAdapters(pb.WatchAdaptersRequest())
    try:
        for name in ("", "openlora.v1.AdapterRegistry"):
            assert reg.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status \
                == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(reg.channel).get_services())
        assert {"openlora.v1.AdapterRegistry", "grpc.health.v1.Health"} <= services
        assert watch.is_active()
    finally:
        reg.proc.send_signal(signal.SIGTERM)          # an open WatchAdapters stream ends on drain
        assert list(watch) == [] and watch.code() == grpc.StatusCode.OK
        assert reg.stop(signal.SIGTERM) == 0


def test_kill_9_during_uploads_loses_nothing_acknowledged(tmp_path, make_adapter, backend):
    contents = [_files(make_adapter(rank=r)) for r in (4, 8, 16, 32)]
    data_dir, port = tmp_path / "data", free_port()
    config = backend.config()
    args = backend.args(config)
    reg = RegistryProcess(data_dir, port, args, backend.env)
    acked: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def writer(w: int):
        i = 0
        while not stop.is_set():
            try:
                a = _upload(reg.stub, f"crash/{w}", contents[(i + w) % len(contents)])
                acked.append((a.adapter_id, a.version, a.digest))
            except grpc.RpcError:
                return
            i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    [t.start() for t in threads]
    time.sleep(2.0)
    reg.proc.send_signal(signal.SIGKILL)
    reg.proc.wait(10)
    stop.set()
    [t.join(30) for t in threads]
    reg.channel.close()
    assert len(acked) >= 3

    reg = RegistryProcess(data_dir, port, args, backend.env)
    try:
        for adapter_id, version, digest in acked:
            meta, data = _fetch(reg.stub, adapter_id, version)
            assert meta.digest == digest
            _check_whole(meta, data)
        listed = reg.stub.ListAdapters(pb.ListAdaptersRequest(page_size=1000)).adapters
        for a in listed:                                  # whatever is visible is whole
            _check_whole(*_fetch(reg.stub, a.adapter_id, a.version))
        if backend.s3 is None:
            assert not list((data_dir / "blobs" / "tmp").iterdir())
        else:                                             # no spool file, no open multipart upload
            assert not list((data_dir / "spool").iterdir())
            bucket = config["blob_url"][len("s3://"):].split("/")[0]
            assert not backend.s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    finally:
        assert reg.stop() == 0


def test_openlora_adapters_cli_subprocess(tmp_path, make_adapter):
    reg = RegistryProcess(tmp_path / "data", free_port())
    try:
        env = {**os.environ, "OPENLORA_REGISTRY": reg.address}
        d = make_adapter()
        run = lambda *a: subprocess.run([sys.executable, "-m", "services.cli", "adapters", *a],  # noqa: E731
                                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        r = run("add", "demo", f"file://{d}")
        assert r.returncode == 0, r.stderr
        r = run("list")
        assert r.returncode == 0 and "demo" in r.stdout
        r = run("rm", "demo", "--version", "7")
        assert r.returncode == 1 and r.stderr.startswith("openlora adapters rm: NOT_FOUND:")
    finally:
        assert reg.stop() == 0
