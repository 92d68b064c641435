"""Models and tokenizer routes: /v1/models (the base model and the adapters a caller may see),
/tokenize, /detokenize, /tokenizer_info and /version as vLLM offers them.

A model card's `root` is what a tenant gave (an adapter's source) or the base model's served name,
never a path on a server. The tokenizer routes use the base model's tokenizer (adapters share it);
they hold no tenant's data.
"""

from __future__ import annotations

import time

import grpc
from starlette.requests import Request

from services.common.gen.openlora.v1 import registry_pb2
from services.gateway import openai_api as api
from services.gateway.openai_api import ApiError
from services.gateway.transport import json_response, read_json
from services.gateway.upstream import Gateway, caller


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version
    try:
        return package_version("openlora")
    except PackageNotFoundError:
        return "0.1.0"


def card(model_id: str, created: int, root: str, parent: str | None) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "openlora",
            "root": root, "parent": parent, "permission": []}


class Models:
    def __init__(self, gw: Gateway):
        self.gw = gw
        self._cache: dict[tuple, tuple[float, list[dict]]] = {}   # per caller

    def forget(self) -> None:
        self._cache.clear()

    async def _adapters(self, md) -> list[registry_pb2.Adapter]:
        if self.gw.registry is None:
            return []
        out, token = [], ""
        while True:
            page = await self.gw.registry.ListAdapters(
                registry_pb2.ListAdaptersRequest(page_size=1000, page_token=token), timeout=30, metadata=md)
            out.extend(page.adapters)
            token = page.next_page_token
            if not token:
                return out

    async def cards(self, md) -> list[dict]:
        """The base model and the adapters this caller may see (cached --models-cache-s per caller)."""
        gw = self.gw
        now = time.monotonic()
        cached = self._cache.get(md)
        if cached and now - cached[0] < gw.config.models_cache_s:
            return cached[1]
        await gw.learn_base()
        cards = [card(gw.base_name, gw.created, gw.base_name, None)] if gw.base_name else []
        cards += [card(a.adapter_id, a.created_at.seconds or gw.created, a.source, gw.base_name or None)
                  for a in await self._adapters(md)]
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[md] = (now, cards)
        return cards

    # -- routes ------------------------------------------------------------------------------------
    async def list_models(self, request: Request):
        return json_response({"object": "list", "data": await self.cards(caller(request))})

    async def get_model(self, request: Request):
        gw = self.gw
        name = request.path_params["model"]
        adapter, v = await gw.resolve(name)
        if not adapter:
            return json_response(card(gw.base_name, gw.created, gw.base_name, None))
        if gw.registry is None:
            raise ApiError(404, f"The model `{name}` does not exist (no --registry)", "model",
                           "model_not_found")
        try:
            a = await gw.registry.GetAdapter(registry_pb2.GetAdapterRequest(
                adapter_id=adapter, version=v), timeout=30, metadata=caller(request))
        except grpc.aio.AioRpcError as exc:
            raise api.from_rpc(exc, name) from None
        return json_response(card(name, a.created_at.seconds or gw.created, a.source, gw.base_name))

    def _tokenizer(self):
        files = self.gw.files
        if files.tokenizer is None:
            raise ApiError(400, "this gateway has no tokenizer for the base model (give it --base-model "
                                "DIR, a directory with tokenizer.json)", None, "tokenizer_missing")
        return files

    async def tokenize(self, request: Request):
        body = await read_json(request, self.gw.config.max_body_bytes)
        await self.gw.learn_base()
        files = self._tokenizer()
        if body.get("messages") is not None:
            if files.chat_template is None:
                raise ApiError(400, "the base model has no chat template", "messages", "chat_template_missing")
            text = files.render(api.chat_messages(body), api.boolean(body, "add_generation_prompt", True))
            ids = files.encode(text)
        else:
            prompt = api.string(body, "prompt", required=True)
            special = api.boolean(body, "add_special_tokens", True)
            ids = files.tokenizer.encode(prompt, add_special_tokens=special).ids
        out = {"count": len(ids), "max_model_len": self.gw.max_model_len, "tokens": ids}
        if api.boolean(body, "return_token_strs"):
            out["token_strs"] = [files.token_str(t) for t in ids]
        return json_response(out)

    async def detokenize(self, request: Request):
        body = await read_json(request, self.gw.config.max_body_bytes)
        await self.gw.learn_base()
        files = self._tokenizer()
        tokens = body.get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                 and 0 <= t <= api.U32 for t in tokens)):
            raise ApiError(400, "`tokens` must be a list of token ids", "tokens", "invalid_value")
        return json_response({"prompt": files.decode(tokens)})

    async def tokenizer_info(self, request: Request):
        await self.gw.learn_base()
        files = self._tokenizer()
        return json_response({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": files.eos_token or None,
                              "bos_token": files.bos_token or None, "pad_token": None,
                              "model_max_length": self.gw.max_model_len, "chat_template": files.chat_template})

    async def version(self, request: Request):
        return json_response({"version": version()})
