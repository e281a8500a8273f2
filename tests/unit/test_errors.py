"""The one error taxonomy: every exception maps to one gRPC status, and back on the client side."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import grpc
import pytest

from logitfusion import errors
from logitfusion.engine.runner import RunnerError, RunnerUnavailable

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.InvalidRequest("max_new_tokens: 0 is below 1"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.MessageTooLarge("request: 5 bytes exceed max_message_bytes 4"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Overloaded("max_concurrent_requests (2) reached"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded("request_timeout_s (1.0) passed"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled("gone"), grpc.StatusCode.CANCELLED),
        (errors.ModelUnavailable("worker large died"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.NotFound("service x"), grpc.StatusCode.NOT_FOUND),
        (ValueError("sampling.top_p: 1.5 is outside (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
        (RunnerUnavailable("stream to expert_a broken"), grpc.StatusCode.UNAVAILABLE),
        (RunnerError("bad op"), grpc.StatusCode.INTERNAL),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (concurrent.futures.TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (asyncio.CancelledError(), grpc.StatusCode.CANCELLED),
        (KeyError("oops"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_exception_maps_to_one_code(exc, code):
    got, details = errors.to_status(exc)
    assert got == code
    assert details


def test_value_error_keeps_its_field_naming_message():
    code, details = errors.to_status(ValueError("sampling.temperature: nan is not finite"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "sampling.temperature: nan is not finite"


def test_internal_errors_hide_the_exception_text_and_log_the_stack(caplog):
    with caplog.at_level(logging.ERROR, logger="logitfusion.errors"):
        code, details = errors.to_status(KeyError("/secret/path"))
    assert code == grpc.StatusCode.INTERNAL
    assert "/secret/path" not in details and "KeyError" in details
    assert any(r.exc_info for r in caplog.records)


def test_details_are_clipped():
    _, details = errors.to_status(errors.InvalidRequest("x" * 10_000))
    assert len(details) <= errors.MAX_DETAILS_CHARS


def test_invalid_request_is_a_value_error_and_keeps_the_field():
    e = errors.InvalidRequest("stop[0]: empty", field="stop[0]")
    assert isinstance(e, ValueError) and e.field == "stop[0]" and str(e) == "stop[0]: empty"


@pytest.mark.parametrize(
    "code, details, cls",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "x", errors.InvalidRequest),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "max_concurrent_requests (2) reached", errors.Overloaded),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "request: 9 bytes exceed max_message_bytes (4)", errors.MessageTooLarge),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 4)", errors.MessageTooLarge),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", errors.DeadlineExceeded),
        (grpc.StatusCode.UNAVAILABLE, "x", errors.ModelUnavailable),
        (grpc.StatusCode.UNAUTHENTICATED, "x", errors.Unauthenticated),
        (grpc.StatusCode.UNKNOWN, "x", errors.InternalError),
        (grpc.StatusCode.INTERNAL, "", errors.InternalError),
    ],
)
def test_status_back_to_exception(code, details, cls):
    e = errors.from_status(code, details)
    assert type(e) is cls
    assert e.code == code or cls is errors.InternalError
    assert str(e) == (details or code.name)


def test_round_trip_for_every_class():
    for cls in (errors.InvalidRequest, errors.Overloaded, errors.DeadlineExceeded, errors.Cancelled,
                errors.ModelUnavailable, errors.Unauthenticated, errors.NotFound, errors.InternalError):
        code, details = errors.to_status(cls("limit 3"))
        assert type(errors.from_status(code, details)) is cls
