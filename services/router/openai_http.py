"""The router serving the OpenAI API itself (`openlora router --http-port P`): the gateway's app
over the router's own placement, so an HTTP request goes from here straight to an executor (one gRPC
hop, no gateway process in between). `openlora gateway` stays for deployments that scale HTTP apart.

LocalRouter is what the gateway's code calls as its router stub (Generate, GenerateStream,
ListExecutors, Check), answering in process: the caller's `Authorization` header is checked against
the router's own --auth-file exactly as its gRPC interceptor does, the servicer's methods run with
that identity, and their errors come back as the grpc.aio.AioRpcError a remote router would raise.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog
from grpc_health.v1 import health_pb2

from services.common import auth, errors
from services.common.streams import StreamCall
from services.gateway.config import GatewayConfig
from services.router.servicer import RequestContext

log = structlog.get_logger(__name__)

_METHOD = "/openlora.v1.Router/"


def _rpc_error(exc: BaseException) -> grpc.aio.AioRpcError:
    code, details = errors.status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("local_router_error", exc_info=exc)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Stream(StreamCall):
    """A server stream from the servicer, read as a grpc.aio call is (read() -> chunk or EOF); a
    failure that is not already a gRPC error or a cancel surfaces as the AioRpcError its status maps to."""

    def _failure(self, exc: BaseException) -> BaseException:
        if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AioRpcError):
            return _rpc_error(exc)
        return exc


class LocalRouter:
    """The router servicer as the gateway's upstream, in process."""

    def __init__(self, servicer, table: auth.TokenTable | None):
        self.servicer = servicer
        self.table = table

    def _enter(self, metadata, method: str) -> None:
        header = auth._authorization_of(metadata)
        ident = auth.OPEN if self.table is None else self.table.identify(header)
        auth.check_role(_METHOD + method, ident)
        auth._current.set(ident)
        auth._table.set(self.table)
        auth._authorization.set(header)

    def Generate(self, request, timeout=None, metadata=()) -> asyncio.Task:
        """A task (awaitable and cancellable, as a grpc.aio unary call is)."""
        async def call():
            try:
                self._enter(metadata, "Generate")       # inside the task: its own context
                return await self.servicer.Generate(request, RequestContext(timeout))
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                raise
            except Exception as exc:
                raise _rpc_error(exc) from None
        return asyncio.ensure_future(call())

    def GenerateStream(self, request, timeout=None, metadata=()):
        try:
            self._enter(metadata, "GenerateStream")
        except Exception as exc:
            raise _rpc_error(exc) from None
        return _Stream(self.servicer.GenerateStream(request, RequestContext(timeout)))

    async def ListExecutors(self, request, timeout=None, metadata=()):
        try:
            self._enter(metadata, "ListExecutors")
            return await self.servicer.ListExecutors(request, RequestContext(timeout))
        except Exception as exc:
            raise _rpc_error(exc) from None

    def executor_stubs(self) -> list[tuple[str, object]]:
        """The router's own channels to its healthy executors (admin calls go through the router)."""
        healthy = {v.address for v in self.servicer.pool.snapshot() if v.healthy}
        return [(a, s) for a, s in self.servicer.pool.stubs.items() if a in healthy]

    async def Check(self, request, timeout=None, metadata=()):
        healthy = any(v.healthy for v in self.servicer.pool.snapshot())
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING)


def gateway_config(config) -> GatewayConfig:
    """The HTTP side of a router: its address, TLS and registry; the gateway's defaults otherwise."""
    return GatewayConfig(host=config.host, port=config.http_port, grace_seconds=config.grace_seconds,
                         log_level=config.log_level, router="(this router)", registry=config.registry,
                         token=config.token, tls_cert=config.tls_cert, tls_key=config.tls_key,
                         tls_ca=config.tls_ca, served_model_name=config.served_model_name)


async def start_http(config, servicer):
    """Serve the OpenAI API on config.http_port over `servicer`; -> (uvicorn server, its task)."""
    from services.gateway.app import Gateway, build_app, http_server
    local = LocalRouter(servicer, auth.TokenTable.from_config(config))
    gw = Gateway(gateway_config(config), router=local)
    server, sock, url = http_server(gw, build_app(gw))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    log.info("router_http_listening", url=url)
    return server, task, gw
