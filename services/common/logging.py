"""structlog set-up: JSON lines on stderr, with request ids bound through contextvars."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", json: bool = True) -> None:
    """Route structlog and stdlib logging through one JSON renderer on stderr."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors[:3]]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)


def bind_request(request_id: str, **fields) -> None:
    """Attach request_id (and more) to every log line of the current task/thread."""
    structlog.contextvars.bind_contextvars(request_id=request_id, **fields)


def clear_request() -> None:
    structlog.contextvars.clear_contextvars()
