"""TLS and tokens on the wire: server credentials, and channels that services and the CLI call with.

    creds = server_credentials(config)             # None -> plaintext; --tls-ca -> client certs required
    security = ClientSecurity.from_config(config)  # --token, --tls-ca, --tls-cert, --tls-key
    channel = aio_channel("host:port", security)   # TLS when a CA or cert is given; sends the token

A channel sends `authorization: Bearer <--token>` on every call that does not already carry an
`authorization` of its own (a caller's, passed on with `auth.caller_metadata()`). With `--tls-ca` a
client verifies servers against that CA (else the system roots) and presents `--tls-cert/--tls-key`
when given, which is what a server started with `--tls-ca` demands (mutual TLS).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

import grpc

from services.common.config import ConfigError, flag_name


def _read(path: str, name: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(flag_name(name), f"cannot read {path}: {exc.strerror}") from None


def server_credentials(config) -> grpc.ServerCredentials | None:
    """From --tls-cert/--tls-key (and --tls-ca: require client certificates signed by it)."""
    cert, key, ca = config.tls_cert, config.tls_key, config.tls_ca
    if not cert and not key:
        if ca:
            raise ConfigError("--tls-ca", "needs --tls-cert and --tls-key (a server with a CA "
                                          "verifies its clients over TLS)")
        return None
    if not cert or not key:
        raise ConfigError("--tls-cert" if not cert else "--tls-key", "--tls-cert and --tls-key go together")
    return grpc.ssl_server_credentials(
        [(_read(key, "tls_key"), _read(cert, "tls_cert"))],
        root_certificates=_read(ca, "tls_ca") if ca else None, require_client_auth=bool(ca))


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSecurity:
    """What a client adds to its channels: a token, and TLS material (PEM bytes)."""

    token: str = ""
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    @classmethod
    def from_config(cls, config) -> ClientSecurity:
        cert, key = getattr(config, "tls_cert", ""), getattr(config, "tls_key", "")
        ca = getattr(config, "tls_ca", "")
        if bool(cert) != bool(key):
            raise ConfigError("--tls-cert" if not cert else "--tls-key",
                              "--tls-cert and --tls-key go together")
        return cls(token=getattr(config, "token", "") or "",
                   ca=_read(ca, "tls_ca") if ca else None,
                   cert=_read(cert, "tls_cert") if cert else None,
                   key=_read(key, "tls_key") if key else None)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _with_token(details, token_md):
    md = details.metadata
    if md is not None and any(k == "authorization" for k, _ in md):
        return details
    merged = grpc.aio.Metadata(*token_md) if md is None else grpc.aio.Metadata(*tuple(md), *token_md)
    return details._replace(metadata=merged)


class _AioToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token_md):
        self.md = token_md

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.md), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.md), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.md), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.md), request_iterator)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token_md):
        self.md = token_md

    def _details(self, details):
        md = list(details.metadata or ())
        if not any(k == "authorization" for k, _ in md):
            md += self.md
        return _SyncDetails(details.method, details.timeout, md, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def aio_channel(address: str, security: ClientSecurity | None = None,
                options=(), send_token: bool = True) -> grpc.aio.Channel:
    """`send_token=False`: no token interceptor (grpc.aio runs intercepted calls in an extra task,
    ~1 ms on a busy host); the caller then passes `metadata=` itself on every call."""
    security = security or ClientSecurity()
    interceptors = [_AioToken(security.metadata())] if security.token and send_token else None
    if security.tls:
        return grpc.aio.secure_channel(address, security.credentials(), options=list(options),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def channel(address: str, security: ClientSecurity | None = None, options=()) -> grpc.Channel:
    security = security or ClientSecurity()
    ch = (grpc.secure_channel(address, security.credentials(), options=list(options))
          if security.tls else grpc.insecure_channel(address, options=list(options)))
    return grpc.intercept_channel(ch, _SyncToken(security.metadata())) if security.token else ch


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """--token, --tls-ca, --tls-cert, --tls-key for the CLI's client commands (env OPENLORA_*)."""
    env = os.environ.get
    parser.add_argument("--token", default=env("OPENLORA_TOKEN", ""),
                        help="bearer token sent as 'authorization' [env OPENLORA_TOKEN]")
    parser.add_argument("--tls-ca", default=env("OPENLORA_TLS_CA", ""),
                        help="PEM CA to verify the server with; turns TLS on [env OPENLORA_TLS_CA]")
    parser.add_argument("--tls-cert", default=env("OPENLORA_TLS_CERT", ""),
                        help="PEM client certificate (mutual TLS) [env OPENLORA_TLS_CERT]")
    parser.add_argument("--tls-key", default=env("OPENLORA_TLS_KEY", ""),
                        help="PEM client key (mutual TLS) [env OPENLORA_TLS_KEY]")


def channel_from_args(args: argparse.Namespace, address: str, prog: str, options=()) -> grpc.Channel:
    """The CLI's channel from add_client_flags' flags; a bad TLS file exits 2 with one line."""
    try:
        return channel(address, ClientSecurity.from_config(args), options)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
