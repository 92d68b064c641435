"""The gateway's HTTP transport: JSON bodies in, OpenAI's error shape out, server-sent events that
cancel their gRPC calls when the client goes away, request metrics.

Every string in a body must be valid Unicode (a lone surrogate such as "\\ud800" is a 400 naming
the field, not a 500 when it reaches protobuf); JSON out escapes every non-ASCII character
(ensure_ascii), so U+2028/U+2029/U+0085 never break a client that splits a stream on lines.
"""

from __future__ import annotations

import asyncio
import json
import time

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.openai_api import ApiError

log = structlog.get_logger(__name__)

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/health/ready", "/metrics", "/tokenize", "/detokenize",
          "/tokenizer_info", "/version")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
DONE = b"data: [DONE]\n\n"


def dumps(obj) -> str:
    """Compact JSON, ASCII only (\\uXXXX escapes: line separators never go out raw)."""
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


def json_response(obj, status: int = 200) -> Response:
    return Response(dumps(obj).encode(), status_code=status, media_type="application/json")


class ClientGone(Exception):
    """The HTTP client disconnected; its gRPC calls were cancelled."""


async def _disconnected(receive) -> None:
    """Returns once the client has gone (the body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive, coro):
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
            await unless_disconnected(receive, pump())
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


def error_response(exc: ApiError) -> Response:
    return Response(exc.json_bytes(), status_code=exc.status, media_type="application/json")




def _bad_unicode(obj, path: str = "") -> str | None:
    """The JSON path of the first string (or key) that is not valid Unicode, else None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(obj, list):
        for i, x in enumerate(obj):
            bad = _bad_unicode(x, f"{path}[{i}]")
            if bad:
                return bad
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad = _bad_unicode(k, path or "body") or _bad_unicode(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    return None


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
    bad = _bad_unicode(data)
    if bad:
        raise ApiError(400, f"`{bad}` is not valid Unicode (a lone surrogate?)", bad, "invalid_unicode")
    return data





def endpoint(fn):
    """An HTTP handler whose errors answer in OpenAI's shape (ApiError, upstream gRPC codes, a client
    gone: 499, a bug: 500)."""
    import grpc

    from services.gateway import openai_api as api

    async def wrapped(request: Request):
        try:
            return await fn(request)
        except ApiError as exc:
            return error_response(exc)
        except grpc.aio.AioRpcError as exc:
            return error_response(api.from_rpc(exc))
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:   # a bug here: still OpenAI's shape
            log.exception("gateway_error", path=request.url.path)
            return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None,
                                           "internal_error"))
    wrapped.__name__ = fn.__name__
    return wrapped
