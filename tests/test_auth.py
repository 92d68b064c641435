"""Auth building blocks without servers: the token file, roles per RPC, file:// bounds, tenant limits."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from services.common import auth
from services.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from services.common.gen.openlora.v1 import executor_pb2, registry_pb2, router_pb2
from services.registry.sources.file import FileSource
from services.router.limits import RateLimited, TenantLimits


def _as(ident: auth.Identity):
    """Run the rest of a test as `ident` (the interceptor does this per RPC)."""
    return auth._current.set(ident)


def test_every_rpc_has_a_policy():
    methods = {f"/{svc.full_name}/{m.name}"
               for mod in (registry_pb2, executor_pb2, router_pb2)
               for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods}
    assert methods == set(auth.POLICY), "add the new RPC to auth.POLICY (and check adapters in its servicer)"


def test_token_file_parsing():
    table = auth.parse_tokens(json.dumps({"tokens": [
        {"token_sha256": auth.hash_token("s3cret").upper(), "tenant": "acme", "role": "tenant"},
        {"token": "plain", "tenant": "", "role": "admin", "expires_at": "2099-01-01T00:00:00Z"}]}), "f")
    assert table[auth.hash_token("s3cret")] == auth.Identity("acme", "tenant")
    assert table[auth.hash_token("plain")].role == "admin"
    for bad in ("[]", "{}", '{"tokens": [1]}', '{"tokens": [{"token": "x", "role": "root"}]}',
                '{"tokens": [{"token": "x", "role": "tenant"}]}',
                '{"tokens": [{"token": "x", "role": "tenant", "tenant": "a/b"}]}',
                '{"tokens": [{"token_sha256": "abc", "role": "admin"}]}',
                '{"tokens": [{"role": "admin"}]}',
                '{"tokens": [{"token": "x", "role": "admin", "expires_at": "soon"}]}', "{"):
        with pytest.raises(InvalidArgument):
            auth.parse_tokens(bad, "f")


def test_token_table_identifies_and_reloads(tmp_path, monkeypatch):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"token": "t1", "tenant": "a", "role": "tenant"},
                                           {"token": "old", "role": "admin", "expires_at": 1}]}))
    table = auth.TokenTable(str(path))
    assert table.identify("Bearer t1") == auth.Identity("a", "tenant")
    for header, says in ((None, "no token"), ("t1", "malformed"), ("Basic t1", "malformed"),
                         ("Bearer nope", "unknown token"), ("Bearer old", "expired")):
        with pytest.raises(Unauthenticated, match=says):
            table.identify(header)
    monkeypatch.setattr(auth.TokenTable, "RECHECK_S", 0.0)
    path.write_text(json.dumps({"tokens": [{"token": "t2", "tenant": "b", "role": "tenant"}]}))
    os.utime(path, ns=(1, 10**18))                        # a new mtime whatever the clock's resolution
    assert table.identify("Bearer t2") == auth.Identity("b", "tenant")
    with pytest.raises(Unauthenticated):
        table.identify("Bearer t1")                       # revoked
    path.write_text("{ broken")                           # a bad edit keeps the last good table
    os.utime(path, ns=(2, 2 * 10**18))
    assert table.identify("Bearer t2").tenant == "b"
    with pytest.raises(InvalidArgument, match="--auth-file"):
        auth.TokenTable(str(tmp_path / "missing.json"))


def test_roles_and_ownership():
    tenant, service = auth.Identity("a", "tenant"), auth.Identity("", "service")
    auth.check_role("/openlora.v1.Router/Generate", tenant)
    with pytest.raises(PermissionDenied):
        auth.check_role("/openlora.v1.AdapterRegistry/FetchAdapter", tenant)
    with pytest.raises(PermissionDenied):
        auth.check_role("/openlora.v1.AdapterRegistry/DeleteAdapter", service)
    with pytest.raises(PermissionDenied, match="no access policy"):
        auth.check_role("/openlora.v1.Registry/NewThing", service)
    auth.check_role("/openlora.v1.Registry/NewThing", auth.Identity("", "admin"))
    token = _as(tenant)
    try:
        assert auth.require_adapter("a/sql") is tenant
        auth.require_adapter("")                          # the base model
        with pytest.raises(NotFound, match="no adapter 'b/sql'"):
            auth.require_adapter("b/sql")
        with pytest.raises(NotFound):
            auth.require_adapter("ab/sql")                # a prefix of the name is not the tenant
        with pytest.raises(PermissionDenied, match="only create adapters under 'a/'"):
            auth.require_adapter("b/sql", create=True)
        with pytest.raises(InvalidArgument):
            auth.require_adapter("../a/x")
    finally:
        auth._current.reset(token)


def _adapter_dir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def test_file_source_bounds(tmp_path):
    inside = _adapter_dir(tmp_path / "allowed" / "ok")
    outside = _adapter_dir(tmp_path / "outside")
    (tmp_path / "allowed" / "esc").symlink_to(outside)
    bounded, unbounded = FileSource([tmp_path / "allowed"]), FileSource()
    for ident in (auth.Identity("a", "tenant"), auth.Identity("", "admin")):
        token = _as(ident)
        try:
            assert bounded.fetch(f"file://{inside}", tmp_path)["adapter_config.json"].parent == inside
            for uri in (f"file://{outside}", f"file://{inside}/../../outside",
                        f"file://{tmp_path}/allowed/esc"):
                with pytest.raises(PermissionDenied):
                    bounded.fetch(uri, tmp_path)
            if ident.role == "tenant":                    # no --allow-local-dir: no tenant reads disk
                with pytest.raises(PermissionDenied, match="--allow-local-dir"):
                    unbounded.fetch(f"file://{inside}", tmp_path)
            else:
                assert unbounded.fetch(f"file://{outside}", tmp_path)
        finally:
            auth._current.reset(token)


def test_tenant_limits():
    now = [0.0]
    limits = TenantLimits(rate_per_s=2, burst=2, max_concurrent=2, clock=lambda: now[0])
    for _ in range(2):
        limits.acquire("a")
        limits.release("a")
    with pytest.raises(RateLimited) as e:
        limits.acquire("a")
    assert e.value.retry_after_s == pytest.approx(0.5)
    limits.acquire("b")                                   # another tenant has its own bucket
    now[0] = 1.0
    limits.acquire("a")
    limits.acquire("a")
    now[0] = 10.0
    with pytest.raises(RateLimited, match="in flight"):
        limits.acquire("a")
    limits.release("a")
    with limits.admit("a"):
        pass
    assert not TenantLimits().enabled
