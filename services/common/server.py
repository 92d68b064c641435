"""gRPC server bootstrap shared by every service: health, reflection, errors, graceful drain."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from services.common import auth, tls
from services.common.config import MAX_MESSAGE_BYTES, ConfigError, ServerConfig
from services.common.errors import ErrorInterceptor, InvalidArgument

log = structlog.get_logger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


_early_signal = False


class StartupError(RuntimeError):
    """A server cannot start (its model will not load, say); the CLI prints it as one line, exit 1."""


def defer_signals() -> None:
    """Until an event loop takes over (Server.handle_signals), remember SIGTERM/SIGINT instead of
    dying, so a server stopped during start-up (imports, model load) still drains and exits 0."""
    def remember(signum, frame):
        global _early_signal
        _early_signal = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, remember)


# grpcio-reflection serves only grpc.reflection.v1alpha; v1 (what `buf curl` and newer grpcurl ask
# for first) has the same messages under another package, so one servicer answers both.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_reflection_v1() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool (a copy of v1alpha's with the v1
    package), so reflection can describe its own v1 service too."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(".grpc.reflection.v1alpha.",
                                                          ".grpc.reflection.v1.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace("v1alpha", "v1")
            method.output_type = method.output_type.replace("v1alpha", "v1")
    pool.Add(proto)


def _enable_reflection(names: list[str], grpc_server: grpc.aio.Server) -> None:
    """Serve reflection as grpc.reflection.v1alpha and grpc.reflection.v1 (wire-identical)."""
    _register_reflection_v1()
    servicer = reflection.aio.ReflectionServicer(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1])
    for service_name in (reflection.SERVICE_NAME, REFLECTION_V1):
        grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
        }),))


@dataclass(frozen=True, slots=True)
class Service:
    """One gRPC service to mount: its fully qualified name, servicer and generated add_* function."""

    name: str
    servicer: object
    add_to_server: Callable[[object, grpc.aio.Server], None]


class Server:
    """A started-or-not grpc.aio server with its health service."""

    def __init__(self, grpc_server: grpc.aio.Server, port: int, health_servicer, names: list[str]):
        self.grpc = grpc_server
        self.port = port
        self._health = health_servicer
        self._names = names
        self._stop: asyncio.Event | None = None

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ["", *self._names]:
            await self._health.set(name, status)

    async def start(self) -> None:
        await self.grpc.start()

    async def stop(self, grace: float | None) -> None:
        await self._health.enter_graceful_shutdown()
        await self.grpc.stop(grace)

    def handle_signals(self) -> asyncio.Event:
        """From now on SIGTERM/SIGINT set the returned event instead of killing the process.

        Call it before slow start-up work (loading a model), so a SIGTERM then still drains and
        exits 0 once start-up is done.
        """
        if self._stop is None:
            self._stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            if _early_signal:
                self._stop.set()
        return self._stop

    async def run_until_signal(self, grace: float,
                               on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then answer NOT_SERVING, drain in-flight calls and return."""
        await self.handle_signals().wait()
        log.info("draining", grace_seconds=grace)
        if on_drain is not None:
            await on_drain()
        await self.stop(grace)
        log.info("stopped")


async def create_server(config: ServerConfig, services: Sequence[Service],
                        serving: bool = True) -> tuple[Server, int]:
    """Build a grpc.aio server on config.host:config.port with health and reflection.

    Health answers for "" and each service's name: SERVING now if `serving`, else NOT_SERVING until
    `server.set_serving(True)`. The server is not started; call `await server.start()`.
    """
    try:
        table = auth.TokenTable.from_config(config)
        credentials = tls.server_credentials(config)
    except (InvalidArgument, ConfigError) as exc:
        raise StartupError(str(exc)) from None
    auth.log_mode(table, ",".join(svc.name for svc in services))
    options = [*(o for o in GRPC_OPTIONS if o[0] != "grpc.max_receive_message_length"),
               ("grpc.max_receive_message_length", config.max_receive_message_bytes)]
    grpc_server = grpc.aio.server(interceptors=[ErrorInterceptor(), auth.AuthInterceptor(table)],
                                  options=options)
    for svc in services:
        svc.add_to_server(svc.servicer, grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    names = [svc.name for svc in services]
    _enable_reflection(names, grpc_server)
    address = f"{config.host}:{config.port}"
    port = (grpc_server.add_secure_port(address, credentials) if credentials
            else grpc_server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server = Server(grpc_server, port, health_servicer, names)
    await server.set_serving(serving)
    return server, port
