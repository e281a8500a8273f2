"""One error taxonomy for the whole service, mapped to gRPC status codes in exactly one place.

Code anywhere below the edge raises either one of the ``FusionError`` subclasses below or a plain ``ValueError``
whose message names the field and the limit (the fusion, sampling and decoder validation do that). The serving edge
calls :func:`to_status` to turn any exception into ``(grpc.StatusCode, details)``; the client calls
:func:`from_rpc_error` to turn a status back into the same exception class. Nothing else maps errors to codes.

    InvalidRequest    -> INVALID_ARGUMENT     a field is malformed or out of range (ValueError maps here too)
    MessageTooLarge   -> RESOURCE_EXHAUSTED   the request message exceeds max_message_bytes
    Overloaded        -> RESOURCE_EXHAUSTED   max_concurrent_requests already running; refused at once
    DeadlineExceeded  -> DEADLINE_EXCEEDED    the client's deadline or the request timeout passed
    Cancelled         -> CANCELLED            the client went away
    ModelUnavailable  -> UNAVAILABLE          a model worker is gone and could not be recovered
    ShuttingDown      -> UNAVAILABLE          the server drains for shutdown; the details say "retry in N s"
    Unauthenticated   -> UNAUTHENTICATED      missing or wrong token
    NotFound          -> NOT_FOUND            e.g. an unknown service name in a health check
    InternalError     -> INTERNAL             a bug: the details never carry a stack trace

The HTTP ingress maps the same classes to HTTP status codes, here beside the gRPC mapping (:func:`to_http`):
400 invalid, 413 too large, 429 overloaded, 504 deadline, 499 cancelled, 503 unavailable, 401 unauthenticated,
404 not found, 500 internal. The message is the same text gRPC clients get.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
from typing import ClassVar

import grpc

from logitfusion.engine.runner import RunnerError, RunnerUnavailable

logger = logging.getLogger(__name__)

MAX_DETAILS_CHARS = 1024  # status details travel in HTTP/2 trailers: keep them short
_RETRY_HINT = re.compile(r"retry in ([0-9]+(?:\.[0-9]+)?) s")  # ShuttingDown's hint in the status details


class FusionError(Exception):
    """Base of every error the service reports to a client. ``field`` names the request field at fault, if any."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidRequest(FusionError, ValueError):
    """A request field is malformed or out of range. The message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class MessageTooLarge(FusionError):
    """The request message is larger than the deployment accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(FusionError):
    """The deployment already runs as many requests as configured. Nothing was started; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(FusionError, TimeoutError):
    """The client's deadline or the deployment's request timeout passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FusionError):
    """The client cancelled or disconnected."""

    code = grpc.StatusCode.CANCELLED


class ModelUnavailable(FusionError):
    """A model worker is gone and could not be recovered."""

    code = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(ModelUnavailable):
    """The server is draining for shutdown: new requests are refused, and requests still running when
    serve.drain_timeout_s passes are cancelled. Retryable: the message says "retry in <retry_after_s> s" (Serve's
    gRPC proxy passes a failed call's code and details on, not its trailing metadata, so the hint is in the text;
    from_status reads it back)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0, field: str | None = None):
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class Unauthenticated(FusionError):
    """The request carried no token or a wrong one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(FusionError):
    """The named thing (e.g. a health-check service) does not exist here."""

    code = grpc.StatusCode.NOT_FOUND


class InternalError(FusionError):
    """Something the server did not expect. Logged with its stack on the server; the client sees only the message."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(ValueError):
    """A topology or start-up check failed (bad YAML, models whose vocabularies differ). Never sent to clients."""


_BY_CODE: dict[grpc.StatusCode, type[FusionError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,  # refined by the message below
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: ModelUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAILS_CHARS else text[: MAX_DETAILS_CHARS - 3] + "..."


def classify(exc: BaseException) -> FusionError:
    """Any exception -> the FusionError a client should see. The one mapping of the service."""
    if isinstance(exc, FusionError):
        return exc
    if isinstance(exc, ValueError):  # Decoder / Recipe / SamplingParams validation: the message names the field
        return InvalidRequest(str(exc))
    if isinstance(exc, RunnerUnavailable):
        return ModelUnavailable(f"a model worker is unavailable: {exc}")
    if isinstance(exc, (TimeoutError, concurrent.futures.TimeoutError)):
        return DeadlineExceeded(str(exc) or "deadline exceeded")
    if isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        return Cancelled("the request was cancelled")
    if isinstance(exc, RunnerError):
        return InternalError(f"a model worker refused a step: {exc}")
    return InternalError(f"internal error ({type(exc).__name__})")


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Any exception -> (status code, details) for the wire. Unexpected errors are logged here with their stack."""
    err = classify(exc)
    if isinstance(err, InternalError) and err is not exc:
        logger.error("unexpected error mapped to INTERNAL", exc_info=exc)
    return err.code, _clip(err.message)


_HTTP_BY_CLASS: tuple[tuple[type[FusionError], int, str], ...] = (  # first match wins: subclasses first
    (MessageTooLarge, 413, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (Overloaded, 429, "rate_limit_error"),
    (DeadlineExceeded, 504, "timeout_error"),
    (Cancelled, 499, "cancelled"),
    (ModelUnavailable, 503, "service_unavailable"),
    (Unauthenticated, 401, "authentication_error"),
    (NotFound, 404, "not_found_error"),
    (InternalError, 500, "internal_error"),
)


def to_http(exc: BaseException) -> tuple[int, str, FusionError]:
    """Any exception -> (HTTP status, OpenAI error type, the FusionError) for the HTTP ingress; the same
    classification (and logging of unexpected errors) as :func:`to_status`."""
    err = classify(exc)
    if isinstance(err, InternalError) and err is not exc:
        logger.error("unexpected error mapped to HTTP 500", exc_info=exc)
    for cls, status, kind in _HTTP_BY_CLASS:
        if isinstance(err, cls):
            return status, kind, err
    return 500, "internal_error", err


def from_status(code: grpc.StatusCode, details: str) -> FusionError:
    """(status code, details) from the wire -> the matching FusionError (client side)."""
    cls = _BY_CODE.get(code, InternalError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and ("max_message_bytes" in details or "larger than max" in details):
        cls = MessageTooLarge
    if code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details:
        hint = _RETRY_HINT.search(details)
        return ShuttingDown(details, retry_after_s=float(hint.group(1)) if hint else 1.0)
    return cls(details or code.name)


def from_rpc_error(err: grpc.RpcError) -> FusionError:
    """A grpc.RpcError raised by a stub call -> the matching FusionError, keeping the original as __cause__."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    out = from_status(code, details or "")
    out.__cause__ = err
    return out
