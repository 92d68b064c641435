"""`openlora router`: the one endpoint clients use."""

from __future__ import annotations

import structlog

from services.common.gen.openlora.v1 import router_pb2_grpc
from services.common.server import Service, create_server
from services.common.tls import ClientSecurity
from services.router.config import RouterConfig
from services.router.discovery import ExecutorPool
from services.router.limits import TenantLimits
from services.router.metrics import RouterMetrics
from services.router.registry_check import AdapterCheck
from services.router.servicer import RouterServicer

log = structlog.get_logger(__name__)
SERVICE = "openlora.v1.Router"


async def build(config: RouterConfig, resolve=None):
    """The router answers SERVING only while at least one executor is healthy.
    resolve: an alternative DNS resolver (tests)."""
    extra = {"resolve": resolve} if resolve is not None else {}
    security = ClientSecurity.from_config(config)
    pool = ExecutorPool(config.executor, poll_interval_s=config.poll_interval_s,
                        timeout_s=config.status_timeout_s, resolve_interval_s=config.resolve_interval_s,
                        sent_ttl_s=config.sent_adapter_ttl_s, security=security, **extra)
    check = AdapterCheck(config.registry, ttl_s=config.adapter_check_ttl_s, on_deleted=pool.forget_adapter,
                         security=security)
    metrics = RouterMetrics(pool)
    limits = TenantLimits(config.tenant_rate, config.tenant_burst, config.tenant_max_concurrent)
    servicer = RouterServicer(pool, check, prefix_affinity=config.prefix_affinity, metrics=metrics,
                              limits=limits, multiplex_streams=config.multiplex_streams)
    server, port = await create_server(
        config, [Service(SERVICE, servicer, router_pb2_grpc.add_RouterServicer_to_server)],
        serving=False)

    async def on_poll(views) -> None:
        await server.set_serving(any(v.healthy for v in views))

    pool.on_poll = on_poll
    check.start()
    await pool.start()
    if config.metrics_port:
        metrics.serve_http(config.host, config.metrics_port)
    await server.start()
    log.info("router_serving", port=port, metrics_port=config.metrics_port or None)
    return server, servicer


async def serve(config: RouterConfig) -> None:
    server, servicer = await build(config)
    http = None
    if config.http_port:     # the OpenAI API in this process: HTTP -> placement -> an executor
        from services.router.openai_http import start_http
        http = await start_http(config, servicer)
    try:
        await server.run_until_signal(config.grace_seconds, on_drain=servicer.drain)
    finally:
        if http is not None:
            http_server, task, gw = http
            http_server.should_exit = True
            await task
            await gw.close()
        await servicer.pool.close()
        await servicer.adapters.close()
