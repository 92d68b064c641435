"""Registry storage beyond one process: WatchAdapters, replicated registries over one PostgreSQL and
one bucket, S3 multipart and crash leftovers, schema migrations, on-demand imports from s3://.
Real servers only (tests/backends.py)."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time

import grpc
import pytest

from services.common.gen.openlora.v1 import registry_pb2 as pb
from services.registry.stores.blobs_s3 import S3BlobStore
from tests.test_registry_api import RunningRegistry, code_of, fake_hub, fetch, files_of, upload  # noqa: F401

CODE = grpc.StatusCode


class Watcher:
    """Collects a WatchAdapters stream in a thread."""

    def __init__(self, stub, prefix: str = ""):
        self.changes: list[pb.AdapterChange] = []
        self._call = stub.WatchAdapters(pb.WatchAdaptersRequest(adapter_id_prefix=prefix))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.5)                 # let the server register the subscription

    def _run(self):
        try:
            for c in self._call:
                self.changes.append(c)
        except grpc.RpcError:
            pass

    def wait_for(self, n: int, timeout: float) -> list[pb.AdapterChange]:
        deadline = time.monotonic() + timeout
        while len(self.changes) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.changes)

    def close(self):
        self._call.cancel()
        self._thread.join(5)


def test_watch_sees_registration_and_deletion_within_a_second(tmp_path, make_adapter, backend):
    r = RunningRegistry(tmp_path / "d", **backend.config())
    team, every = Watcher(r.stub, "team/"), Watcher(r.stub)
    try:
        files = files_of(make_adapter())
        a = upload(r.stub, "team/a", files)
        got = team.wait_for(1, 1.0)                    # within a second of the acknowledgement
        assert got[0].kind == pb.ADAPTER_CHANGE_KIND_CREATED
        assert (got[0].adapter_id, got[0].version, got[0].latest_version) == ("team/a", 1, 1)
        assert got[0].adapter.digest == a.digest and got[0].adapter.files[0].sha256
        upload(r.stub, "other/b", files)                # filtered out of the team/ stream
        r.stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="team/a"))
        got = team.wait_for(2, 1.0)
        assert [(c.kind, c.adapter_id, c.version, c.latest_version) for c in got] == [
            (pb.ADAPTER_CHANGE_KIND_CREATED, "team/a", 1, 1),
            (pb.ADAPTER_CHANGE_KIND_DELETED, "team/a", 0, 0)]
        assert not got[1].HasField("adapter")
        assert [c.adapter_id for c in every.wait_for(3, 1.0)] == ["team/a", "other/b", "team/a"]
    finally:
        team.close(), every.close()
        r.close()


@pytest.fixture
def shared(pg_server, s3_server) -> dict:
    """Config of registries replicated over one PostgreSQL database and one bucket."""
    return {"metadata_url": pg_server.new_database(), "blob_url": f"s3://{s3_server.new_bucket()}/b"}


def test_watch_across_two_registries(tmp_path, make_adapter, shared):
    config = shared
    a, b = RunningRegistry(tmp_path / "a", **config), RunningRegistry(tmp_path / "b", **config)
    w = Watcher(b.stub)
    try:
        files_1, files_2 = files_of(make_adapter(rank=4)), files_of(make_adapter(rank=8))
        upload(a.stub, "x", files_1)
        upload(a.stub, "x", files_2)
        a.stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="x", version=1))
        got = w.wait_for(3, 1.0)                       # within a second, at the other replica
        assert [(c.kind, c.version, c.latest_version) for c in got] == [
            (pb.ADAPTER_CHANGE_KIND_CREATED, 1, 1), (pb.ADAPTER_CHANGE_KIND_CREATED, 2, 2),
            (pb.ADAPTER_CHANGE_KIND_DELETED, 1, 2)]
    finally:
        w.close()
        a.close(), b.close()


def _list_all(stub) -> list[tuple[str, int, str]]:
    out, token = [], ""
    while True:
        resp = stub.ListAdapters(pb.ListAdaptersRequest(page_size=1000, page_token=token))
        out += [(x.adapter_id, x.version, x.digest) for x in resp.adapters]
        token = resp.next_page_token
        if not token:
            return out


def test_two_replicas_one_database_one_bucket(tmp_path, make_adapter, shared):
    config = shared
    a, b = RunningRegistry(tmp_path / "a", **config), RunningRegistry(tmp_path / "b", **config)
    try:
        contents = [files_of(make_adapter(rank=r)) for r in (4, 8, 16)]

        def register(i: int) -> pb.Adapter:
            stub = (a, b)[i % 2].stub
            return upload(stub, f"rep/{i:04d}", contents[i % 3], chunk=1 << 20)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            made = list(pool.map(register, range(1000)))
        assert all(m.version == 1 for m in made)
        listed_a, listed_b = _list_all(a.stub), _list_all(b.stub)
        assert listed_a == listed_b == [(m.adapter_id, 1, m.digest) for m in made]
        assert len(set(a.core.blobs.list())) == 6                 # 3 contents x 2 files, once each
        got, data = fetch(b.stub, "rep/0001")                     # written at a, read at b
        assert data == contents[1] and got.version == 1

        # the same content registered at both at once: one version
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            versions = list(pool.map(lambda i: upload((a, b)[i % 2].stub, "same/x", contents[0]).version,
                                     range(16)))
        assert versions == [1] * 16
        # different content at both at once: consecutive versions, no number twice
        fresh = [files_of(make_adapter(rank=4)) for _ in range(6)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            versions = list(pool.map(lambda i: upload((a, b)[i % 2].stub, "same/x", fresh[i]).version,
                                     range(6)))
        assert sorted(versions) == list(range(2, 8))
        # a deletion at one replica is seen at the other at once
        a.stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="rep/0002"))
        assert code_of(b.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="rep/0002")) == CODE.NOT_FOUND
        assert fetch(b.stub, "rep/0005")[1] == contents[2]       # shared blobs survive
    finally:
        a.close(), b.close()


def test_migrations_are_versioned_and_applied_once(tmp_path, backend, make_adapter):
    config = backend.config()
    r1 = RunningRegistry(tmp_path / "d", **config)
    version = r1.core.metadata.schema_version()
    upload(r1.stub, "m", files_of(make_adapter(rank=4)))
    upload(r1.stub, "m", files_of(make_adapter(rank=8)))
    r1.close()
    r2 = RunningRegistry(tmp_path / "d", **config)             # reopened: nothing re-applied
    try:
        metadata = r2.core.metadata
        assert version == metadata.schema_version() >= 2
        assert [(c.kind, c.version) for c in metadata.changes_after(0)] == [("created", 1),
                                                                           ("created", 2)]
        assert metadata.prune_changes(time.time() + 10) == 1      # the newest row always stays
        assert [c.version for c in metadata.changes_after(0)] == [2]
    finally:
        r2.close()


def test_s3_multipart_upload_and_abandoned_uploads(tmp_path, s3_server):
    bucket = s3_server.new_bucket()
    store = S3BlobStore(f"s3://{bucket}/pre/fix", tmp_path / "spool", part_bytes=5 << 20)
    data = os.urandom(11 << 20)                                  # 3 parts
    w = store.writer()
    for off in range(0, len(data), 1 << 20):
        w.write(data[off:off + (1 << 20)])
    sha = w.commit()
    client = s3_server.client()
    head = client.head_object(Bucket=bucket, Key=f"pre/fix/sha256/{sha[:2]}/{sha}")
    assert head["ContentLength"] == len(data) and head["Metadata"]["sha256"] == sha
    assert "-3" in head["ETag"]                                 # a three-part multipart upload
    reader = store.open(sha)
    assert reader.read(0, 3 << 20) + reader.read(3 << 20, len(data)) == data
    assert reader.read(5, 10) == data[5:15]                       # a jump: a ranged GET
    reader.close()
    assert list(store.list()) == [sha] and not list((tmp_path / "spool").iterdir())
    # a crash mid-upload: parts sent, never completed -> nothing visible, aborted at start-up
    key = f"pre/fix/sha256/ab/{'ab' * 32}"
    up = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=1, Body=data[:5 << 20])
    assert list(store.list()) == [sha] and not store.exists("ab" * 32)
    assert store.clear_temp() == 1
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with pytest.raises(FileNotFoundError):
        store.open("cd" * 32)


def _put_adapter(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


def test_s3_source_and_on_demand_single_flight(tmp_path, make_adapter, s3_server):
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    files = files_of(make_adapter())
    _put_adapter(client, bucket, "src/org/name", files)
    _put_adapter(client, bucket, "src/org/other", files)
    r = RunningRegistry(tmp_path / "d", on_demand_source=f"s3://{bucket}/src")
    try:
        a = r.stub.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="direct",
                                                             source=f"s3://{bucket}/src/org/name"))
        assert a.source == f"s3://{bucket}/src/org/name" and fetch(r.stub, "direct")[1] == files
        code = code_of(r.stub.RegisterAdapter, pb.RegisterAdapterRequest(
            adapter_id="d2", source=f"s3://{bucket}/src/nothing"))
        assert code == CODE.NOT_FOUND

        barrier = threading.Barrier(32)

        def first_request(_):
            barrier.wait()
            return r.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="org/name"), timeout=30)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            got = list(pool.map(first_request, range(32)))
        assert {(g.adapter_id, g.version, g.digest) for g in got} == {("org/name", 1, a.digest)}
        assert r.core.on_demand.imports == 1
        assert got[0].source == f"s3://{bucket}/src/org/name"
        meta, data = fetch(r.stub, "org/other")                  # FetchAdapter imports too
        assert data == files and meta.version == 1 and r.core.on_demand.imports == 2
        assert code_of(r.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="org/missing"),
                       timeout=10) == CODE.NOT_FOUND
        assert code_of(lambda req: list(r.stub.FetchAdapter(req, timeout=10)),
                       pb.FetchAdapterRequest(adapter_id="org/missing")) == CODE.NOT_FOUND
        # an id the registry already knows is never re-imported
        assert r.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="org/name")).version == 1
        assert r.core.on_demand.imports == 4
    finally:
        r.close()


def test_on_demand_unreachable_source_is_unavailable_within_the_deadline(tmp_path, monkeypatch,
                                                                        s3_server):
    silent = socket.socket()                     # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))                  # bound, not listening: connection refused
    try:
        for endpoint in (f"http://127.0.0.1:{silent.getsockname()[1]}",
                         f"http://127.0.0.1:{dead.getsockname()[1]}"):
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
            r = RunningRegistry(tmp_path / endpoint.rsplit(":", 1)[1], on_demand_source="s3://bkt/src")
            try:                                 # UNAVAILABLE, not the client's DEADLINE_EXCEEDED
                with pytest.raises(grpc.RpcError) as info:
                    r.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="org/x"), timeout=3)
                assert info.value.code() == CODE.UNAVAILABLE, info.value.details()
                assert "org/x" in info.value.details()
            finally:
                r.close()
    finally:
        silent.close()
        dead.close()


def test_on_demand_from_the_hub(tmp_path, make_adapter, fake_hub):  # noqa: F811
    files = files_of(make_adapter())
    fake_hub.repos["org/adapter"] = {**files, "README.md": b"x"}
    r = RunningRegistry(tmp_path / "d", on_demand_source="hf")
    try:
        a = r.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="org/adapter"), timeout=30)
        assert (a.version, a.source, a.labels["openlora/on-demand"]) == (1, "hf://org/adapter", "true")
        assert fetch(r.stub, "org/adapter")[1] == files
        for missing in ("org/missing", "single-segment"):
            assert code_of(r.stub.GetAdapter, pb.GetAdapterRequest(adapter_id=missing),
                           timeout=30) == CODE.NOT_FOUND, missing
        assert code_of(r.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="org/adapter", version=2)) \
            == CODE.NOT_FOUND                                  # known id, unknown version: no import
        assert r.core.on_demand.imports == 3
    finally:
        r.close()
