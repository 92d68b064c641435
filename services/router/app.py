"""`openlora router`: the one endpoint clients use."""

from __future__ import annotations

from services.common.gen.openlora.v1 import router_pb2_grpc
from services.common.server import Service, create_server
from services.common.tls import ClientSecurity
from services.router.config import RouterConfig
from services.router.limits import TenantLimits
from services.router.discovery import ExecutorPool
from services.router.registry_check import AdapterCheck
from services.router.servicer import RouterServicer

SERVICE = "openlora.v1.Router"


async def build(config: RouterConfig):
    """The router answers SERVING only while at least one executor is healthy."""
    security = ClientSecurity.from_config(config)
    pool = ExecutorPool(config.executor, poll_interval_s=config.poll_interval_s, security=security)
    limits = TenantLimits(config.tenant_rate, config.tenant_burst, config.tenant_max_concurrent)
    servicer = RouterServicer(pool, AdapterCheck(config.registry, security=security),
                              prefix_affinity=config.prefix_affinity, limits=limits)
    server, port = await create_server(
        config, [Service(SERVICE, servicer, router_pb2_grpc.add_RouterServicer_to_server)],
        serving=False)

    async def on_poll(views) -> None:
        await server.set_serving(any(v.healthy for v in views))

    pool.on_poll = on_poll
    await pool.start()
    await server.start()
    return server, servicer


async def serve(config: RouterConfig) -> None:
    server, servicer = await build(config)
    try:
        await server.run_until_signal(config.grace_seconds)
    finally:
        await servicer.pool.close()
        await servicer.adapters.close()
