"""Per-tenant credentials for hf:// and s3:// sources (the auth file's "tenants").

A real S3 endpoint that checks credentials: moto's server in a subprocess with IAM enforced
(INITIAL_NO_AUTH_ACTION_COUNT: the set-up requests pass, every later one is checked), two IAM users
each allowed one bucket. Tenant a's imports use a's keys only, b's use b's, a tenant with none goes
anonymous, and the registry's own AWS_*/HF_TOKEN are never lent to a tenant. The Hub is the fake one
of test_registry_api, with repos private to one token.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import grpc
import pytest

from services.common import auth
from services.common.errors import InvalidArgument
from services.common.gen.openlora.v1 import registry_pb2 as pb
from tests.servers import free_port
from tests.test_registry_api import FakeHub, RunningRegistry, expected_digest, files_of

TOKENS = {"a": "tok-a", "b": "tok-b", "c": "tok-c", "admin": "tok-admin"}
SETUP_ACTIONS = 12          # the requests iam_s3 makes before IAM is enforced (see below)


def md(who: str):
    return (("authorization", f"Bearer {TOKENS[who]}"),)


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """moto with IAM on: users a and b, each with a key pair allowed to read bucket-a / bucket-b only,
    and a PEFT adapter (different per tenant) at s3://bucket-<t>/ad/."""
    import boto3

    from services.synthetic import AdapterSpec, write_adapter
    from tests.conftest import TINY
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:                        # a TCP connect only: an HTTP probe would count as an action
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "moto server did not start"
                time.sleep(0.2)
        setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        iam, s3 = boto3.client("iam", **setup), boto3.client("s3", **setup)
        keys, dirs = {}, {}
        root = tmp_path_factory.mktemp("tenant-s3")
        for i, t in enumerate(("a", "b")):                    # 6 actions per tenant
            iam.create_user(UserName=t)
            k = iam.create_access_key(UserName=t)["AccessKey"]
            keys[t] = (k["AccessKeyId"], k["SecretAccessKey"])
            iam.put_user_policy(UserName=t, PolicyName="read-own-bucket", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:Head*",
                                                                                     "s3:List*"],
                                                        "Resource": [f"arn:aws:s3:::bucket-{t}",
                                                                     f"arn:aws:s3:::bucket-{t}/*"]}]}))
            s3.create_bucket(Bucket=f"bucket-{t}")
            dirs[t] = write_adapter(root / t, TINY["llama"], AdapterSpec(rank=2, alpha=4, seed=40 + i))
            for name, data in files_of(dirs[t]).items():
                s3.put_object(Bucket=f"bucket-{t}", Key=f"ad/{name}", Body=data)
        # IAM is on from here: the set-up keys are refused
        with pytest.raises(Exception, match="InvalidClientTokenId|InvalidAccessKeyId|not exist"):
            s3.get_object(Bucket="bucket-a", Key="ad/adapter_config.json")
        yield {"endpoint": endpoint, "keys": keys, "dirs": dirs}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import http.server
    import threading

    class TenantHub(FakeHub):
        """FakeHub whose repos may be private to one bearer token (others: 404, as the Hub does)."""
        repos, seen, private = {}, [], {}

        def _lookup(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            repo = "/".join(parts[:2])
            want = self.private.get(repo)
            if want is not None and self.headers.get("authorization") != f"Bearer {want}":
                self.seen.append((self.command, self.path, self.headers.get("authorization")))
                return None, "RepoNotFound"
            return super()._lookup()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TenantHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_registry_own")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield TenantHub
    server.shutdown()


@pytest.fixture
def registry(tmp_path, iam_s3, monkeypatch):
    ka, kb = iam_s3["keys"]["a"], iam_s3["keys"]["b"]
    ep = iam_s3["endpoint"]
    # the registry's own environment: an S3 identity the IAM endpoint does not know (never lent out)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ep)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "registry-own")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "registry-own-secret")
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({
        "tokens": [{"token": TOKENS[t], "tenant": t, "role": "tenant"} for t in ("a", "b", "c")]
        + [{"token": TOKENS["admin"], "tenant": "ops", "role": "admin"}],
        "tenants": {
            "a": {"hf_token": "hf_tenant_a", "s3_access_key_id": ka[0], "s3_secret_access_key": ka[1],
                  "s3_endpoint_url": ep, "s3_region": "us-east-1"},
            "b": {"hf_token": "hf_tenant_b", "s3_access_key_id": kb[0], "s3_secret_access_key": kb[1],
                  "s3_endpoint_url": ep},
        }}))
    auth_file.chmod(0o600)
    r = RunningRegistry(tmp_path / "data", auth_file=str(auth_file))
    yield r
    r.close()


def _code(fn):
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_each_tenant_imports_from_s3_with_its_own_keys_only(registry, iam_s3):
    s, dirs = registry.stub, iam_s3["dirs"]

    def register(who, aid, bucket):
        return lambda: s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=aid, source=f"s3://{bucket}/ad"),
                                         timeout=60, metadata=md(who))
    got = register("a", "a/from-s3", "bucket-a")()
    assert got.digest == expected_digest(files_of(dirs["a"])) and got.source == "s3://bucket-a/ad"
    got = register("b", "b/from-s3", "bucket-b")()
    assert got.digest == expected_digest(files_of(dirs["b"]))
    # each tenant's keys reach its own bucket only: the other's keys are never used for it
    for who, bucket in (("a", "bucket-b"), ("b", "bucket-a")):
        code, details = _code(register(who, f"{who}/stolen", bucket))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "the tenant's own" in details, details
    # no keys in the auth file: anonymous, not the registry's own AWS_* identity
    code, details = _code(register("c", "c/x", "bucket-a"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "no s3_* keys" in details, details
    # an admin imports with the registry's environment (here an identity the endpoint refuses)
    code, details = _code(register("admin", "a/by-admin", "bucket-a"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "the registry's" in details, details
    ids = {x.adapter_id for x in s.ListAdapters(pb.ListAdaptersRequest(), timeout=10,
                                                metadata=md("admin")).adapters}
    assert ids == {"a/from-s3", "b/from-s3"}


def test_each_tenant_imports_from_hf_with_its_own_token_only(registry, hub, make_adapter):
    files = files_of(make_adapter())
    hub.repos.update({"org-a/private": files, "org-b/private": files, "org/open": files})
    hub.private.update({"org-a/private": "hf_tenant_a", "org-b/private": "hf_tenant_b"})
    s = registry.stub

    def register(who, aid, repo):
        return lambda: s.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=aid, source=f"hf://{repo}"),
                                         timeout=60, metadata=md(who))

    def sent() -> set:
        out = {a for _, p, a in hub.seen if "/resolve/" in p}
        hub.seen.clear()
        return out

    assert register("a", "a/hf", "org-a/private")().digest == expected_digest(files)
    assert sent() == {"Bearer hf_tenant_a"}
    assert register("b", "b/hf", "org-b/private")().digest == expected_digest(files)
    assert sent() == {"Bearer hf_tenant_b"}
    assert _code(register("a", "a/theirs", "org-b/private"))[0] == grpc.StatusCode.NOT_FOUND
    assert sent() == {"Bearer hf_tenant_a"}                         # never b's token
    assert register("c", "c/open", "org/open")().version == 1      # no token: anonymous
    assert sent() == {None}
    assert _code(register("c", "c/private", "org-a/private"))[0] == grpc.StatusCode.NOT_FOUND
    assert sent() == {None}                                         # not the registry's HF_TOKEN
    assert register("admin", "ops/open", "org/open")().version == 1
    assert sent() == {"Bearer hf_registry_own"}                     # admins: the registry's own


def test_tenants_section_of_the_auth_file():
    doc = {"tokens": [], "tenants": {"acme": {"hf_token": "h", "s3_access_key_id": "k",
                                              "s3_secret_access_key": "s"}}}
    tokens, tenants = auth.parse_auth_file(json.dumps(doc), "f")
    assert tokens == {} and tenants["acme"] == auth.SourceCredentials(
        hf_token="h", s3_access_key_id="k", s3_secret_access_key="s")
    assert "s3_secret_access_key" not in repr(tenants["acme"]) and "'h'" not in repr(tenants["acme"])
    for bad in ({"tenants": []}, {"tenants": {"a/b": {}}}, {"tenants": {"a": {"s3_password": "x"}}},
                {"tenants": {"a": {"hf_token": 1}}}, {"tenants": {"a": {"s3_access_key_id": "k"}}},
                {"tenants": {"a": "x"}}):
        with pytest.raises(InvalidArgument):
            auth.parse_auth_file(json.dumps({"tokens": [], **bad}), "f")
