"""The gateway's upstreams: one grpc.aio channel to the router (every generation, and which base
model the executors serve) and one to the registry (the adapters in /v1/models, imports).

Auth: a request's own `Authorization: Bearer TOKEN` header is passed on as gRPC metadata, so the
router and registry see (and check) the caller, never more: a call without one carries no token,
whatever the gateway's own --token (which only its own calls send: learning the base model).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import grpc
import structlog
from grpc_health.v1 import health_pb2_grpc

from services.common.config import MAX_MESSAGE_BYTES
from services.common.gen.openlora.v1 import (
    executor_pb2_grpc,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.common.streams import StreamCall, StreamsClient
from services.common.tls import ClientSecurity, aio_channel
from services.gateway import openai_api as api
from services.gateway.chat import ModelFiles
from services.gateway.config import GatewayConfig
from services.gateway.openai_api import ApiError
from services.gateway.transport import Metrics

log = structlog.get_logger(__name__)

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def caller(request) -> tuple[tuple[str, str], ...]:
    """The HTTP caller's own Authorization header, as gRPC metadata (none -> no token at all)."""
    value = request.headers.get("authorization")
    return (("authorization", value),) if value else ()


class _Router:
    """The router's stub, its GenerateStream calls sent over one GenerateStreams call (answered in
    batches; common/streams.py) with the gateway's own token on it and each caller's on its request."""

    def __init__(self, stub, own_metadata, multiplex: bool):
        self._stub = stub
        self.streams = StreamsClient(stub, call_metadata=own_metadata)
        self.multiplex = multiplex

    def __getattr__(self, name):
        return getattr(self._stub, name)

    def GenerateStream(self, request, timeout=None, metadata=()):
        return StreamCall(self.streams.generate_stream(request, timeout, metadata, self.multiplex))


class Gateway:
    """What every route shares: config, metrics, upstream channels, the base model's files."""

    def __init__(self, config: GatewayConfig, router=None):
        """router: the router's own servicer in process (services.router.openai_http.LocalRouter,
        `openlora router --http-port`), else a gRPC channel to config.router."""
        self.config = config
        self.metrics = Metrics()
        security = ClientSecurity.from_config(config)
        self.own_metadata = security.metadata()       # only for the gateway's own calls
        self.security = dataclasses.replace(security, token="")
        self.router_channel = None if router is not None else aio_channel(config.router, self.security,
                                                                          CHANNEL_OPTIONS)
        self.router = router or _Router(router_pb2_grpc.RouterStub(self.router_channel), self.own_metadata,
                                        config.multiplex_streams)
        self.router_health = router or health_pb2_grpc.HealthStub(self.router_channel)
        self.registry_channel = (aio_channel(config.registry, self.security, CHANNEL_OPTIONS)
                                 if config.registry else None)
        self.registry = (registry_pb2_grpc.AdapterRegistryStub(self.registry_channel)
                         if self.registry_channel else None)
        self._executor_channels: dict[str, grpc.aio.Channel] = {}
        self.base_name = config.served_model_name or (
            pathlib.Path(config.base_model).name if config.base_model else "")
        self.base_aliases: set[str] = {self.base_name} if self.base_name else set()
        self.files = ModelFiles(config.base_model or None)
        self._models_cache: dict[tuple, tuple[float, list[dict]]] = {}   # per caller
        self.created = int(time.time())
        self.max_model_len = 0          # the executors' context (0: not known yet)
        self._asked = -1e9              # when learn_base last asked the router

    async def close(self) -> None:
        if isinstance(self.router, _Router):
            await self.router.streams.close()
        for ch in [self.router_channel, self.registry_channel, *self._executor_channels.values()]:
            if ch is not None:
                await ch.close()

    # -- the base model ------------------------------------------------------------------------
    async def learn_base(self, timeout: float = 5.0) -> None:
        """Ask the router which base model its executors serve (its name, its files when they are on
        this machine, its context length); at most every few seconds until all are known."""
        if self.base_name and self.files.path is not None and self.max_model_len:
            return
        now = time.monotonic()
        if now - self._asked < 2.0:
            return
        self._asked = now
        try:
            listed = await self.router.ListExecutors(router_pb2.ListExecutorsRequest(), timeout=timeout,
                                                     metadata=self.own_metadata)
        except grpc.aio.AioRpcError as exc:
            log.warning("base_model_unknown", error=exc.details())
            return
        lens = [e.status.max_model_len for e in listed.executors if e.status.max_model_len]
        self.max_model_len = min(lens, default=self.max_model_len)
        reported = next((e.status.base_model for e in listed.executors if e.status.base_model), "")
        if not reported:
            return
        local = pathlib.Path(reported)
        is_dir = local.is_dir()
        if not self.base_name:
            self.base_name = local.name if (is_dir or reported.startswith(("/", "."))) else reported
            self.base_aliases.add(self.base_name)
        self.base_aliases.add(reported)
        if self.files.path is None and is_dir:
            self.files = ModelFiles(local)
        log.info("base_model", served_name=self.base_name, reported=reported,
                 max_model_len=self.max_model_len, chat_template=self.files.chat_template is not None)

    async def resolve(self, model) -> tuple[str, int]:
        """`model` -> (adapter_id, version); ("", 0) for the base model; 404 for anything else."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, "`model` is required: the base model's name or an adapter id",
                           "model", "missing_field")
        if not self.base_name:
            await self.learn_base()
        if model in self.base_aliases:
            return "", 0
        adapter, version = model, 0
        if "@" in model:
            adapter, _, tail = model.rpartition("@")
            if not tail.isdigit() or int(tail) < 1:
                adapter = ""
            else:
                version = int(tail)
        if not api.ADAPTER_ID.fullmatch(adapter) or ".." in adapter:
            raise ApiError(404, f"The model `{model}` does not exist. GET /v1/models lists the models "
                                "served here.", "model", "model_not_found")
        return adapter, version

    def count(self, route: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.prompt_tokens.labels(route).inc(prompt_tokens)
        self.metrics.completion_tokens.labels(route).inc(completion_tokens)

    # -- runtime adapters ----------------------------------------------------------------------
    async def executor_stubs(self, md) -> list[tuple[str, executor_pb2_grpc.ExecutorStub]]:
        """Every healthy executor's stub: the router's own channels when it serves this app (in
        process), else channels of the gateway's own to the executors the router lists."""
        if hasattr(self.router, "executor_stubs"):
            return self.router.executor_stubs()
        listed = await self.router.ListExecutors(router_pb2.ListExecutorsRequest(), timeout=30, metadata=md)
        out = []
        for e in listed.executors:
            if not e.healthy:
                continue
            ch = self._executor_channels.get(e.address)
            if ch is None:
                ch = self._executor_channels[e.address] = aio_channel(e.address, self.security,
                                                                      CHANNEL_OPTIONS)
            out.append((e.address, executor_pb2_grpc.ExecutorStub(ch)))
        return out

