"""`openlora gateway`: the OpenAI-compatible HTTP front door (Starlette on uvicorn, gRPC behind).

The app, by concern: transport.py (JSON in, errors and events out, metrics), upstream.py (the router
and registry channels, the base model), generate.py (completions and chat), models.py (/v1/models and
the tokenizer routes), admin.py (load/unload_lora_adapter). Every error is OpenAI's
{"error": {...}} with the HTTP status of the upstream gRPC code (services.common.errors.HTTP_STATUS).
--tls-ca/--tls-cert/--tls-key secure the gRPC channels; --tls-cert/--tls-key also serve HTTPS (and
--tls-ca then requires client certificates).
"""

from __future__ import annotations

import socket

import grpc
import structlog
from grpc_health.v1 import health_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from services.gateway.admin import Admin
from services.gateway.config import GatewayConfig
from services.gateway.generate import Completions
from services.gateway.models import Models
from services.gateway.openai_api import ApiError
from services.gateway.transport import MetricsMiddleware, endpoint, error_response, json_response, read_json
from services.gateway.upstream import Gateway

log = structlog.get_logger(__name__)

__all__ = ["Gateway", "build_app", "http_server", "read_json", "serve"]


def build_app(gw: Gateway) -> Starlette:
    cfg = gw.config
    gen, models = Completions(gw), Models(gw)
    admin = Admin(gw, models)

    @endpoint
    async def completions(request):
        return await gen.generate(request, "/v1/completions", await read_json(request, cfg.max_body_bytes),
                                  chat=False)

    @endpoint
    async def chat_completions(request):
        return await gen.generate(request, "/v1/chat/completions",
                                  await read_json(request, cfg.max_body_bytes), chat=True)

    async def health_live(request):
        return json_response({"status": "ok"})

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
        return json_response({"status": "ready", "router": cfg.router})

    async def metrics(request):
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request, exc):
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}", None,
                                       "not_found"))

    async def not_allowed(request, exc):
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                       "method_not_allowed"))

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", endpoint(models.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(models.get_model), methods=["GET"]),
        Route("/v1/load_lora_adapter", endpoint(admin.load_lora_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", endpoint(admin.unload_lora_adapter), methods=["POST"]),
        Route("/tokenize", endpoint(models.tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(models.detokenize), methods=["POST"]),
        Route("/tokenizer_info", endpoint(models.tokenizer_info), methods=["GET"]),
        Route("/version", endpoint(models.version), methods=["GET"]),
        Route("/health", health_live, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: not_allowed})
    app.add_middleware(MetricsMiddleware, metrics=gw.metrics)
    return app


def http_server(gw: Gateway, app):
    """-> (uvicorn server, its bound socket, its URL) for gw.config's host and port."""
    import uvicorn

    from services.common.server import StartupError
    config = gw.config
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
        app, http="httptools", lifespan="off", access_log=False, log_config=None,
        log_level=config.log_level, timeout_graceful_shutdown=int(config.grace_seconds) or None, **tls))
    return server, sock, f"{'https' if tls else 'http'}://{config.host}:{port}"


async def serve(config: GatewayConfig) -> None:
    gw = Gateway(config)
    await gw.learn_base(timeout=2.0)
    server, sock, url = http_server(gw, build_app(gw))
    log.info("gateway_listening", url=url, router=config.router,
             registry=config.registry, base_model=gw.base_name or "(not known yet)")
    try:
        await server.serve(sockets=[sock])
    finally:
        await gw.close()
        log.info("stopped")
