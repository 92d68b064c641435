"""The AdapterRegistry gRPC API against a real in-process server (grpc.aio in a background thread)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import pathlib
import struct
import threading
import time

import grpc
import pytest

from services.common.gen.openlora.v1 import registry_pb2 as pb
from services.common.gen.openlora.v1 import registry_pb2_grpc
from services.common.harness import wait_until
from services.registry import admin
from services.registry.app import start
from services.registry.config import RegistryConfig
from services.registry.stores import AdapterRecord, FileEntry

CODE = grpc.StatusCode


class RunningRegistry:
    """A registry server on 127.0.0.1:0 served by its own event loop thread; `stub` is sync."""

    def __init__(self, data_dir: pathlib.Path, **config):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cfg = RegistryConfig(host="127.0.0.1", port=0, data_dir=str(data_dir), **config)
        self.server, self.port, self.core = self._run(start(cfg))
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = registry_pb2_grpc.AdapterRegistryStub(self.channel)

    def _run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.channel.close()
        self._run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.core.metadata.close()


@pytest.fixture
def registry(tmp_path, backend):
    r = RunningRegistry(tmp_path / "data", max_adapter_bytes=1 << 20, **backend.config())
    yield r
    r.close()


def files_of(path: pathlib.Path) -> dict[str, bytes]:
    return {n: (path / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def upload_msgs(adapter_id: str, files: dict[str, bytes], chunk: int = 4096, labels=None,
                base_model: str = ""):
    yield pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id=adapter_id, labels=labels or {},
                                                         base_model=base_model))
    for name, data in files.items():
        for off in range(0, max(len(data), 1), chunk):
            yield pb.UploadAdapterRequest(chunk=pb.FileChunk(file_name=name, data=data[off:off + chunk]))


def upload(stub, adapter_id, files, **kw) -> pb.Adapter:
    return stub.UploadAdapter(upload_msgs(adapter_id, files, **kw), timeout=30)


def fetch(stub, adapter_id, version=0) -> tuple[pb.Adapter, dict[str, bytes]]:
    it = stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id, version=version), timeout=30)
    first = next(it)
    assert first.WhichOneof("item") == "adapter"
    out: dict[str, bytearray] = {}
    order = []
    for msg in it:
        name = msg.chunk.file_name
        if name not in out:
            order.append(name)
        out.setdefault(name, bytearray()).extend(msg.chunk.data)
    assert order == [f.name for f in first.adapter.files]
    return first.adapter, {k: bytes(v) for k, v in out.items()}


def expected_digest(files: dict[str, bytes]) -> str:
    manifest = "".join(f"{n}\t{hashlib.sha256(files[n]).hexdigest()}\n" for n in sorted(files))
    return "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code()


def test_upload_get_fetch_versions(registry, make_adapter):
    a_files, b_files = files_of(make_adapter(rank=4)), files_of(make_adapter(rank=8, use_rslora=True))
    a = upload(registry.stub, "team/a-1", a_files, labels={"team": "x"})
    assert (a.version, a.rank, a.lora_alpha, a.base_model) == (1, 4, 16.0, "openlora/demo-llama")
    assert a.digest == expected_digest(a_files)
    assert list(a.target_modules) == ["q_proj", "v_proj"] and a.source == "upload"
    assert a.size_bytes == sum(map(len, a_files.values())) and a.created_at.seconds > 0
    assert [f.name for f in a.files] == sorted(a_files)
    again = upload(registry.stub, "team/a-1", a_files)
    assert (again.version, again.digest) == (1, a.digest)            # same content: idempotent
    b = upload(registry.stub, "team/a-1", b_files, base_model="other")
    assert (b.version, b.use_rslora, b.base_model) == (2, True, "other")
    assert registry.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="team/a-1")).version == 2
    got, data = fetch(registry.stub, "team/a-1", 1)
    assert data == a_files and got.digest == a.digest and got.labels == {"team": "x"}
    assert fetch(registry.stub, "team/a-1")[1] == b_files


def test_fetch_large_chunks(tmp_path, make_adapter, backend):
    r = RunningRegistry(tmp_path / "d", **backend.config())
    try:
        files = files_of(make_adapter(rank=64, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj")))
        files_big = dict(files)
        upload(r.stub, "big", files_big, chunk=1 << 20)
        it = list(r.stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id="big")))
        assert all(len(m.chunk.data) <= 1 << 20 for m in it[1:])
        assert fetch(r.stub, "big")[1] == files_big
    finally:
        r.close()


def test_register_file_source_and_unsupported(registry, make_adapter):
    d = make_adapter()
    (d / "README.md").write_text("ignored")
    a = registry.stub.RegisterAdapter(pb.RegisterAdapterRequest(
        adapter_id="f", source=f"file://{d}", labels={"k": "v"}))
    assert a.version == 1 and a.source == f"file://{d}" and a.digest == expected_digest(files_of(d))
    assert [f.name for f in a.files] == ["adapter_config.json", "adapter_model.safetensors"]
    for source in ("s3://Not_A_Bucket/prefix", "ftp://x/y", "no-scheme", "file://relative/x",
                   f"file://{d}/missing", "hf://not a repo"):
        c = code_of(registry.stub.RegisterAdapter,
                    pb.RegisterAdapterRequest(adapter_id="f2", source=source))
        assert c == CODE.INVALID_ARGUMENT, source
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(grpc.RpcError) as info:
        registry.stub.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="p", source=f"file://{d}"))
    assert info.value.code() == CODE.INVALID_ARGUMENT and "safetensors" in info.value.details()


@pytest.mark.parametrize("bad_id", ["", "/abs", "a/../b", "..", "-x", ".hidden", "a" * 129, "a b",
                                    "a\\b", "ä"])
def test_bad_ids(registry, make_adapter, bad_id):
    files = files_of(make_adapter())
    assert code_of(upload, registry.stub, bad_id, files) == CODE.INVALID_ARGUMENT
    assert code_of(registry.stub.GetAdapter, pb.GetAdapterRequest(adapter_id=bad_id)) \
        == CODE.INVALID_ARGUMENT


def _st(tensors: dict[str, list[int]]) -> bytes:
    header, off = {}, 0
    for name, shape in tensors.items():
        n = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * off


P = "base_model.model.model.layers.0.self_attn.q_proj."


def _bad_cases(good: dict[str, bytes]):
    cfg = json.loads(good["adapter_config.json"])
    weights = good["adapter_model.safetensors"]
    ok_st = _st({P + "lora_A.weight": [8, 64], P + "lora_B.weight": [64, 8]})
    return {
        "unknown file": ({**good, "README.md": b"hi"}, CODE.INVALID_ARGUMENT),
        "pickle weights": ({"adapter_config.json": good["adapter_config.json"],
                            "adapter_model.bin": b"\x80\x04"}, CODE.INVALID_ARGUMENT),
        "missing weights": ({"adapter_config.json": good["adapter_config.json"]}, CODE.INVALID_ARGUMENT),
        "dora": ({**good, "adapter_config.json": json.dumps({**cfg, "use_dora": True}).encode()},
                 CODE.INVALID_ARGUMENT),
        "non-lora": ({**good, "adapter_config.json": json.dumps({**cfg, "peft_type": "IA3"}).encode()},
                     CODE.INVALID_ARGUMENT),
        "bad header": ({**good, "adapter_model.safetensors": b"\xff" * 64}, CODE.INVALID_ARGUMENT),
        "truncated": ({**good, "adapter_model.safetensors": weights[:-7]}, CODE.INVALID_ARGUMENT),
        "trailing bytes": ({**good, "adapter_model.safetensors": weights + b"xx"}, CODE.INVALID_ARGUMENT),
        "shape vs r": ({**good, "adapter_model.safetensors": _st(
            {P + "lora_A.weight": [4, 64], P + "lora_B.weight": [64, 4]})}, CODE.INVALID_ARGUMENT),
        "not a layer": ({**good, "adapter_model.safetensors": _st(
            {"base_model.model.lm_head.lora_A.weight": [8, 64],
             "base_model.model.lm_head.lora_B.weight": [64, 8]})}, CODE.INVALID_ARGUMENT),
        "ok variant": ({**good, "adapter_model.safetensors": ok_st}, CODE.OK),
        "too big": ({**good, "adapter_model.safetensors": b"\0" * (2 << 20)}, CODE.RESOURCE_EXHAUSTED),
    }


def test_bad_uploads(registry, make_adapter):
    for name, (files, want) in _bad_cases(files_of(make_adapter())).items():
        if want == CODE.OK:
            upload(registry.stub, "ok", files)
            continue
        assert code_of(upload, registry.stub, "bad", files) == want, name
        assert code_of(registry.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="bad")) \
            == CODE.NOT_FOUND, name
    header_only = [pb.UploadAdapterRequest(chunk=pb.FileChunk(file_name="adapter_config.json"))]
    assert code_of(registry.stub.UploadAdapter, iter(header_only)) == CODE.INVALID_ARGUMENT
    assert not list((registry.core.blobs.tmp_dir).iterdir())


def test_not_found_and_delete(registry, make_adapter):
    s = registry.stub
    for call, req in ((s.GetAdapter, pb.GetAdapterRequest(adapter_id="nope")),
                      (s.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id="nope")),
                      (lambda r: list(s.FetchAdapter(r)), pb.FetchAdapterRequest(adapter_id="nope"))):
        assert code_of(call, req) == CODE.NOT_FOUND
    a_files, b_files = files_of(make_adapter(rank=4)), files_of(make_adapter(rank=8))
    upload(s, "x", a_files), upload(s, "x", b_files), upload(s, "y", a_files)
    assert code_of(s.GetAdapter, pb.GetAdapterRequest(adapter_id="x", version=9)) == CODE.NOT_FOUND
    blobs = set(registry.core.blobs.list())
    assert len(blobs) == 4                                      # x@1 == y@1 stored once
    s.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="x", version=1))
    assert set(registry.core.blobs.list()) == blobs             # y still references them
    assert fetch(s, "y")[1] == a_files
    s.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="y"))
    assert len(set(registry.core.blobs.list())) == 2
    assert fetch(s, "x", 2)[1] == b_files
    s.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="x"))
    assert not set(registry.core.blobs.list())
    assert code_of(s.GetAdapter, pb.GetAdapterRequest(adapter_id="x")) == CODE.NOT_FOUND
    assert upload(s, "x", a_files).version == 3                  # numbers are never reused


def test_list_filters_and_pages(registry, make_adapter):
    s = registry.stub
    f1, f2 = files_of(make_adapter(rank=4)), files_of(make_adapter(rank=8))
    upload(s, "b", f1, labels={"team": "x", "env": "prod"})
    upload(s, "a", f1, labels={"team": "y"}, base_model="m2")
    upload(s, "c", f1, labels={"team": "x"})
    upload(s, "c", f2, labels={"team": "x", "env": "prod"})
    ids = lambda resp: [(a.adapter_id, a.version) for a in resp.adapters]  # noqa: E731
    assert ids(s.ListAdapters(pb.ListAdaptersRequest())) == [("a", 1), ("b", 1), ("c", 2)]
    assert ids(s.ListAdapters(pb.ListAdaptersRequest(base_model="m2"))) == [("a", 1)]
    assert ids(s.ListAdapters(pb.ListAdaptersRequest(label_selector="team=x, env=prod"))) \
        == [("b", 1), ("c", 2)]
    p1 = s.ListAdapters(pb.ListAdaptersRequest(page_size=2))
    assert ids(p1) == [("a", 1), ("b", 1)] and p1.next_page_token
    p2 = s.ListAdapters(pb.ListAdaptersRequest(page_size=2, page_token=p1.next_page_token))
    assert ids(p2) == [("c", 2)] and not p2.next_page_token
    assert code_of(s.ListAdapters, pb.ListAdaptersRequest(label_selector="novalue")) \
        == CODE.INVALID_ARGUMENT
    assert code_of(s.ListAdapters, pb.ListAdaptersRequest(page_token="!!")) == CODE.INVALID_ARGUMENT


def test_ten_thousand_listed_through_pages(registry):
    f = FileEntry("adapter_config.json", 10, "0" * 64)
    records = [AdapterRecord(adapter_id=f"ad-{i:05d}", version=1, digest=f"sha256:{i:064x}",
                             base_model="m", rank=8, alpha=16.0, target_modules=("q_proj",),
                             use_rslora=False, size_bytes=10, source="upload",
                             labels={"n": str(i % 2)}, created_at=time.time(), files=(f,))
               for i in range(10_000)]
    registry.core.metadata.insert_many(records)
    seen, token, pages = [], "", 0
    while True:
        resp = registry.stub.ListAdapters(pb.ListAdaptersRequest(page_size=1000, page_token=token))
        seen += [a.adapter_id for a in resp.adapters]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert seen == [r.adapter_id for r in records] and pages == 10   # (its speed: benchmarks/registry.py)
    half = registry.stub.ListAdapters(pb.ListAdaptersRequest(page_size=1000, label_selector="n=1"))
    assert len(half.adapters) == 1000 and half.adapters[0].adapter_id == "ad-00001"


def test_cut_off_upload_leaves_nothing(registry, make_adapter):
    files = files_of(make_adapter(rank=64))
    sent = threading.Event()
    never = threading.Event()

    def msgs():
        it = upload_msgs("cut", files, chunk=1024)
        for _ in range(6):
            yield next(it)
        sent.set()
        never.wait(10)

    fut = registry.stub.UploadAdapter.future(msgs(), timeout=30)
    assert sent.wait(10)
    # cut it off once the server is spooling it (or, on a machine too loaded to see that, after 10 s)
    wait_until(lambda: any(registry.core.blobs.tmp_dir.iterdir()), 10, interval_s=0.02)
    fut.cancel()
    never.set()
    deadline = time.time() + 30   # a loaded machine can take seconds to run the server's clean-up
    while list(registry.core.blobs.tmp_dir.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    assert not list(registry.core.blobs.tmp_dir.iterdir())
    assert code_of(registry.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="cut")) == CODE.NOT_FOUND
    assert not list(registry.core.blobs.list())


def test_concurrent_uploads_get_consecutive_versions(registry, make_adapter):
    contents = [files_of(make_adapter(rank=4)) for _ in range(8)]
    results = [None] * len(contents)

    def go(i):
        results[i] = upload(registry.stub, "same", contents[i], chunk=512)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(contents))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sorted(r.version for r in results) == list(range(1, 9))
    for i, r in enumerate(results):
        assert fetch(registry.stub, "same", r.version)[1] == contents[i]


def test_digest_equal_across_registries(tmp_path, make_adapter, backend):
    d = make_adapter()
    r1 = RunningRegistry(tmp_path / "one", **backend.config())
    r2 = RunningRegistry(tmp_path / "two", **backend.config())
    try:
        a = upload(r1.stub, "x", files_of(d), chunk=333)
        b = r2.stub.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="other/name", source=f"file://{d}"))
        assert a.digest == b.digest == expected_digest(files_of(d))
    finally:
        r1.close()
        r2.close()


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers huggingface_hub's HEAD/GET {endpoint}/{repo}/resolve/{revision}/{path}."""

    repos: dict[str, dict[str, bytes]] = {}
    seen: list[tuple[str, str, str | None]] = []

    def log_message(self, *args):
        pass

    def _lookup(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        self.seen.append((self.command, self.path, self.headers.get("authorization")))
        if len(parts) < 5 or parts[2] != "resolve":
            return None, "NotFound"
        repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return None, "RepoNotFound"
        if rev not in ("main", "v1"):
            return None, "RevisionNotFound"
        data = self.repos[repo].get(name)
        return (data, None) if data is not None else (None, "EntryNotFound")

    def _answer(self, body: bool):
        data, err = self._lookup()
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", err)
            self.send_header("X-Error-Message", err)
            self.send_header("X-Repo-Commit", "c" * 40)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", "c" * 40)
        self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    FakeHub.repos, FakeHub.seen = {}, []
    yield FakeHub
    server.shutdown()


def test_hf_source(registry, make_adapter, fake_hub):
    d = make_adapter()
    files = files_of(d)
    fake_hub.repos["org/adapter"] = {**{f"sub/{k}": v for k, v in files.items()},
                                     **files, "README.md": b"x", "big.bin": b"y"}
    fake_hub.repos["org/pickled"] = {"adapter_config.json": files["adapter_config.json"],
                                     "adapter_model.bin": b"\x80"}
    s = registry.stub
    a = s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="h", source="hf://org/adapter"))
    assert a.digest == expected_digest(files) and a.source == "hf://org/adapter"
    b = s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="h", source="hf://org/adapter@v1/sub"))
    assert b.version == 1 and b.digest == a.digest
    got = {p.split("/")[-1] for m, p, _ in fake_hub.seen if m == "GET" and "/resolve/" in p}
    assert got <= {"adapter_config.json", "adapter_model.safetensors"}
    assert all(auth == "Bearer hf_test_token" for _, p, auth in fake_hub.seen if "/resolve/" in p)
    for source, want in (("hf://org/missing", CODE.NOT_FOUND), ("hf://org/adapter@nope", CODE.NOT_FOUND),
                         ("hf://org/adapter/nosub", CODE.INVALID_ARGUMENT),
                         ("hf://org/pickled", CODE.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as info:
            s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="h2", source=source))
        assert info.value.code() == want, (source, info.value.details())
        if "pickled" in source:
            assert "safetensors" in info.value.details()


def test_admin_cli(registry, make_adapter, capsys):
    d = make_adapter()
    reg = ["--registry", registry.address]
    assert admin.main(["add", "cli/one", f"file://{d}", "--label", "team=x", *reg]) == 0
    assert "added cli/one version 1" in capsys.readouterr().out
    assert admin.main(["list", *reg]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["ID", "VERSION"] and "cli/one" in out
    assert admin.main(["list", "--json", *reg]) == 0
    assert json.loads(capsys.readouterr().out)[0]["adapter_id"] == "cli/one"
    assert admin.main(["show", "cli/one", "--version", "1", *reg]) == 0
    assert "sha256:" in capsys.readouterr().out
    assert admin.main(["show", "nope", *reg]) == 1
    assert capsys.readouterr().err.startswith("openlora adapters show: NOT_FOUND: ")
    assert admin.main(["rm", "cli/one", *reg]) == 0
    assert admin.main(["show", "cli/one", "--json", *reg]) == 1
    with pytest.raises(SystemExit) as exit_info:
        admin.main(["frobnicate"])
    assert exit_info.value.code == 2


def test_public_flag_is_kept_per_id_in_both_stores(registry, make_adapter):
    """RegisterAdapter/UploadHeader.public: set, kept (unset leaves it), cleared, shared by every
    version of the id, reset when the id's last version goes; stored by SQLite and PostgreSQL."""
    s = registry.stub
    one, two = make_adapter(seed=1), make_adapter(seed=2)
    a = s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="t/p", source=f"file://{one}", public=True))
    assert a.public and a.version == 1
    assert s.GetAdapter(pb.GetAdapterRequest(adapter_id="t/p")).public
    b = s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="t/p", source=f"file://{two}"))   # unset
    assert b.version == 2 and b.public
    assert s.GetAdapter(pb.GetAdapterRequest(adapter_id="t/p", version=1)).public    # per id
    listed = {x.adapter_id: x.public for x in s.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert listed == {"t/p": True}
    c = s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="t/p", source=f"file://{two}", public=False))
    assert c.version == 2 and not c.public                    # same content: no new version, flag off
    up = s.UploadAdapter(iter([pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id="t/u", public=True)),
                               *list(upload_msgs("t/u", files_of(one)))[1:]]), timeout=30)
    assert up.public
    assert registry.core.metadata.set_public("t/u", False) and not registry.core.metadata.get("t/u").public
    assert not registry.core.metadata.set_public("t/none", True)                  # no such id
    s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="t/u", source=f"file://{one}", public=True))
    s.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="t/u"))
    again = s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="t/u", source=f"file://{one}"))
    assert again.version == 2 and not again.public         # a new adapter under an old id starts private
