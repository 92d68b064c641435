"""`openlora gateway`: the OpenAI-compatible HTTP front door (Starlette on uvicorn, gRPC behind).

One grpc.aio channel to the router carries every generation (deadline: --request-timeout-s); the
registry lists adapters for /v1/models and imports them for /v1/load_lora_adapter, which then loads
them on every executor the router knows. `model` is an adapter id (`ID` or `ID@VERSION`) or the
base model's served name. A client that goes away cancels its gRPC calls, and so the executors'
requests (their KV blocks are freed). Every error is OpenAI's {"error": {...}} with the HTTP status
of the upstream gRPC code (services.common.errors.HTTP_STATUS).

Auth: a request's own `Authorization: Bearer TOKEN` header is passed on as gRPC metadata, so the
router and registry see (and check) the caller, never more: a call without one carries no token,
whatever the gateway's own --token (which only its own calls send: learning the base model).
--tls-ca/--tls-cert/--tls-key secure the gRPC channels; --tls-cert/--tls-key also serve HTTPS
(and --tls-ca then requires client certificates).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import socket
import time
import uuid

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from services.common.config import MAX_MESSAGE_BYTES
from services.common.gen.openlora.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.common.tls import ClientSecurity, aio_channel
from services.gateway import openai_api as api
from services.gateway.chat import ModelFiles, TemplateError
from services.gateway.config import GatewayConfig
from services.gateway.openai_api import ApiError

log = structlog.get_logger(__name__)

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/health/ready", "/metrics")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
DONE = b"data: [DONE]\n\n"


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _token_id_str(token_id: int) -> str:
    """return_tokens_as_token_ids: a token as `token_id:N` (vLLM's spelling), never ambiguous."""
    return f"token_id:{token_id}"


@dataclasses.dataclass
class Shape:
    """One request's reply options (fixed before the first upstream call)."""

    route: str
    model: str
    chat: bool
    n: int
    token_ids: bool                 # return_token_ids: each choice's token ids
    include_usage: bool             # stream_options.include_usage
    k: int | None                   # logprobs alternatives per token (None: no logprobs)
    prompt_k: int | None            # vLLM's prompt_logprobs (None: not asked)
    echo: bool                      # completions: the prompt before the output
    drop_output: bool               # echo with max_tokens 0: the one token generated is dropped
    token_str: object               # token id -> its text in logprobs
    token_bytes: object             # token id -> its bytes (chat logprobs)
    echo_texts: list[str] = dataclasses.field(default_factory=list)   # per prompt
    offsets: list[int] = dataclasses.field(default_factory=list)      # per choice: text_offset so far


class ClientGone(Exception):
    """The HTTP client disconnected; its gRPC calls were cancelled."""


async def _disconnected(receive) -> None:
    """Returns once the client has gone (the body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(receive, coro):
    """Await `coro`; if the client goes away first, cancel it (and so its gRPC calls)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))   # let it unwind (closes generators, cancels calls)
    if task.cancelled():
        raise ClientGone()
    return task.result()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("openlora_gateway_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "openlora_gateway_request_duration_seconds", "time from request to the end of the response",
            ["route"], registry=self.registry,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttft = Histogram("openlora_gateway_time_to_first_token_seconds",
                              "streamed requests: time to the first token", ["route"],
                              registry=self.registry,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.prompt_tokens = Counter("openlora_gateway_prompt_tokens", "prompt tokens of finished requests",
                                     ["route"], registry=self.registry)
        self.completion_tokens = Counter("openlora_gateway_completion_tokens",
                                         "tokens generated for finished requests", ["route"],
                                         registry=self.registry)


class MetricsMiddleware:
    """Counts every request by route and status and times it to the end of its response."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{model}" if path.startswith("/v1/models/")
                                             else "other")
        status = [499]
        start = time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class EventStream:
    """A server-sent-events response that cancels its gRPC calls when the client goes away."""

    def __init__(self, events, calls: list):
        self.events = events
        self.calls = calls

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

        async def pump():
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _unless_disconnected(receive, pump())
        except (ClientGone, OSError):
            log.info("client_disconnected", cancelled_calls=len(self.calls))
        finally:
            for call in self.calls:
                call.cancel()
            await self.events.aclose()


def caller(request: Request) -> tuple[tuple[str, str], ...]:
    """The HTTP caller's own Authorization header, as gRPC metadata (none -> no token at all)."""
    value = request.headers.get("authorization")
    return (("authorization", value),) if value else ()


def _error(exc: ApiError) -> Response:
    return Response(exc.json_bytes(), status_code=exc.status, media_type="application/json")


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = Metrics()
        security = ClientSecurity.from_config(config)
        self.own_metadata = security.metadata()       # only for the gateway's own calls
        self.security = dataclasses.replace(security, token="")
        self.router_channel = aio_channel(config.router, self.security, CHANNEL_OPTIONS)
        self.router = router_pb2_grpc.RouterStub(self.router_channel)
        self.router_health = health_pb2_grpc.HealthStub(self.router_channel)
        self.registry_channel = (aio_channel(config.registry, self.security, CHANNEL_OPTIONS)
                                 if config.registry else None)
        self.registry = (registry_pb2_grpc.AdapterRegistryStub(self.registry_channel)
                         if self.registry_channel else None)
        self._executor_channels: dict[str, grpc.aio.Channel] = {}
        self.base_name = config.served_model_name or (
            pathlib.Path(config.base_model).name if config.base_model else "")
        self.base_aliases: set[str] = {self.base_name} if self.base_name else set()
        self.base_root = config.base_model
        self.files = ModelFiles(config.base_model or None)
        self._models_cache: dict[tuple, tuple[float, list[dict]]] = {}   # per caller
        self.created = int(time.time())

    async def close(self) -> None:
        for ch in [self.router_channel, self.registry_channel, *self._executor_channels.values()]:
            if ch is not None:
                await ch.close()

    # -- the base model ------------------------------------------------------------------------
    async def learn_base(self, timeout: float = 5.0) -> None:
        """Ask the router which base model its executors serve (name, and its files if local)."""
        if self.base_name and self.files.path is not None:
            return
        try:
            listed = await self.router.ListExecutors(router_pb2.ListExecutorsRequest(), timeout=timeout,
                                                     metadata=self.own_metadata)
        except grpc.aio.AioRpcError as exc:
            log.warning("base_model_unknown", error=exc.details())
            return
        reported = next((e.status.base_model for e in listed.executors if e.status.base_model), "")
        if not reported:
            return
        local = pathlib.Path(reported)
        is_dir = local.is_dir()
        if not self.base_name:
            self.base_name = local.name if (is_dir or reported.startswith(("/", "."))) else reported
            self.base_aliases.add(self.base_name)
        self.base_aliases.add(reported)
        self.base_root = self.base_root or reported
        if self.files.path is None and is_dir:
            self.files = ModelFiles(local)
        log.info("base_model", served_name=self.base_name, reported=reported,
                 chat_template=self.files.chat_template is not None)

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

    # -- generation ----------------------------------------------------------------------------
    def _requests(self, rid: str, adapter: str, version: int, prompts, n: int,
                  sampling: common_pb2.SamplingParams) -> list[common_pb2.GenerateRequest]:
        """One GenerateRequest per choice; request ids are `<response id>-<choice index>`."""
        if len(prompts) * n > self.config.max_n:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is over --max-n "
                                f"({self.config.max_n})", "n", "invalid_value")
        reqs = []
        for p in prompts:
            for i in range(n):
                s = sampling
                if n > 1 and sampling.HasField("seed"):   # different samples, each reproducible
                    s = common_pb2.SamplingParams()
                    s.CopyFrom(sampling)
                    s.seed = (sampling.seed + i) % 2**64
                req = common_pb2.GenerateRequest(request_id=f"{rid}-{len(reqs)}", adapter_id=adapter,
                                                 adapter_version=version, sampling=s)
                if isinstance(p, str):
                    req.prompt = p
                else:
                    req.prompt_token_ids.extend(p)
                reqs.append(req)
        return reqs

    async def _unary(self, reqs, md) -> list:
        calls = [self.router.Generate(r, timeout=self.config.request_timeout_s, metadata=md) for r in reqs]
        try:
            return list(await asyncio.gather(*calls))
        finally:
            for call in calls:
                call.cancel()

    async def _open_streams(self, reqs, md):
        """Start every stream and wait for each one's first chunk (errors surface before 200)."""
        calls = [self.router.GenerateStream(r, timeout=self.config.request_timeout_s, metadata=md)
                 for r in reqs]
        try:
            firsts = await asyncio.gather(*(c.read() for c in calls))
        except BaseException:
            for c in calls:
                c.cancel()
            raise
        return calls, list(firsts)

    @staticmethod
    async def _chunks(calls, firsts):
        """(choice index, chunk) in arrival order, over one or many streams."""
        if len(calls) == 1:
            call, chunk = calls[0], firsts[0]
            while chunk is not grpc.aio.EOF:
                yield 0, chunk
                chunk = await call.read()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def drain(i, call, first):
            try:
                chunk = first
                while chunk is not grpc.aio.EOF:
                    queue.put_nowait((i, chunk))
                    chunk = await call.read()
                queue.put_nowait((i, None))
            except BaseException as exc:
                queue.put_nowait((i, exc))

        tasks = [asyncio.ensure_future(drain(i, c, f)) for i, (c, f) in enumerate(zip(calls, firsts, strict=False))]
        try:
            left = len(calls)
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def generate(self, request: Request, route: str, body: dict, chat: bool) -> Response:
        model = body.get("model")
        adapter, version = await self.resolve(model)
        api.unsupported(body, ("suffix", "tools", "functions", "logit_bias", "best_of")
                        if not chat else ("tools", "functions", "logit_bias", "tool_choice"))
        n = api.integer(body, "n", 1, 1, self.config.max_n)
        stream = api.boolean(body, "stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise ApiError(400, "`stream_options` must be an object", "stream_options", "invalid_value")
        echo = not chat and api.boolean(body, "echo")
        o = Shape(route=route, model=model, chat=chat, n=n,
                  token_ids=api.boolean(body, "return_token_ids"),
                  include_usage=stream and api.boolean(stream_options, "include_usage"),
                  k=api.chat_logprobs_k(body) if chat else api.completion_logprobs_k(body),
                  prompt_k=api.prompt_logprobs_k(body), echo=echo,
                  drop_output=echo and api.max_tokens(body, chat, echo) == 0,
                  token_str=(_token_id_str if api.boolean(body, "return_tokens_as_token_ids")
                             else self.files.token_str),
                  token_bytes=self.files.token_bytes)
        api.string(body, "user")
        if chat:
            prompts = [self._chat_prompt(body)]
            sampling = api.sampling(body, 0, chat=True)
        else:
            prompts = api.prompts(body)
            sampling = api.sampling(body, self.config.default_max_tokens, chat=False, echo=echo)
        if o.k is not None:
            sampling.top_logprobs = o.k
        structured = api.structured_output(body)
        if structured is not None:
            sampling.structured_output.CopyFrom(structured)
        wanted = [x for x in (o.prompt_k, o.k if echo else None) if x is not None]
        if wanted:
            sampling.prompt_logprobs = max(wanted)
        if echo:
            o.echo_texts = [p if isinstance(p, str) else self.files.decode(p) for p in prompts]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        reqs = self._requests(rid, adapter, version, prompts, n, sampling)
        merged = api.merged_adapters(body)
        if merged is not None:   # several adapters combined; `model` is the base or one of them
            if adapter and adapter not in [i.partition("@")[0] for i in merged.ids]:
                raise ApiError(400, f"`model` {model!r} is neither the base model nor one of "
                                    "merged_adapters.ids", "model", "invalid_value")
            for r in reqs:
                r.adapter_id, r.adapter_version = "", 0
                r.merged_adapters.CopyFrom(merged)
        try:
            if not stream:
                replies = await _unless_disconnected(request.receive, self._unary(reqs, caller(request)))
                return self._reply(rid, o, replies)
            calls, firsts = await _unless_disconnected(request.receive,
                                                       self._open_streams(reqs, caller(request)))
        except grpc.aio.AioRpcError as exc:
            raise api.from_rpc(exc, model) from None
        return EventStream(self._events(rid, o, calls, firsts), calls)

    def _chat_prompt(self, body: dict):
        messages = api.chat_messages(body)
        if self.files.chat_template is None:
            raise ApiError(400, f"the model `{self.base_name}` has no chat template (no chat_template in "
                                "its tokenizer_config.json): use /v1/completions, or give the gateway "
                                "--base-model DIR of a model that has one", "messages",
                           "chat_template_missing")
        extra = body.get("chat_template_kwargs") or {}
        if not isinstance(extra, dict):
            raise ApiError(400, "`chat_template_kwargs` must be an object", "chat_template_kwargs")
        try:
            text = self.files.render(messages, api.boolean(body, "add_generation_prompt", True), extra)
        except TemplateError as exc:
            raise ApiError(400, f"the chat template refused these messages: {exc}", "messages",
                           "invalid_messages") from None
        return self.files.encode(text) if self.files.tokenizer is not None else text

    def _count(self, route: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.prompt_tokens.labels(route).inc(prompt_tokens)
        self.metrics.completion_tokens.labels(route).inc(completion_tokens)

    def _reply(self, rid: str, o: Shape, replies) -> Response:
        choices = []
        n = o.n
        prompt_tokens = sum(r.usage.prompt_tokens for r in replies[::n])
        completion_tokens = 0 if o.drop_output else sum(r.usage.completion_tokens for r in replies)
        for i, r in enumerate(replies):
            items = [] if o.drop_output else api.entries(r.token_ids, r.logprobs, r.top_logprobs)
            text = "" if o.drop_output else r.text
            if o.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text},
                          "logprobs": None if o.k is None else api.chat_logprobs(
                              o.token_str, o.token_bytes, items, o.k),
                          "finish_reason": api.FINISH[r.finish_reason]}
            else:
                lp = None
                if o.echo:
                    text = o.echo_texts[i // n] + text
                    if o.k is not None:
                        items = api.prompt_entries(r.prompt_logprobs) + items
                if o.k is not None:
                    lp = api.completion_logprobs(o.token_str, items, o.k)
                choice = {"index": i, "text": text, "logprobs": lp,
                          "finish_reason": api.FINISH[r.finish_reason]}
            if o.prompt_k is not None:
                choice["prompt_logprobs"] = api.vllm_prompt_logprobs(
                    o.token_str, api.prompt_entries(r.prompt_logprobs))
            if o.token_ids:
                choice["token_ids"] = [] if o.drop_output else list(r.token_ids)
            choices.append(choice)
        self._count(o.route, prompt_tokens, completion_tokens)
        return Response(_dumps({
            "id": rid, "object": "chat.completion" if o.chat else "text_completion",
            "created": int(time.time()), "model": o.model, "choices": choices,
            "usage": api.usage(prompt_tokens, completion_tokens)}).encode(),
            media_type="application/json")

    def _first_chunks(self, o: Shape, firsts) -> list[dict]:
        """What each choice says before its tokens: chat's role; completions' echoed prompt (with
        its logprobs); vLLM's prompt_logprobs."""
        out = []
        for i, first in enumerate(firsts):
            if o.chat:
                choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}
            elif o.echo or o.prompt_k is not None:
                choice = {"index": i, "text": o.echo_texts[i // o.n] if o.echo else "",
                          "logprobs": None, "finish_reason": None}
                if o.echo and o.k is not None:
                    choice["logprobs"] = api.completion_logprobs(
                        o.token_str, api.prompt_entries(first.prompt_logprobs), o.k)
                    o.offsets[i] = len(choice["text"])
            else:
                continue
            if o.prompt_k is not None:
                choice["prompt_logprobs"] = api.vllm_prompt_logprobs(
                    o.token_str, api.prompt_entries(first.prompt_logprobs))
            out.append(choice)
        return out

    async def _events(self, rid: str, o: Shape, calls, firsts):
        start = time.perf_counter()
        chat, n, k, route = o.chat, o.n, o.k, o.route
        head = _dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": int(time.time()), "model": o.model})[:-1] + ',"choices":['
        tail = ',"usage":null}\n\n' if o.include_usage else '}\n\n'
        prompt_tokens = completion_tokens = 0
        o.offsets = [0] * len(calls)
        first_token = True
        try:
            for choice in self._first_chunks(o, firsts):
                yield ("data: " + head + _dumps(choice) + "]" + tail).encode()
            async for i, c in self._chunks(calls, firsts):
                finish = api.FINISH[c.finish_reason]
                if finish:
                    if i % n == 0:
                        prompt_tokens += c.usage.prompt_tokens
                    completion_tokens += 0 if o.drop_output else c.usage.completion_tokens
                if o.drop_output:
                    if finish:
                        choice = {"index": i, "text": "", "logprobs": None, "finish_reason": finish}
                        yield ("data: " + head + _dumps(choice) + "]" + tail).encode()
                    continue
                if not (c.text or finish or ((k is not None or o.token_ids) and c.token_ids)):
                    continue
                if first_token and c.token_ids:
                    first_token = False
                    self.metrics.ttft.labels(route).observe(time.perf_counter() - start)
                lp = None
                if k is not None:
                    items = api.entries(c.token_ids, c.logprobs, c.top_logprobs)
                    if chat:
                        lp = api.chat_logprobs(o.token_str, o.token_bytes, items, k)
                    else:
                        lp = api.completion_logprobs(o.token_str, items, k, o.offsets[i])
                        o.offsets[i] += sum(len(t) for t in lp["tokens"])
                if not finish and lp is None and not o.token_ids:   # the common case, no dict built
                    text = _dumps(c.text)
                    yield ("data: " + head + (f'{{"index":{i},"delta":{{"content":{text}}},' if chat else
                                              f'{{"index":{i},"text":{text},')
                           + '"logprobs":null,"finish_reason":null}]' + tail).encode()
                    continue
                if chat:
                    choice = {"index": i, "delta": {"content": c.text} if c.text else {},
                              "logprobs": lp, "finish_reason": finish}
                else:
                    choice = {"index": i, "text": c.text, "logprobs": lp, "finish_reason": finish}
                if o.token_ids:
                    choice["token_ids"] = list(c.token_ids)
                yield ("data: " + head + _dumps(choice) + "]" + tail).encode()
        except grpc.aio.AioRpcError as exc:   # after the 200: an error event, then [DONE]
            yield ("data: " + api.from_rpc(exc, o.model).json_bytes().decode() + "\n\n").encode()
            yield DONE
            return
        self._count(route, prompt_tokens, completion_tokens)
        if o.include_usage:
            yield ("data: " + head + "]," + '"usage":' + _dumps(api.usage(prompt_tokens, completion_tokens))
                   + "}\n\n").encode()
        yield DONE

    # -- models --------------------------------------------------------------------------------
    async def _adapters(self, md) -> list[registry_pb2.Adapter]:
        if self.registry is None:
            return []
        out, token = [], ""
        while True:
            page = await self.registry.ListAdapters(
                registry_pb2.ListAdaptersRequest(page_size=1000, page_token=token), timeout=30, metadata=md)
            out.extend(page.adapters)
            token = page.next_page_token
            if not token:
                return out

    def _card(self, model_id: str, created: int, root: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "openlora",
                "root": root, "parent": parent, "permission": []}

    async def models(self, md) -> list[dict]:
        """The base model and the adapters this caller may see (cached --models-cache-s per caller)."""
        now = time.monotonic()
        cached = self._models_cache.get(md)
        if cached and now - cached[0] < self.config.models_cache_s:
            return cached[1]
        await self.learn_base()
        cards = [self._card(self.base_name, self.created, self.base_root, None)] if self.base_name else []
        cards += [self._card(a.adapter_id, a.created_at.seconds or self.created, a.source,
                             self.base_name or None) for a in await self._adapters(md)]
        if len(self._models_cache) > 1000:
            self._models_cache.clear()
        self._models_cache[md] = (now, cards)
        return cards

    # -- runtime adapters ----------------------------------------------------------------------
    async def executor_stubs(self, md) -> list[tuple[str, executor_pb2_grpc.ExecutorStub]]:
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


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 over `limit` bytes, 400 when it is not a JSON object."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {length} bytes; the limit is {limit} "
                            "(--max-body-bytes)", None, "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes (--max-body-bytes)",
                           None, "request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:    # RecursionError: [[[[...
        raise ApiError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return data


def build_app(gw: Gateway) -> Starlette:
    cfg = gw.config

    def endpoint(fn):
        async def wrapped(request: Request):
            try:
                return await fn(request)
            except ApiError as exc:
                return _error(exc)
            except grpc.aio.AioRpcError as exc:
                return _error(api.from_rpc(exc))
            except ClientGone:
                return Response(status_code=499)
            except Exception as exc:   # a bug here: still OpenAI's shape
                log.exception("gateway_error", path=request.url.path)
                return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None,
                                       "internal_error"))
        return wrapped

    @endpoint
    async def completions(request):
        return await gw.generate(request, "/v1/completions", await read_json(request, cfg.max_body_bytes),
                                 chat=False)

    @endpoint
    async def chat_completions(request):
        return await gw.generate(request, "/v1/chat/completions",
                                 await read_json(request, cfg.max_body_bytes), chat=True)

    @endpoint
    async def list_models(request):
        return JSONResponse({"object": "list", "data": await gw.models(caller(request))})

    @endpoint
    async def get_model(request):
        name = request.path_params["model"]
        adapter, version = await gw.resolve(name)
        if not adapter:
            return JSONResponse(gw._card(gw.base_name, gw.created, gw.base_root, None))
        if gw.registry is None:
            raise ApiError(404, f"The model `{name}` does not exist (no --registry)", "model",
                           "model_not_found")
        try:
            a = await gw.registry.GetAdapter(registry_pb2.GetAdapterRequest(
                adapter_id=adapter, version=version), timeout=30, metadata=caller(request))
        except grpc.aio.AioRpcError as exc:
            raise api.from_rpc(exc, name) from None
        return JSONResponse(gw._card(name, a.created_at.seconds or gw.created, a.source, gw.base_name))

    @endpoint
    async def load_lora_adapter(request):
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
        gw._models_cache.clear()
        log.info("lora_loaded", adapter_id=name, version=adapter.version, executors=loaded)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully "
                                 f"(version {adapter.version}, loaded on {len(loaded)} executor(s)).")

    @endpoint
    async def unload_lora_adapter(request):
        body = await read_json(request, cfg.max_body_bytes)
        name = api.string(body, "lora_name", required=True)
        if gw.registry is None:
            raise ApiError(503, "this gateway was started without --registry", None, "no_registry")
        md = caller(request)
        try:
            await gw.registry.DeleteAdapter(registry_pb2.DeleteAdapterRequest(adapter_id=name), timeout=30,
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
        gw._models_cache.clear()
        log.info("lora_unloaded", adapter_id=name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def health_live(request):
        return JSONResponse({"status": "ok"})

    @endpoint
    async def health_ready(request):
        try:
            reply = await gw.router_health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            raise ApiError(503, f"the router at {cfg.router} does not answer: {exc.details()}", None,
                           "router_unavailable") from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise ApiError(503, f"the router at {cfg.router} is not serving (no healthy executor)", None,
                           "router_unavailable")
        return JSONResponse({"status": "ready", "router": cfg.router})

    async def metrics(request):
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request, exc):
        return _error(ApiError(404, f"no route {request.method} {request.url.path}", None, "not_found"))

    async def not_allowed(request, exc):
        return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}", None,
                               "method_not_allowed"))

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
        Route("/health", health_live, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: not_allowed})
    app.add_middleware(MetricsMiddleware, metrics=gw.metrics)
    return app


async def serve(config: GatewayConfig) -> None:
    import uvicorn

    from services.common.server import StartupError
    gw = Gateway(config)
    await gw.learn_base(timeout=2.0)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (else each
    # reply's second write waits ~40 ms for the client's delayed ACK)
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc}") from None
    port = sock.getsockname()[1]
    tls = {}
    if config.tls_cert:
        import ssl
        tls = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
        if config.tls_ca:
            tls.update(ssl_ca_certs=config.tls_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    server = uvicorn.Server(uvicorn.Config(
        build_app(gw), http="httptools", lifespan="off", access_log=False, log_config=None,
        log_level=config.log_level, timeout_graceful_shutdown=int(config.grace_seconds) or None, **tls))
    scheme = "https" if tls else "http"
    log.info("gateway_listening", url=f"{scheme}://{config.host}:{port}", router=config.router,
             registry=config.registry, base_model=gw.base_name or "(not known yet)")
    try:
        await server.serve(sockets=[sock])
    finally:
        await gw.close()
        log.info("stopped")
