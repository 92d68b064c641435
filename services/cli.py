"""The `openlora` command: one subcommand per service, plus up / adapters / generate / bench.

Every flag also reads `OPENLORA_<FLAG>`. A bad flag or environment value prints one line naming it
and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import importlib
import sys

from services.common.config import ConfigError, OneLineParser, add_flags, from_args
from services.executor.config import ExecutorConfig
from services.gateway.config import GatewayConfig
from services.registry.config import RegistryConfig
from services.router.config import RouterConfig

# subcommand -> (config class, "module:function" that serves it)
SERVERS = {
    "registry": (RegistryConfig, "services.registry.app:serve"),
    "executor": (ExecutorConfig, "services.executor.app:serve"),
    "router": (RouterConfig, "services.router.app:serve"),
    "gateway": (GatewayConfig, "services.gateway.app:serve"),
}
# subcommands whose implementation parses its own arguments: "module:function(argv) -> exit code"
TOOLS = {
    "up": "services.up:main",
    "adapters": "services.registry.admin:main",
    "generate": "services.client:generate_main",
    "bench": "services.client:bench_main",
}


def _resolve(target: str, what: str):
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise SystemExit(f"openlora {what}: not available in this build yet") from None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="openlora", description="Serve many LoRA adapters over one base model.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (cls, _) in SERVERS.items():
        add_flags(sub.add_parser(name, help=f"run the {name} service"), cls)
    for name in TOOLS:
        p = sub.add_parser(name, help=f"{name} (see `openlora {name} --help`)", add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A process that imported torch spends about a second of its exit in the interpreter's last
    # collection over torch's objects: freeze them instead, so a stopped service is gone at once.
    atexit.register(gc.freeze)
    if argv and argv[0] in SERVERS:
        from services.common.server import defer_signals
        defer_signals()
    if argv and argv[0] in TOOLS:
        return _resolve(TOOLS[argv[0]], argv[0])(argv[1:])
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        cls, target = SERVERS[ns.command]
        config = from_args(cls, ns)
        loop_factory = event_loop_factory(config.event_loop)
    except ConfigError as exc:
        print(f"openlora {argv[0] if argv else ''}: error: {exc}", file=sys.stderr)
        return 2
    # logging first: importing a service may log (the executor's first kernel build does), and a
    # record before configure_logging came out as console text, not JSON with its `service`
    from services.common.logging import configure_logging
    configure_logging(config.log_level)
    serve = _resolve(target, ns.command)
    from services.common.server import StartupError
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(config))
    except StartupError as exc:
        print(f"openlora {ns.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def event_loop_factory(choice: str):
    """--event-loop: uvloop's loop factory, or None (asyncio's own loop). auto: uvloop where it is
    installed (a dependency on Linux and macOS; asyncio elsewhere)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
