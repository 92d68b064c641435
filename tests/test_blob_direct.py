"""Executors' direct blob reads (services/executor/blob_direct.py) against a real registry's stores:
a shared blob directory and an S3 bucket (moto server); verified, False on anything amiss."""

from __future__ import annotations

import pathlib
import shutil
import socket

import pytest

from services.common.gen.openlora.v1 import registry_pb2 as pb
from services.executor.blob_direct import DirectBlobReader, fetch_direct
from tests.test_registry_api import RunningRegistry, files_of, upload


def _files_in(d: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.fixture
def registry(tmp_path, backend):
    config = backend.config()
    r = RunningRegistry(tmp_path / "data", **config)
    r.blob_url = config.get("blob_url") or f"file://{tmp_path / 'data' / 'blobs'}"
    yield r
    r.close()


def test_reads_straight_from_the_store_verified(registry, make_adapter, tmp_path):
    files = files_of(make_adapter(rank=16))
    meta = upload(registry.stub, "team/direct", files)
    reader = DirectBlobReader(registry.blob_url)
    for i in range(2):                                   # a reader is reused
        dest = tmp_path / f"dest{i}"
        dest.mkdir()
        assert reader.fetch(meta, dest) is True
        assert _files_in(dest) == files
    wrong = pb.Adapter()
    wrong.CopyFrom(meta)
    wrong.files[1].sha256 = "0" * 64                      # manifest no longer matches the digest
    dest = tmp_path / "wrong"
    dest.mkdir()
    assert reader.fetch(wrong, dest) is False and not list(dest.iterdir())
    absent = pb.Adapter()
    absent.CopyFrom(meta)
    absent.files[1].sha256 = "ab" * 32
    absent.digest = "sha256:" + __import__("hashlib").sha256(
        "".join(f"{f.name}\t{f.sha256}\n" for f in absent.files).encode()).hexdigest()
    assert reader.fetch(absent, dest) is False and not list(dest.iterdir())
    assert fetch_direct(meta, dest, "") is False          # not configured


def test_corrupt_blob_is_refused(tmp_path, make_adapter):
    r = RunningRegistry(tmp_path / "data")
    try:
        files = files_of(make_adapter())
        meta = upload(r.stub, "x", files)
        shared = tmp_path / "shared"
        shutil.copytree(tmp_path / "data" / "blobs", shared)
        weights = next(f for f in meta.files if f.name == "adapter_model.safetensors")
        blob = shared / "sha256" / weights.sha256[:2] / weights.sha256
        data = bytearray(blob.read_bytes())
        data[-1] ^= 1
        blob.write_bytes(bytes(data))
        dest = tmp_path / "dest"
        dest.mkdir()
        assert DirectBlobReader(f"file://{shared}").fetch(meta, dest) is False
        assert not list(dest.iterdir())
    finally:
        r.close()


def test_unreachable_s3_is_false(tmp_path, make_adapter, monkeypatch, s3_server):
    r = RunningRegistry(tmp_path / "data")
    try:
        meta = upload(r.stub, "x", files_of(make_adapter()))
    finally:
        r.close()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))                           # not listening: connection refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead.getsockname()[1]}")
    dest = tmp_path / "dest"
    dest.mkdir()
    try:
        assert DirectBlobReader("s3://some-bucket/blobs").fetch(meta, dest) is False
        assert not list(dest.iterdir())
    finally:
        dead.close()
    with pytest.raises(ValueError):
        DirectBlobReader("ftp://x")
