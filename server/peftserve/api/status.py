"""The one mapping from peftserve.errors to gRPC status codes."""

from __future__ import annotations

import logging
import math
from typing import NoReturn

import grpc

from peftserve import errors
from peftserve_client.errors import RETRY_AFTER_TRAILER

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error (see the server log)"
MAX_MESSAGE_CHARS = 1024
"""Longest status message sent: a last bound, behind errors.quote at every place that echoes input."""

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


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a caller sees for exc (INTERNAL for anything outside the hierarchy)."""
    for klass in type(exc).__mro__:
        code = _CODES.get(klass)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for exc; unexpected errors are logged as INTERNAL."""
    if not isinstance(exc, errors.PeftServeError):
        logger.error("unexpected error while serving a request", exc_info=exc)
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    message = str(exc)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return code_of(exc), message


def retry_after(exc: BaseException) -> str | None:
    """Whole seconds (at least 1) after which a retry may succeed, when exc carries a hint."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    return None if retry_after_s is None else str(max(1, math.ceil(retry_after_s)))


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the RPC with exc's status (status_of), and a retry-after trailer when exc carries one."""
    code, message = status_of(exc)
    seconds = retry_after(exc)
    if seconds is not None:
        context.set_trailing_metadata(((RETRY_AFTER_TRAILER, seconds),))
    await context.abort(code, message)
