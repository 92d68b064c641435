"""Adapter admin routes, as vLLM names them: /v1/load_lora_adapter imports an adapter into the
registry and loads it on every executor the router knows; /v1/unload_lora_adapter unloads it from
the executors' tiers (the registry keeps it: deleting is the registry's, `openlora adapters rm`).
"""

from __future__ import annotations

import os

import grpc
import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from services.common.gen.openlora.v1 import executor_pb2, registry_pb2
from services.gateway import openai_api as api
from services.gateway.models import Models
from services.gateway.openai_api import ApiError
from services.gateway.transport import read_json
from services.gateway.upstream import Gateway, caller

log = structlog.get_logger(__name__)


class Admin:
    def __init__(self, gw: Gateway, models: Models):
        self.gw = gw
        self.models = models

    async def load_lora_adapter(self, request: Request):
        gw, cfg = self.gw, self.gw.config
        body = await read_json(request, cfg.max_body_bytes)
        name = api.string(body, "lora_name", required=True)
        path = api.string(body, "lora_path", required=True)
        if gw.registry is None:
            raise ApiError(503, "this gateway was started without --registry; it cannot import adapters",
                           None, "no_registry")
        if not api.ADAPTER_ID.fullmatch(name) or ".." in name:
            raise ApiError(400, f"`lora_name` {name!r} is not a valid adapter id "
                                "([A-Za-z0-9][A-Za-z0-9._/-]{0,127}, no '..')", "lora_name")
        source = path if "://" in path else "file://" + os.path.abspath(path)
        md = caller(request)
        adapter = await gw.registry.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
            adapter_id=name, source=source, base_model=api.string(body, "base_model") or ""),
            timeout=cfg.request_timeout_s, metadata=md)
        loaded = []
        for address, stub in await gw.executor_stubs(md):
            await stub.LoadAdapter(executor_pb2.LoadAdapterRequest(
                adapter_id=name, version=adapter.version), timeout=cfg.request_timeout_s, metadata=md)
            loaded.append(address)
        self.models.forget()
        log.info("lora_loaded", adapter_id=name, version=adapter.version, executors=loaded)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully "
                                 f"(version {adapter.version}, loaded on {len(loaded)} executor(s)).")

    async def unload_lora_adapter(self, request: Request):
        gw = self.gw
        body = await read_json(request, gw.config.max_body_bytes)
        name = api.string(body, "lora_name", required=True)
        if gw.registry is None:
            raise ApiError(503, "this gateway was started without --registry", None, "no_registry")
        md = caller(request)
        try:   # an id the caller may not see is NOT_FOUND, as an unknown one
            await gw.registry.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id=name), timeout=30,
                                         metadata=md)
        except grpc.aio.AioRpcError as exc:
            raise api.from_rpc(exc, name) from None
        for _, stub in await gw.executor_stubs(md):
            try:
                await stub.UnloadAdapter(executor_pb2.UnloadAdapterRequest(adapter_id=name), timeout=30,
                                         metadata=md)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        log.info("lora_unloaded", adapter_id=name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
