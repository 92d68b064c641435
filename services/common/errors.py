"""Domain exceptions and the one place that maps them to gRPC status codes.

Cores raise these; `ErrorInterceptor` (installed by `create_server`) turns them into status codes
with the exception's message, so servicers never call `context.abort` for expected conditions.
"""

from __future__ import annotations

import inspect
import re

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

log = structlog.get_logger(__name__)


class OpenLoraError(Exception):
    """Base of every expected error; `code` is its gRPC status."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, *args, field: str | None = None):
        super().__init__(*args)
        # The request field at fault, sent as a google.rpc.BadRequest detail (see `status_details`).
        self.field = field


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


# The `domain` of every google.rpc.ErrorInfo this project sends.
ERROR_DOMAIN = "openlora.dev"
# The trailer gRPC clients read structured details from (grpcio-status, grpc-js, grpc-go's status).
DETAILS_KEY = "grpc-status-details-bin"
_LEADING_WORD = re.compile(r"([a-z][a-z0-9_]*)\b")


def _snake_upper(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _request_fields() -> frozenset[str]:
    """Every field name of the openlora.v1 messages: what a message's leading word may name."""
    from services.common.gen.openlora.v1 import common_pb2, executor_pb2, registry_pb2, router_pb2
    names: set[str] = set()
    for module in (common_pb2, executor_pb2, registry_pb2, router_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            names.update(f.name for f in message.fields)
    return frozenset(names)


_FIELDS: frozenset[str] | None = None


def field_of(exc: BaseException) -> str | None:
    """The request field an INVALID_ARGUMENT names: the exception's `field`, else the message's
    leading word when that is a field of the API ("max_new_tokens must be >= 1" -> max_new_tokens)."""
    global _FIELDS
    field = getattr(exc, "field", None)
    if field or not isinstance(exc, InvalidArgument):
        return field
    if _FIELDS is None:
        _FIELDS = _request_fields()
    match = _LEADING_WORD.match(str(exc))
    return match.group(1) if match and match.group(1) in _FIELDS else None


def status_details(exc: BaseException, method: str) -> status_pb2.Status:
    """The google.rpc.Status sent beside the code and message: an ErrorInfo always (reason is the
    exception's class in UPPER_SNAKE, e.g. ADAPTER_NOT_FOUND; for a passed-through status, the
    code's name), a RetryInfo when the error says when to retry, and a BadRequest naming the field
    when one is known."""
    code, message = status_of(exc)
    if isinstance(exc, OpenLoraError) and type(exc) is not Upstream:
        reason = _snake_upper(type(exc).__name__)
    else:
        reason = code.name
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN,
                                       metadata={"method": method})
    details = [info]
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after_s * 1e9))
        details.append(retry)
    field = field_of(exc)
    if field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("rpc_failed", method=method)
    else:
        log.info("rpc_error", method=method, code=code.name, error=message)
    status = status_details(exc, method)
    # keep what the handler already set (the router's retry-after-ms hint): abort's replaces it
    kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k != DETAILS_KEY)
    await context.abort(code, message,
                        trailing_metadata=(*kept, (DETAILS_KEY, status.SerializeToString())))


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

    if inspect.iscoroutinefunction(behavior):
        # A streaming handler written with `await context.write(...)` (grpc's health Watch): a
        # coroutine, not an async generator, so it is awaited, never iterated.
        async def writing(request, context):
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)
        return writing

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
