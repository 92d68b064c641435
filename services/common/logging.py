"""structlog set-up: JSON lines on stderr, with request ids bound through contextvars."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str = "info", json: bool = True) -> None:
    """Route structlog and stdlib logging through one JSON renderer on stderr."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    service = os.environ.get("OPENLORA_LOG_SERVICE", "")

    def add_service(_logger, _name, event: dict) -> dict:
        # which process wrote the line when several share a terminal or a log pipeline (`openlora up`)
        if service:
            other = event.get("service")
            if other is not None and other != service:
                event["grpc_service"] = other         # a record naming the gRPC service it is about
            event["service"] = service
        return event

    processors = [
        structlog.contextvars.merge_contextvars,
        add_service,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # one write() per record (message + newline together, under a lock): print() writes the
        # newline separately, so two threads' records could share a line
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors[:4]]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)


def bind_request(request_id: str, **fields) -> None:
    """Attach request_id (and more) to every log line of the current task/thread."""
    structlog.contextvars.bind_contextvars(request_id=request_id, **fields)


def clear_request() -> None:
    structlog.contextvars.clear_contextvars()
