"""Who is calling, and what they may do: bearer tokens, roles, tenants, one policy per RPC.

    table = TokenTable.from_config(config)            # --auth-file / --auth-tokens; None -> open
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), AuthInterceptor(table)])
    ...inside a handler:  require_adapter(adapter_id)  # NotFound for another tenant's adapter

A token file is JSON `{"tokens": [{"token_sha256": HEX, "tenant": NAME, "role": ROLE}]}` (`"token"` in
clear is accepted too, for local use; `"expires_at"`, unix seconds or ISO 8601, is optional); it is re-read when it changes (checked at most once a second),
and a file that no longer parses keeps the previous table (logged). An optional `"tenants"` object
gives each tenant its credentials for hf:// and s3:// sources (see SourceCredentials): the registry
uses a tenant's own, and only its own, when that tenant registers from those sources. Roles:

    admin    everything, every tenant's adapters
    tenant   its own adapters (id's first path segment == its tenant): register, upload, list, get,
             delete, run; and those marked public: list, get, run (changing or deleting one is
             PERMISSION_DENIED); another tenant's private adapter is NOT_FOUND to it
    service  what executors, routers and gateways need: read and fetch every adapter, run, status

Without a token table every call is admin (the open local default, logged loudly at start).
`POLICY` names the roles allowed on every RPC; an RPC missing from it is refused to all but admin.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import re
import threading
import time

import grpc
import structlog

from services.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Upstream
from services.common.peft_format import check_adapter_id

log = structlog.get_logger(__name__)

ROLES = ("admin", "tenant", "service")
_ALL = frozenset(ROLES)
_READ = frozenset(("admin", "service"))
_WRITE = frozenset(("admin", "tenant"))
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

REGISTRY, EXECUTOR, ROUTER = "openlora.v1.AdapterRegistry", "openlora.v1.Executor", "openlora.v1.Router"
# Roles allowed per RPC. Resource checks (which adapters) happen in the servicers: require_adapter.
POLICY: dict[str, frozenset[str]] = {
    f"/{REGISTRY}/RegisterAdapter": _WRITE,          # tenant: under its own prefix only
    f"/{REGISTRY}/UploadAdapter": _WRITE,
    f"/{REGISTRY}/GetAdapter": _ALL,                 # tenant: its own
    f"/{REGISTRY}/ListAdapters": _ALL,               # tenant: its own
    f"/{REGISTRY}/DeleteAdapter": _WRITE,            # tenant: its own
    f"/{REGISTRY}/FetchAdapter": _READ,              # the weights: services and admins only
    f"/{REGISTRY}/WatchAdapters": _READ,
    f"/{EXECUTOR}/Generate": _ALL,                   # tenant: its own adapter or the base model
    f"/{EXECUTOR}/GenerateStream": _ALL,
    f"/{EXECUTOR}/LoadAdapter": _ALL,                # tenant: its own
    f"/{EXECUTOR}/UnloadAdapter": _ALL,              # tenant: its own
    f"/{EXECUTOR}/GetStatus": _ALL,                  # tenant: residency of its own adapters only
    f"/{EXECUTOR}/GenerateStreams": _READ,           # a router's; each request checked as its caller
    f"/{ROUTER}/Generate": _ALL,
    f"/{ROUTER}/GenerateStream": _ALL,
    f"/{ROUTER}/ListExecutors": _ALL,                # tenant: residency of its own adapters only
    f"/{ROUTER}/GenerateStreams": _READ,             # a gateway's; each request checked as its caller
}
# Answered without a token: probes and schema discovery reveal no tenant's data.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    role: str
    expires_at: float = 0.0          # unix seconds; 0 -> never

    @property
    def sees_all(self) -> bool:
        return self.role in ("admin", "service")

    def owns(self, adapter_id: str) -> bool:
        return self.sees_all or owner_of(adapter_id) == self.tenant


OPEN = Identity(tenant="", role="admin")
_current: contextvars.ContextVar[Identity] = contextvars.ContextVar("openlora_identity", default=OPEN)
_authorization: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "openlora_authorization", default=None)


@dataclasses.dataclass(frozen=True, slots=True)
class SourceCredentials:
    """A tenant's credentials for RegisterAdapter's hf:// and s3:// sources, from the auth file:
    `"tenants": {"acme": {"hf_token": ..., "s3_access_key_id": ..., "s3_secret_access_key": ...,
    "s3_endpoint_url": ...}}`. Empty fields are anonymous: a tenant never borrows the registry's
    own credentials (HF_TOKEN, AWS_*) nor another tenant's."""

    hf_token: str = ""
    hf_endpoint: str = ""                  # empty -> HF_ENDPOINT or the public Hub
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_session_token: str = ""
    s3_endpoint_url: str = ""              # empty -> AWS_ENDPOINT_URL(_S3) or AWS
    s3_region: str = ""

    def __repr__(self) -> str:             # never log a secret
        return (f"SourceCredentials(hf_token={'***' if self.hf_token else ''!r}, "
                f"s3_access_key_id={self.s3_access_key_id!r}, s3_endpoint_url={self.s3_endpoint_url!r})")


ANONYMOUS = SourceCredentials()
_CREDENTIAL_KEYS = tuple(f.name for f in dataclasses.fields(SourceCredentials))
_table: contextvars.ContextVar[TokenTable | None] = contextvars.ContextVar("openlora_token_table",
                                                                        default=None)


def source_credentials() -> SourceCredentials | None:
    """The credentials an import by the current caller uses: a tenant's own (ANONYMOUS when the auth
    file gives it none); None for admins, services and open servers (the registry's environment)."""
    ident = current()
    if ident.role != "tenant":
        return None
    table = _table.get()
    return table.credentials(ident.tenant) if table is not None else ANONYMOUS


def current() -> Identity:
    """The caller of the RPC being handled (OPEN outside of one, or on an open server)."""
    return _current.get()


def act_as(header: str, method: str) -> None:
    """Inside a multiplexed call (Executor.GenerateStreams): from here on, in this task, the caller
    is the one `header` names, identified with this server's token table and checked against
    POLICY[method] as a call of its own would be (UNAUTHENTICATED / PERMISSION_DENIED)."""
    table = _table.get()
    ident = OPEN if table is None else table.identify(header or None)
    check_role(method, ident)
    _current.set(ident)
    _authorization.set(header or None)


def caller_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's own `authorization` header, to pass on to the services this call reaches, so
    they see the caller and not us (a call never gains rights by going through a service)."""
    value = _authorization.get()
    return (("authorization", value),) if value else ()


def owner_of(adapter_id: str) -> str:
    return adapter_id.split("/", 1)[0]


def not_found(adapter_id: str) -> NotFound:
    """The same answer an unknown adapter gets: another tenant's adapter does not exist for you."""
    return NotFound(f"no adapter {adapter_id!r}; `openlora adapters list` shows what the registry holds")


def require_adapter(adapter_id: str, *, create: bool = False) -> Identity:
    """Let the caller use `adapter_id`, or raise: NotFound for another tenant's adapter (or
    PermissionDenied when `create`, which names a namespace rather than an adapter)."""
    ident = current()
    if adapter_id and not ident.sees_all:
        check_adapter_id(adapter_id)                 # a malformed id is INVALID_ARGUMENT for everyone
    if adapter_id and not ident.owns(adapter_id):
        if create:
            raise PermissionDenied(f"tenant {ident.tenant!r} may only create adapters under "
                                   f"'{ident.tenant}/' (got {adapter_id!r})")
        raise not_found(adapter_id)
    return ident


def owns_checked(adapter_id: str) -> bool:
    """Whether the caller owns `adapter_id` (admins and services: every id; the base model's empty
    id: everyone), after checking its form. False: another tenant's, which this caller may read and
    run only if it is public (the registry knows; ask it with caller_metadata())."""
    ident = current()
    if adapter_id and not ident.sees_all:
        check_adapter_id(adapter_id)
    return not adapter_id or ident.owns(adapter_id)


def not_yours(adapter_id: str) -> PermissionDenied:
    """For a public adapter of another tenant that the caller tried to change, delete or unload."""
    return PermissionDenied(f"adapter {adapter_id!r} is public, but only its owner (tenant "
                            f"{owner_of(adapter_id)!r}) or an admin may change, delete or unload it")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, where: str) -> dict[str, Identity]:
    """The auth file's JSON -> {sha256 hex of token: Identity}; InvalidArgument naming the entry."""
    return parse_auth_file(text, where)[0]


def parse_auth_file(text: str, where: str) -> tuple[dict[str, Identity], dict[str, SourceCredentials]]:
    """The auth file's JSON -> ({sha256 hex of token: Identity}, {tenant: SourceCredentials})."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{where}: not valid JSON: {exc}") from None
    return _parse_tokens(doc, where), _parse_tenants(doc, where)


def _parse_tenants(doc, where: str) -> dict[str, SourceCredentials]:
    tenants = doc.get("tenants", {}) if isinstance(doc, dict) else {}
    if not isinstance(tenants, dict):
        raise InvalidArgument(f'{where}: "tenants" must be an object {{TENANT: {{"hf_token": ..., '
                              f'"s3_access_key_id": ..., ...}}}}')
    out = {}
    for tenant, entry in tenants.items():
        at = f"{where}: tenants[{tenant!r}]"
        if not _TENANT.fullmatch(tenant):
            raise InvalidArgument(f"{at}: a tenant name is 1-64 of [A-Za-z0-9._-]")
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{at}: must be an object")
        unknown = sorted(set(entry) - set(_CREDENTIAL_KEYS))
        if unknown:
            raise InvalidArgument(f"{at}: unknown keys {unknown}; expected {', '.join(_CREDENTIAL_KEYS)}")
        if not all(isinstance(v, str) for v in entry.values()):
            raise InvalidArgument(f"{at}: every value must be a string")
        creds = SourceCredentials(**entry)
        if bool(creds.s3_access_key_id) != bool(creds.s3_secret_access_key):
            raise InvalidArgument(f"{at}: s3_access_key_id and s3_secret_access_key go together")
        out[tenant] = creds
    return out


def _parse_tokens(doc, where: str) -> dict[str, Identity]:
    entries = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgument(f'{where}: expected {{"tokens": [{{"token_sha256": HEX, "tenant": NAME, '
                              f'"role": "admin"|"tenant"|"service"}}, ...]}}')
    table: dict[str, Identity] = {}
    for i, e in enumerate(entries):
        at = f"{where}: tokens[{i}]"
        if not isinstance(e, dict):
            raise InvalidArgument(f"{at}: must be an object")
        role, tenant = e.get("role"), e.get("tenant", "")
        if role not in ROLES:
            raise InvalidArgument(f"{at}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(tenant, str) or (tenant and not _TENANT.fullmatch(tenant)):
            raise InvalidArgument(f"{at}: tenant must be 1-64 of [A-Za-z0-9._-] (an adapter id's "
                                  f"first path segment), got {tenant!r}")
        if role == "tenant" and not tenant:
            raise InvalidArgument(f"{at}: a tenant token needs a tenant name")
        if "token_sha256" in e:
            digest = e["token_sha256"]
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise InvalidArgument(f"{at}: token_sha256 must be 64 hex digits")
            digest = digest.lower()
        elif isinstance(e.get("token"), str) and e["token"]:
            digest = hash_token(e["token"])
        else:
            raise InvalidArgument(f"{at}: needs token_sha256 (sha256 hex of the token) or token")
        expires = e.get("expires_at", 0)
        if isinstance(expires, str):
            try:
                expires = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise InvalidArgument(f"{at}: expires_at must be unix seconds or ISO 8601, "
                                      f"got {expires!r}") from None
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or expires < 0:
            raise InvalidArgument(f"{at}: expires_at must be unix seconds or ISO 8601, got {expires!r}")
        table[digest] = Identity(tenant=tenant, role=role, expires_at=float(expires))
    return table


class TokenTable:
    """Tokens -> identities, from a file re-read when it changes, plus fixed inline ones."""

    RECHECK_S = 1.0

    def __init__(self, path: str = "", inline: str = ""):
        self.path = path
        self._inline, self._inline_tenants = (parse_auth_file(inline, "--auth-tokens") if inline
                                              else ({}, {}))
        self._file: dict[str, Identity] = {}
        self._tenants: dict[str, SourceCredentials] = {}
        self._signature = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if path:
            self._reload(initial=True)

    @classmethod
    def from_config(cls, config) -> TokenTable | None:
        path, inline = getattr(config, "auth_file", ""), getattr(config, "auth_tokens", "")
        if not path and not inline:
            return None
        return cls(path, inline)

    def _stat(self):
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _reload(self, initial: bool = False) -> None:
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            with open(self.path, encoding="utf-8") as f:
                table, tenants = parse_auth_file(f.read(), self.path)
        except (OSError, InvalidArgument) as exc:
            if initial:
                raise InvalidArgument(f"--auth-file: {exc}") from None
            log.error("auth_file_reload_failed_keeping_previous", path=self.path, error=str(exc))
            return
        self._file, self._tenants, self._signature = table, tenants, signature
        log.info("auth_file_loaded", path=self.path, tokens=len(table), tenant_credentials=len(tenants))

    def credentials(self, tenant: str) -> SourceCredentials:
        """`tenant`'s own source credentials (ANONYMOUS when it has none)."""
        return self._tenants.get(tenant) or self._inline_tenants.get(tenant) or ANONYMOUS

    def lookup(self, token: str) -> Identity | None:
        now = time.monotonic()
        if self.path and now - self._checked >= self.RECHECK_S:
            with self._lock:
                if now - self._checked >= self.RECHECK_S:
                    self._checked = now
                    self._reload()
        digest = hash_token(token)
        return self._file.get(digest) or self._inline.get(digest)

    def identify(self, authorization: str | None) -> Identity:
        """`Bearer TOKEN` -> Identity, or Unauthenticated saying what is wrong."""
        if not authorization:
            raise Unauthenticated("no token: send 'authorization: Bearer TOKEN' (the CLI's --token, "
                                  "env OPENLORA_TOKEN)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization: expected 'Bearer TOKEN'")
        ident = self.lookup(token.strip())
        if ident is None:
            raise Unauthenticated("unknown token (revoked, mistyped, or meant for another deployment)")
        if ident.expires_at and time.time() >= ident.expires_at:
            raise Unauthenticated(f"token expired at {_utc(ident.expires_at)}; ask for a new one")
        return ident


def _utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _authorization_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def check_role(method: str, ident: Identity) -> None:
    allowed = POLICY.get(method)
    if ident.role == "admin":
        return
    if allowed is None:
        raise PermissionDenied(f"{method} has no access policy; only admin tokens may call it")
    if ident.role not in allowed:
        raise PermissionDenied(f"role {ident.role!r} may not call {method} (allowed: "
                               f"{', '.join(sorted(allowed))})")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Identifies the caller of every RPC (UNAUTHENTICATED without a known token), checks its role
    against POLICY (PERMISSION_DENIED) and makes it `current()` inside the handler.

    Install it inside ErrorInterceptor, which maps the errors it raises to status codes.
    """

    def __init__(self, table: TokenTable | None):
        self.table = table

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        table, method = self.table, details.method
        header = _authorization_of(details.invocation_metadata)

        def enter() -> None:
            # runs inside the handler's own context, so current() sees it there
            ident = OPEN if table is None else table.identify(header)
            check_role(method, ident)
            _current.set(ident)
            _table.set(table)
            _authorization.set(header)

        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                factory = getattr(grpc, f"{kind}_rpc_method_handler")
                return factory(_wrap(behavior, kind, enter),
                               request_deserializer=handler.request_deserializer,
                               response_serializer=handler.response_serializer)
        return handler


def _wrap(behavior, kind: str, enter):
    """An async handler that first runs `enter` (identify, check), then `behavior` (sync or async)."""
    if kind in ("unary_unary", "stream_unary"):
        async def unary(request, context):
            enter()
            result = _call(behavior, request, context)
            return await result if inspect.isawaitable(result) else result
        return unary

    async def streaming(request, context):
        enter()
        result = _call(behavior, request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            for item in result:
                yield item
    return streaming


def _call(behavior, request, context):
    try:
        return behavior(request, context)
    except NotImplementedError:          # a generated base method the servicer does not override
        raise Upstream(grpc.StatusCode.UNIMPLEMENTED, "this server does not implement "
                       "that method yet") from None


def log_mode(table: TokenTable | None, service: str) -> None:
    if table is None:
        log.warning("AUTH_DISABLED_OPEN_ACCESS", service=service,
                    detail="no --auth-file: every caller is admin (fine on a laptop, never on a "
                           "shared network); see docs/reference.md, 'Auth, tenants and TLS'")
    else:
        log.info("auth_enabled", service=service, auth_file=table.path or None)
