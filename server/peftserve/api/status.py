"""The one mapping from peftserve.errors to gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from peftserve import errors

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error (see the server log)"

_CODES: dict[type[errors.PeftServeError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    errors.CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.EngineFailure: grpc.StatusCode.INTERNAL,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for exc; unexpected errors are logged as INTERNAL."""
    for klass in type(exc).__mro__:
        code = _CODES.get(klass)
        if code is not None:
            return code, str(exc)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
