"""The one mapping from peftserve.errors to gRPC status codes."""

from __future__ import annotations

import logging

import grpc
import pytest

from peftserve import errors
from peftserve.api.status import INTERNAL_MESSAGE, status_of


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.AdapterRejected("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.AdapterNotFound("bad"), grpc.StatusCode.NOT_FOUND),
        (errors.CapacityExceeded("bad"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.FailedPrecondition("bad"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unavailable("bad"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unauthenticated("bad"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied("bad"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_domain_errors_keep_their_message(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_of(exc) == (code, "bad")


def test_every_domain_error_class_is_mapped() -> None:
    leaves = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.PeftServeError)
    ]
    for klass in leaves:
        if klass is errors.PeftServeError:
            continue
        code, message = status_of(klass("x"))
        assert message == "x", klass  # mapped on purpose, not the generic fallback
        if klass is not errors.EngineFailure:  # the server's own failure is the one INTERNAL
            assert code != grpc.StatusCode.INTERNAL, klass


def test_unexpected_errors_are_internal_with_a_generic_message(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code, message = status_of(KeyError("secret detail"))
    assert (code, message) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert "secret detail" not in message
    assert caplog.records and caplog.records[0].exc_info is not None
