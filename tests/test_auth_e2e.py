"""A real deployment with auth and mutual TLS on: registry + executor + router + gateway (HTTPS) as
subprocesses.

Tenant A must not see, run, fetch, delete or overwrite tenant B's adapter by any RPC or HTTP route:
every RPC of every service is enumerated from the proto descriptors, and every route of the gateway
from its Starlette route table, so a new RPC or route without an entry (and a check) fails here.
Public adapters: every tenant lists and runs them, only the owner changes them. Certificates are
made in the test (trustme).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import ssl
import subprocess
import sys
import time

import grpc
import pytest
import trustme
from google.protobuf import message_factory

from services.common.auth import hash_token
from services.common.gen.openlora.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.common.tls import ClientSecurity, channel
from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import Service, free_port

TOKENS = {"admin": "adm-7f1c", "a": "tenant-a-93b2", "b": "tenant-b-44d0", "service": "svc-1e8a"}
PROMPT = [5, 17, 42, 99, 7, 3]
MODULES = {"openlora.v1.AdapterRegistry": registry_pb2, "openlora.v1.Executor": executor_pb2,
           "openlora.v1.Router": router_pb2}
C = grpc.StatusCode


def all_methods() -> dict[str, object]:
    """'/pkg.Service/Method' -> MethodDescriptor, for every RPC of every service in every generated
    module of protos/ (a new service, not only a new RPC, lands here too)."""
    import importlib
    import pkgutil

    import services.common.gen.openlora.v1 as gen
    out = {}
    for info in pkgutil.iter_modules(gen.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{gen.__name__}.{info.name}")
        for svc in module.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                out[f"/{svc.full_name}/{m.name}"] = m
    assert {p.split("/")[1] for p in out} == set(MODULES), "a new service: add it to MODULES and the tests"
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    leaf, stranger = ca.issue_cert("127.0.0.1", "localhost"), other.issue_cert("127.0.0.1")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem",
             "other_cert": root / "other_cert.pem", "other_key": root / "other_key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    stranger.private_key_pem.write_to_path(str(paths["other_key"]))
    stranger.cert_chain_pems[0].write_to_path(str(paths["other_cert"]))
    return paths


def security(pki, who: str | None, client_cert: bool = True) -> ClientSecurity:
    return ClientSecurity(token=TOKENS[who] if who else "", ca=pki["ca"].read_bytes(),
                          cert=pki["cert"].read_bytes() if client_cert else None,
                          key=pki["key"].read_bytes() if client_cert else None)


@pytest.fixture(scope="module")
def dep(llama_dir, pki, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    auth_file = root / "tokens.json"
    auth_file.write_text(json.dumps({"tokens": [
        {"token_sha256": hash_token(TOKENS["admin"]), "tenant": "ops", "role": "admin"},
        {"token_sha256": hash_token(TOKENS["a"]), "tenant": "a", "role": "tenant"},
        {"token": TOKENS["b"], "tenant": "b", "role": "tenant"},
        {"token_sha256": hash_token(TOKENS["service"]), "tenant": "cluster", "role": "service"},
        {"token": "expired-tok", "tenant": "a", "role": "tenant", "expires_at": 1000},
    ]}))
    allowed, outside = root / "allowed", root / "outside"
    spec = AdapterSpec(rank=2, alpha=4, targets=("q_proj", "v_proj"), seed=7)
    for d in ("x", "y", "own"):
        write_adapter(allowed / d, TINY["llama"], spec)
    write_adapter(outside / "secret", TINY["llama"], AdapterSpec(rank=2, alpha=4, seed=8))
    tls_args = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-ca", str(pki["ca"])]
    common = [*tls_args, "--auth-file", str(auth_file)]
    probe = security(pki, None)
    started: list[Service] = []

    def start(service: Service) -> Service:
        started.append(service)
        return service.start()

    try:
        registry = start(Service("registry", "--data-dir", str(root / "reg"), "--allow-local-dir",
                                 str(allowed), *common, log_path=root / "registry.log", security=probe))
        executor = start(Service("executor", "--registry", registry.address, "--base-model",
                                 str(llama_dir), "--disk-cache-dir", str(root / "disk"), "--token",
                                 TOKENS["service"], *common, log_path=root / "executor.log",
                                 security=probe))
        routers = [start(Service("router", "--registry", registry.address, "--executor",
                                 executor.address, "--poll-interval-s", "0.2", "--token",
                                 TOKENS["service"], *common, *extra, log_path=root / f"router{i}.log",
                                 security=probe))
                   for i, extra in enumerate([[], ["--tenant-rate", "2", "--tenant-burst", "3",
                                                   "--tenant-max-concurrent", "1"]])]
        gateway = Service("gateway", "--router", routers[0].address, "--registry", registry.address,
                          "--token", TOKENS["service"], "--models-cache-s", "0", *tls_args,
                          port=free_port(), log_path=root / "gateway.log", https=_ssl(pki))
        started.append(gateway)
        gateway.start(timeout=90)
    except BaseException:                 # a server that did not start: stop the ones that did
        for s in reversed(started):
            s.stop()
        raise
    d = {"registry": registry, "executor": executor, "router": routers[0], "limited": routers[1],
         "gateway": gateway, "root": root, "allowed": allowed, "outside": outside,
         "auth_file": auth_file, "pki": pki}
    try:
        admin = stubs(d, "admin")
        for aid, src in (("a/x", "x"), ("b/y", "y")):
            admin["registry"].RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                adapter_id=aid, source=f"file://{allowed / src}"), timeout=60)
        admin["executor"].LoadAdapter(executor_pb2.LoadAdapterRequest(adapter_id="b/y"), timeout=120)
        yield d
    finally:
        for s in reversed(started):
            s.stop()


def _ssl(pki, client_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if client_cert:
        ctx.load_cert_chain(str(pki["cert"]), str(pki["key"]))
    return ctx


def https(gateway: Service, pki, method: str, path: str, body=None, token: str | None = None,
          client_cert: bool = True):
    """(status, parsed JSON or text) of one HTTPS request to the gateway (mutual TLS)."""
    conn = http.client.HTTPSConnection("127.0.0.1", gateway.port, timeout=60, context=_ssl(pki, client_cert))
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
        r = conn.getresponse()
        text = r.read().decode()
    finally:
        conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def gateway_routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route in the gateway's Starlette app."""
    from starlette.routing import Route

    from services.gateway.app import Gateway, build_app
    from services.gateway.config import GatewayConfig

    async def routes():
        gw = Gateway(GatewayConfig(router="127.0.0.1:1", registry="127.0.0.1:1"))
        try:
            app = build_app(gw)
            others = [r for r in app.routes if not isinstance(r, Route)]
            assert not others, f"a mount or websocket route: enumerate it here too: {others}"
            return {(m, r.path) for r in app.routes for m in (r.methods or ()) if m != "HEAD"}
        finally:
            await gw.close()
    return asyncio.run(routes())


# answered to anyone: probes and metrics hold no tenant's data
OPEN_ROUTES = {("GET", "/health"), ("GET", "/health/ready"), ("GET", "/metrics"),
               # the base model's tokenizer and the version: the same for every model and caller
               ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info"), ("GET", "/version")}


def http_attacks(d, token: str) -> dict:
    """Tenant A (`token`) against tenant B's adapter b/y, one entry per gateway route ->
    a call returning (status, body)."""
    g, pki = d["gateway"], d["pki"]

    def call(method, path, body=None):
        return lambda: https(g, pki, method, path, body, token)
    return {
        ("POST", "/v1/completions"): call("POST", "/v1/completions",
                                          {"model": "b/y", "prompt": [5, 17, 42], "max_tokens": 1}),
        ("POST", "/v1/chat/completions"): call("POST", "/v1/chat/completions", {
            "model": "b/y", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
        ("GET", "/v1/models"): call("GET", "/v1/models"),
        ("GET", "/v1/models/{model:path}"): call("GET", "/v1/models/b/y"),
        ("POST", "/v1/load_lora_adapter"): call("POST", "/v1/load_lora_adapter", {
            "lora_name": "b/y", "lora_path": str(d["allowed"] / "own")}),
        ("POST", "/v1/unload_lora_adapter"): call("POST", "/v1/unload_lora_adapter", {"lora_name": "b/y"}),
        ("GET", "/health"): call("GET", "/health"),
        ("GET", "/health/ready"): call("GET", "/health/ready"),
        ("POST", "/tokenize"): call("POST", "/tokenize", {"model": "b/y", "prompt": "hi"}),
        ("POST", "/detokenize"): call("POST", "/detokenize", {"model": "b/y", "tokens": [5, 6]}),
        ("GET", "/tokenizer_info"): call("GET", "/tokenizer_info"),
        ("GET", "/version"): call("GET", "/version"),
        ("GET", "/metrics"): call("GET", "/metrics"),
    }


def stubs(d, who, client_cert=True):
    sec = security(d["pki"], who, client_cert)
    return {"registry": registry_pb2_grpc.AdapterRegistryStub(channel(d["registry"].address, sec)),
            "executor": executor_pb2_grpc.ExecutorStub(channel(d["executor"].address, sec)),
            "router": router_pb2_grpc.RouterStub(channel(d["router"].address, sec)),
            "limited": router_pb2_grpc.RouterStub(channel(d["limited"].address, sec))}


def code_of(fn) -> grpc.StatusCode:
    try:
        result = fn()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return C.OK


def gen(adapter="", n=2):
    return common_pb2.GenerateRequest(adapter_id=adapter, prompt_token_ids=PROMPT,
                                      sampling=common_pb2.SamplingParams(max_new_tokens=n, ignore_eos=True))


def upload(adapter_id: str, src):
    yield registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(adapter_id=adapter_id))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        yield registry_pb2.UploadAdapterRequest(chunk=registry_pb2.FileChunk(
            file_name=name, data=(src / name).read_bytes()))


def _ids(adapters) -> set[str]:
    return {a.adapter_id for a in adapters}


def attacks(s, d) -> dict:
    """Tenant A against tenant B's adapter b/y, one entry per RPC -> (call, expected check)."""
    R, E = registry_pb2, executor_pb2
    return {
        "/openlora.v1.AdapterRegistry/RegisterAdapter": lambda: s["registry"].RegisterAdapter(
            R.RegisterAdapterRequest(adapter_id="b/y", source=f"file://{d['allowed'] / 'own'}"), timeout=30),
        "/openlora.v1.AdapterRegistry/UploadAdapter": lambda: s["registry"].UploadAdapter(
            upload("b/y", d["allowed"] / "own"), timeout=30),
        "/openlora.v1.AdapterRegistry/GetAdapter": lambda: s["registry"].GetAdapter(
            R.GetAdapterRequest(adapter_id="b/y"), timeout=10),
        "/openlora.v1.AdapterRegistry/ListAdapters": lambda: _no_b(_ids(
            s["registry"].ListAdapters(R.ListAdaptersRequest(), timeout=10).adapters)),
        "/openlora.v1.AdapterRegistry/DeleteAdapter": lambda: s["registry"].DeleteAdapter(
            R.DeleteAdapterRequest(adapter_id="b/y"), timeout=10),
        "/openlora.v1.AdapterRegistry/FetchAdapter": lambda: s["registry"].FetchAdapter(
            R.FetchAdapterRequest(adapter_id="b/y"), timeout=10),
        "/openlora.v1.AdapterRegistry/WatchAdapters": lambda: _first(s["registry"].WatchAdapters(
            R.WatchAdaptersRequest(), timeout=3)),
        "/openlora.v1.Executor/Generate": lambda: s["executor"].Generate(gen("b/y"), timeout=30),
        "/openlora.v1.Executor/GenerateStream": lambda: s["executor"].GenerateStream(gen("b/y"), timeout=30),
        "/openlora.v1.Executor/LoadAdapter": lambda: s["executor"].LoadAdapter(
            E.LoadAdapterRequest(adapter_id="b/y"), timeout=30),
        "/openlora.v1.Executor/UnloadAdapter": lambda: s["executor"].UnloadAdapter(
            E.UnloadAdapterRequest(adapter_id="b/y"), timeout=30),
        "/openlora.v1.Executor/GenerateStreams": lambda: list(s["executor"].GenerateStreams(iter([
            common_pb2.GenerateStreamsRequest(stream_id=1, open=gen("b/y"))]), timeout=30)),
        "/openlora.v1.Executor/GetStatus": lambda: _no_b(_ids(
            s["executor"].GetStatus(E.GetStatusRequest(), timeout=10).adapters)),
        "/openlora.v1.Router/Generate": lambda: s["router"].Generate(gen("b/y"), timeout=30),
        "/openlora.v1.Router/GenerateStream": lambda: s["router"].GenerateStream(gen("b/y"), timeout=30),
        "/openlora.v1.Router/GenerateStreams": lambda: list(s["router"].GenerateStreams(iter([
            common_pb2.GenerateStreamsRequest(stream_id=1, open=gen("b/y"))]), timeout=30)),
        "/openlora.v1.Router/ListExecutors": lambda: _no_b({a.adapter_id for e in s["router"].ListExecutors(
            router_pb2.ListExecutorsRequest(), timeout=10).executors for a in e.status.adapters}),
    }


def _no_b(ids: set[str]) -> None:
    assert not any(i.startswith("b/") for i in ids), ids


def _first(stream):
    for _ in stream:
        break


def test_tenant_a_cannot_touch_tenant_b_by_any_rpc(dep):
    a, admin = stubs(dep, "a"), stubs(dep, "admin")
    before = admin["registry"].GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="b/y"), timeout=10)
    table = attacks(a, dep)
    assert set(table) == set(all_methods()), "every RPC needs an entry here (and a check in its servicer)"
    got = {m: code_of(call) for m, call in table.items()}
    allowed = {C.NOT_FOUND, C.PERMISSION_DENIED, C.OK}   # OK only where the reply was checked to hide b/
    assert {m: c for m, c in got.items() if c not in allowed} == {}
    for m in ("GetAdapter", "DeleteAdapter"):
        assert got[f"/openlora.v1.AdapterRegistry/{m}"] == C.NOT_FOUND
    for m in ("Generate", "GenerateStream", "LoadAdapter", "UnloadAdapter"):
        assert got[f"/openlora.v1.Executor/{m}"] == C.NOT_FOUND
    for m in ("Generate", "GenerateStream"):
        assert got[f"/openlora.v1.Router/{m}"] == C.NOT_FOUND
    for m in ("RegisterAdapter", "UploadAdapter", "FetchAdapter", "WatchAdapters"):
        assert got[f"/openlora.v1.AdapterRegistry/{m}"] == C.PERMISSION_DENIED
    after = admin["registry"].GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="b/y"), timeout=10)
    assert (after.version, after.digest) == (before.version, before.digest)
    resident = admin["executor"].GetStatus(executor_pb2.GetStatusRequest(), timeout=10).adapters
    assert "b/y" in _ids(resident)
    # a NOT_FOUND for b/y says exactly what an unknown id gets: nothing leaks through the message
    unknown = _details(lambda: a["registry"].GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="b/zz")))
    hidden = _details(lambda: a["registry"].GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="b/y")))
    assert unknown.replace("b/zz", "ID") == hidden.replace("b/y", "ID")


def test_tenant_a_cannot_touch_tenant_b_by_any_http_route(dep):
    """The gateway over HTTPS (mutual TLS): every route of its app, as tenant A against b/y."""
    table = http_attacks(dep, TOKENS["a"])
    assert set(table) == gateway_routes(), "every gateway route needs an entry here (and a check)"
    got = {route: call() for route, call in table.items()}
    for route in OPEN_ROUTES:
        status, body = got[route]
        assert status == 200 and "b/y" not in json.dumps(body), route
    status, models = got[("GET", "/v1/models")]
    assert status == 200 and not any(m["id"].startswith("b/") for m in models["data"]), models
    for route in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                  ("GET", "/v1/models/{model:path}"), ("POST", "/v1/unload_lora_adapter")):
        status, body = got[route]
        assert status == 404, (route, body)
    assert got[("POST", "/v1/load_lora_adapter")][0] == 403
    admin = stubs(dep, "admin")
    assert admin["registry"].GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="b/y"), timeout=10).version == 1
    assert "b/y" in _ids(admin["executor"].GetStatus(executor_pb2.GetStatusRequest(), timeout=10).adapters)
    # no token, or a wrong one: 401 on every route but the open ones
    for token in (None, "not-a-token"):
        for route, call in http_attacks(dep, token).items():
            status, body = call()
            assert status == (200 if route in OPEN_ROUTES else 401), (route, token, status, body)
    # TLS: a client without a certificate, or a plaintext one, gets no answer at all
    with pytest.raises((ssl.SSLError, OSError)):
        https(dep["gateway"], dep["pki"], "GET", "/v1/models", token=TOKENS["admin"], client_cert=False)
    conn = http.client.HTTPConnection("127.0.0.1", dep["gateway"].port, timeout=10)
    with pytest.raises(OSError):
        conn.request("GET", "/health")
        conn.getresponse().read()
    conn.close()


def test_public_adapters(dep):
    """A public adapter: every tenant lists, reads and runs it (router, executor, gateway); only its
    owner (or an admin) changes, deletes or unloads it; the weights stay service/admin only."""
    R, E = registry_pb2, executor_pb2
    a, b = stubs(dep, "a"), stubs(dep, "b")
    src, other = f"file://{dep['allowed'] / 'y'}", f"file://{dep['allowed'] / 'own'}"
    g, pki = dep["gateway"], dep["pki"]
    pub = b["registry"].RegisterAdapter(R.RegisterAdapterRequest(adapter_id="b/pub", source=src,
                                                                 public=True), timeout=60)
    assert pub.public
    try:
        ids = _ids(a["registry"].ListAdapters(R.ListAdaptersRequest(), timeout=10).adapters)
        assert "b/pub" in ids and "b/y" not in ids
        assert a["registry"].GetAdapter(R.GetAdapterRequest(adapter_id="b/pub"), timeout=10).public
        assert len(a["router"].Generate(gen("b/pub", 2), timeout=120).token_ids) == 2
        assert code_of(lambda: a["router"].GenerateStream(gen("b/pub", 2), timeout=120)) == C.OK
        assert len(a["executor"].Generate(gen("b/pub", 2), timeout=120).token_ids) == 2
        assert code_of(lambda: a["executor"].LoadAdapter(E.LoadAdapterRequest(adapter_id="b/pub"),
                                                         timeout=60)) == C.OK
        status, models = https(g, pki, "GET", "/v1/models", token=TOKENS["a"])
        assert status == 200 and "b/pub" in {m["id"] for m in models["data"]}
        assert https(g, pki, "GET", "/v1/models/b/pub", token=TOKENS["a"])[0] == 200
        status, body = https(g, pki, "POST", "/v1/completions", {"model": "b/pub", "prompt": [5, 17, 42],
                                                                 "max_tokens": 2, "ignore_eos": True}, TOKENS["a"])
        assert status == 200 and body["usage"]["completion_tokens"] == 2, body
        denied = {
            "register": lambda: a["registry"].RegisterAdapter(R.RegisterAdapterRequest(
                adapter_id="b/pub", source=other), timeout=30),
            "make private": lambda: a["registry"].RegisterAdapter(R.RegisterAdapterRequest(
                adapter_id="b/pub", source=src, public=False), timeout=30),
            "upload": lambda: a["registry"].UploadAdapter(upload("b/pub", dep["allowed"] / "own"), timeout=30),
            "delete": lambda: a["registry"].DeleteAdapter(R.DeleteAdapterRequest(adapter_id="b/pub"), timeout=10),
            "fetch": lambda: a["registry"].FetchAdapter(R.FetchAdapterRequest(adapter_id="b/pub"), timeout=10),
            "unload": lambda: a["executor"].UnloadAdapter(E.UnloadAdapterRequest(adapter_id="b/pub"),
                                                          timeout=30),
        }
        assert {k: code_of(f) for k, f in denied.items()} == {k: C.PERMISSION_DENIED for k in denied}
        assert https(g, pki, "POST", "/v1/unload_lora_adapter", {"lora_name": "b/pub"}, TOKENS["a"])[0] == 403
        after = b["registry"].GetAdapter(R.GetAdapterRequest(adapter_id="b/pub"), timeout=10)
        assert (after.version, after.digest, after.public) == (pub.version, pub.digest, True)
        # private again: NOT_FOUND for a everywhere (router and executor remember a public answer
        # for a few seconds at most)
        b["registry"].RegisterAdapter(R.RegisterAdapterRequest(adapter_id="b/pub", source=src,
                                                               public=False), timeout=60)
        assert code_of(lambda: a["registry"].GetAdapter(R.GetAdapterRequest(adapter_id="b/pub"),
                                                        timeout=10)) == C.NOT_FOUND
        assert "b/pub" not in _ids(a["registry"].ListAdapters(R.ListAdaptersRequest(), timeout=10).adapters)
        for stub in (a["router"], a["executor"]):
            deadline = time.monotonic() + 30
            while code_of(lambda: stub.Generate(gen("b/pub", 1), timeout=60)) != C.NOT_FOUND:  # noqa: B023
                assert time.monotonic() < deadline, "a private adapter still runs for another tenant"
                time.sleep(0.5)
        assert len(b["router"].Generate(gen("b/pub", 1), timeout=120).token_ids) == 1   # its owner
    finally:
        b["registry"].DeleteAdapter(R.DeleteAdapterRequest(adapter_id="b/pub"), timeout=10)


def _details(fn) -> str:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.details()


def _generic_call(ch: grpc.Channel, path: str, m, metadata):
    """Call RPC `path` with an empty request, whatever its kind; returns the reply (or stream)."""
    cls = message_factory.GetMessageClass(m.input_type)
    out = message_factory.GetMessageClass(m.output_type)
    kind = ("stream" if m.client_streaming else "unary") + "_" + ("stream" if m.server_streaming else "unary")
    fn = getattr(ch, kind)(path, request_serializer=cls.SerializeToString,
                           response_deserializer=out.FromString)
    return fn(iter([cls()]) if m.client_streaming else cls(), timeout=10, metadata=metadata)


@pytest.mark.parametrize("who", [None, "wrong", "malformed", "expired"])
def test_every_rpc_refuses_a_caller_without_a_valid_token(dep, who):
    addresses = {"openlora.v1.AdapterRegistry": dep["registry"].address,
                 "openlora.v1.Executor": dep["executor"].address,
                 "openlora.v1.Router": dep["router"].address}
    metadata = {None: (), "wrong": (("authorization", "Bearer not-a-token"),),
                "malformed": (("authorization", TOKENS["admin"]),),
                "expired": (("authorization", "Bearer expired-tok"),)}[who]
    for path, m in all_methods().items():
        with channel(addresses[path.split("/")[1]], security(dep["pki"], None)) as ch:
            code = code_of(lambda: _generic_call(ch, path, m, metadata))  # noqa: B023
            assert code == C.UNAUTHENTICATED, path
    if who == "expired":
        with channel(dep["registry"].address, security(dep["pki"], None)) as ch:
            assert "expired" in _details(lambda: list(_generic_call(
                ch, "/openlora.v1.AdapterRegistry/GetAdapter",
                all_methods()["/openlora.v1.AdapterRegistry/GetAdapter"], metadata)))


def test_health_answers_without_a_token(dep):
    from tests.servers import health
    for s in (dep["registry"], dep["executor"], dep["router"]):
        assert health(s.address, security=security(dep["pki"], None)) == 1   # SERVING


def test_roles(dep):
    R, E = registry_pb2, executor_pb2
    a, svc, admin = stubs(dep, "a"), stubs(dep, "service"), stubs(dep, "admin")
    # tenant: its own namespace, through the whole TLS chain (router -> executor -> registry)
    own = a["registry"].RegisterAdapter(R.RegisterAdapterRequest(
        adapter_id="a/own", source=f"file://{dep['allowed'] / 'own'}"), timeout=60)
    assert own.version == 1
    assert a["registry"].UploadAdapter(upload("a/up", dep["allowed"] / "x"), timeout=60).version == 1
    assert _ids(a["registry"].ListAdapters(R.ListAdaptersRequest(), timeout=10).adapters) == \
        {"a/x", "a/own", "a/up"}
    r = a["router"].Generate(gen("a/x", 3), timeout=120)
    assert len(r.token_ids) == 3
    assert len(a["router"].Generate(gen("", 2), timeout=60).token_ids) == 2        # the base model
    assert code_of(lambda: a["registry"].FetchAdapter(R.FetchAdapterRequest(adapter_id="a/x"),
                                                      timeout=10)) == C.PERMISSION_DENIED
    assert _ids(a["executor"].GetStatus(E.GetStatusRequest(), timeout=10).adapters) <= {"a/x", "a/own", "a/up"}
    assert code_of(lambda: a["registry"].DeleteAdapter(R.DeleteAdapterRequest(adapter_id="a/up"),
                                                       timeout=10)) == C.OK
    # service: reads and fetches everything, writes nothing
    assert {"a/x", "b/y"} <= _ids(svc["registry"].ListAdapters(R.ListAdaptersRequest(), timeout=10).adapters)
    assert code_of(lambda: svc["registry"].FetchAdapter(R.FetchAdapterRequest(adapter_id="b/y"),
                                                        timeout=10)) == C.OK
    for call in (lambda: svc["registry"].RegisterAdapter(R.RegisterAdapterRequest(
                     adapter_id="b/new", source=f"file://{dep['allowed'] / 'y'}"), timeout=10),
                 lambda: svc["registry"].UploadAdapter(upload("b/new", dep["allowed"] / "y"), timeout=10),
                 lambda: svc["registry"].DeleteAdapter(R.DeleteAdapterRequest(adapter_id="b/y"), timeout=10)):
        assert code_of(call) == C.PERMISSION_DENIED
    # admin: every tenant's adapters
    assert {"a/x", "b/y", "a/own"} <= _ids(admin["registry"].ListAdapters(R.ListAdaptersRequest(),
                                                                           timeout=10).adapters)
    assert len(admin["router"].Generate(gen("b/y", 2), timeout=120).token_ids) == 2
    b = stubs(dep, "b")
    assert len(b["router"].Generate(gen("b/y", 2), timeout=120).token_ids) == 2


def test_file_sources_stay_inside_allowed_dirs(dep):
    a, admin = stubs(dep, "a"), stubs(dep, "admin")
    allowed, outside = dep["allowed"], dep["outside"]
    (allowed / "link").symlink_to(outside / "secret", target_is_directory=True)
    mixed = allowed / "mixed"
    mixed.mkdir()
    (mixed / "adapter_config.json").write_bytes((outside / "secret" / "adapter_config.json").read_bytes())
    (mixed / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    for uri in (f"file://{allowed}/../outside/secret", f"file://{allowed}/%2e%2e/outside/secret",
                f"file://{allowed / 'link'}", f"file://{mixed}", "file:///etc", f"file://{outside}/secret"):
        for s in (a, admin):      # with --allow-local-dir, admins are bounded too
            def call(s=s, uri=uri):
                return s["registry"].RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                    adapter_id="a/evil", source=uri), timeout=30)
            assert code_of(call) == C.PERMISSION_DENIED, uri
    assert code_of(lambda: admin["registry"].GetAdapter(
        registry_pb2.GetAdapterRequest(adapter_id="a/evil"), timeout=10)) == C.NOT_FOUND


def test_token_file_is_reloaded_on_change(dep):
    path = dep["auth_file"]
    c = stubs(dep, None)
    md = (("authorization", "Bearer tenant-c-new"),)
    req = registry_pb2.ListAdaptersRequest()
    assert code_of(lambda: c["registry"].ListAdapters(req, timeout=10, metadata=md)) == C.UNAUTHENTICATED
    doc = json.loads(path.read_text())
    doc["tokens"].append({"token": "tenant-c-new", "tenant": "c", "role": "tenant"})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    deadline = time.monotonic() + 10
    while code_of(lambda: c["registry"].ListAdapters(req, timeout=10, metadata=md)) != C.OK:
        assert time.monotonic() < deadline, "the new token was not picked up"
        time.sleep(0.2)
    assert c["registry"].ListAdapters(req, timeout=10, metadata=md).adapters == []


def test_limits_per_tenant(dep):
    a, b = stubs(dep, "a"), stubs(dep, "b")
    stream = a["limited"].GenerateStream(gen("a/x", 200), timeout=120)
    next(stream)                                   # one request in flight for tenant a
    with pytest.raises(grpc.RpcError) as e:
        a["limited"].Generate(gen("a/x", 1), timeout=30)
    assert e.value.code() == C.RESOURCE_EXHAUSTED and "in flight" in e.value.details()
    assert len(b["limited"].Generate(gen("b/y", 1), timeout=60).token_ids) == 1   # b is not a
    stream.cancel()
    time.sleep(0.5)
    codes = []
    for _ in range(6):
        try:
            a["limited"].Generate(gen("", 1), timeout=30)
            codes.append(C.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            if exc.code() == C.RESOURCE_EXHAUSTED:
                hint = dict(exc.trailing_metadata())
                assert int(hint["retry-after-ms"]) > 0 and "retry after" in exc.details()
                break
    assert codes[-1] == C.RESOURCE_EXHAUSTED and codes[0] == C.OK, codes


def test_tls_refuses_plaintext_and_strangers(dep):
    pki = dep["pki"]
    req = registry_pb2.ListAdaptersRequest()
    md = (("authorization", f"Bearer {TOKENS['admin']}"),)
    with grpc.insecure_channel(dep["registry"].address) as ch:       # plaintext client
        assert code_of(lambda: registry_pb2_grpc.AdapterRegistryStub(ch).ListAdapters(
            req, timeout=5, metadata=md)) == C.UNAVAILABLE
    no_cert = stubs(dep, "admin", client_cert=False)                 # TLS, but no client certificate
    assert code_of(lambda: no_cert["registry"].ListAdapters(req, timeout=5)) == C.UNAVAILABLE
    stranger = ClientSecurity(token=TOKENS["admin"], ca=pki["ca"].read_bytes(),
                              cert=pki["other_cert"].read_bytes(), key=pki["other_key"].read_bytes())
    with channel(dep["router"].address, stranger) as ch:            # a certificate from another CA
        assert code_of(lambda: router_pb2_grpc.RouterStub(ch).ListExecutors(
            router_pb2.ListExecutorsRequest(), timeout=5)) == C.UNAVAILABLE


def test_server_only_tls_and_the_cli(dep, tmp_path):
    pki = dep["pki"]
    reg = Service("registry", "--data-dir", str(tmp_path / "reg"), "--tls-cert", str(pki["cert"]),
                  "--tls-key", str(pki["key"]), log_path=tmp_path / "reg.log",
                  security=ClientSecurity(ca=pki["ca"].read_bytes())).start()
    try:
        with channel(reg.address, ClientSecurity(ca=pki["ca"].read_bytes())) as ch:   # no client cert
            assert registry_pb2_grpc.AdapterRegistryStub(ch).ListAdapters(
                registry_pb2.ListAdaptersRequest(), timeout=10).adapters == []
        with grpc.insecure_channel(reg.address) as ch:
            assert code_of(lambda: registry_pb2_grpc.AdapterRegistryStub(ch).ListAdapters(
                registry_pb2.ListAdaptersRequest(), timeout=5)) == C.UNAVAILABLE
    finally:
        reg.stop()
    # the CLI as a mutual-TLS client with a tenant token sees that tenant's adapters only
    out = subprocess.run([sys.executable, "-m", "services.cli", "adapters", "list", "--json",
                          "--registry", dep["registry"].address, "--token", TOKENS["b"],
                          "--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["cert"]),
                          "--tls-key", str(pki["key"])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {a["adapter_id"] for a in json.loads(out.stdout)} == {"b/y"}
    out = subprocess.run([sys.executable, "-m", "services.cli", "adapters", "list",
                          "--registry", dep["registry"].address, "--tls-ca", str(pki["ca"]),
                          "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "OPENLORA_TOKEN": ""})
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr


def test_a_multiplexed_request_is_checked_as_its_own_caller(dep):
    """GenerateStreams (a router's call, service role) runs each request as the caller its
    `authorization` names: tenant a's request for b's private adapter ends NOT_FOUND, as a's own
    GenerateStream would, while b's own request on the same call streams; a bad token, or none, ends
    only its request, UNAUTHENTICATED (a request never borrows the call's service token); a tenant
    may not open the call at all."""
    svc = stubs(dep, "service")["executor"]
    opens = [common_pb2.GenerateStreamsRequest(stream_id=i, open=gen(adapter),
                                               authorization=f"Bearer {token}" if token else "")
             for i, (adapter, token) in enumerate([("b/y", TOKENS["a"]), ("b/y", TOKENS["b"]),
                                                    ("", "not-a-token"), ("", "")], start=1)]
    ends, chunks = {}, {1: 0, 2: 0, 3: 0, 4: 0}
    for response in svc.GenerateStreams(iter(opens), timeout=60):
        for ev in response.events:
            if ev.end:
                ends[ev.stream_id] = (C(next(c for c in C if c.value[0] == ev.code)) if ev.code else C.OK)
            else:
                chunks[ev.stream_id] += len(ev.chunk.token_ids)
    assert ends == {1: C.NOT_FOUND, 2: C.OK, 3: C.UNAUTHENTICATED, 4: C.UNAUTHENTICATED}
    assert chunks == {1: 0, 2: 2, 3: 0, 4: 0}
    assert code_of(lambda: list(stubs(dep, "b")["executor"].GenerateStreams(iter(opens[1:2]), timeout=30))) \
        == C.PERMISSION_DENIED
