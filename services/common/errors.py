"""Domain exceptions and the one place that maps them to gRPC status codes.

Cores raise these; `ErrorInterceptor` (installed by `create_server`) turns them into status codes
with the exception's message, so servicers never call `context.abort` for expected conditions.
"""

from __future__ import annotations

import inspect

import grpc
import structlog

log = structlog.get_logger(__name__)


class OpenLoraError(Exception):
    """Base of every expected error; `code` is its gRPC status."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(OpenLoraError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(OpenLoraError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OpenLoraError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(OpenLoraError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(OpenLoraError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(OpenLoraError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(OpenLoraError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(OpenLoraError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(OpenLoraError):
    """No token, or one the server does not know (services.common.auth)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(OpenLoraError):
    """A known caller asking for what its role does not allow."""

    code = grpc.StatusCode.PERMISSION_DENIED


# Names the domain speaks in; each is one of the codes above.
class InvalidAdapter(InvalidArgument):
    """The adapter's files are malformed (bad config, bad safetensors, pickle weights...)."""


class AdapterNotFound(NotFound):
    """No such adapter id, or no such version."""


class AdapterMismatch(FailedPrecondition):
    """The adapter does not fit this base model (shapes, modules, rank)."""


class QueueFull(ResourceExhausted):
    """Too many requests waiting."""


class Upstream(OpenLoraError):
    """A status from a downstream service, passed through with its code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for any exception: domain errors keep theirs, anything else is INTERNAL."""
    if isinstance(exc, OpenLoraError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("rpc_failed", method=method)
    else:
        log.info("rpc_error", method=method, code=code.name, error=message)
    await context.abort(code, message)


def _wrap(behavior, kind: str, method: str):
    """Wrap one handler behaviour so domain exceptions become status codes."""
    if kind in ("unary_unary", "stream_unary"):
        async def unary(request, context):
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # one place maps them all
                await _abort(context, exc, method)
        return unary

    async def streaming(request, context):
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)
    return streaming


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping any handler to status codes (see `status_of`)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None and _is_async(behavior):
                factory = getattr(grpc, f"{kind}_rpc_method_handler")
                return factory(_wrap(behavior, kind, method),
                               request_deserializer=handler.request_deserializer,
                               response_serializer=handler.response_serializer)
        return handler


def _is_async(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


# The HTTP status of each gRPC code, for the OpenAI-compatible gateway (services/gateway).
# A client's own cancellation is 499 (nginx's "client closed request"); an upstream bug is 502.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 502,
    grpc.StatusCode.UNKNOWN: 502,
    grpc.StatusCode.DATA_LOSS: 502,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.ABORTED: 409,
}
