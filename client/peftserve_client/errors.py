"""The client's exception tree: one class per gRPC status code the server uses on purpose."""

from __future__ import annotations

import grpc

RETRY_AFTER_TRAILER = "retry-after"
"""Trailing metadata a RESOURCE_EXHAUSTED status may carry: whole seconds before a retry may succeed."""


class PeftServeError(Exception):
    """A failed call; `code` is the gRPC status code name (e.g. 'INVALID_ARGUMENT')."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(PeftServeError):
    """The request must be fixed before it is retried."""


class NotFound(PeftServeError):
    """The named adapter does not exist (or is not visible to this caller)."""


class AlreadyExists(PeftServeError):
    """The resource to create is already there."""


class ResourceExhausted(PeftServeError):
    """The server's queue or a quota is full; retry with backoff (no sooner than `retry_after`)."""

    retry_after: float | None = None
    """Seconds after which the server expects a retry to succeed (its retry-after trailer), if it said."""


class FailedPrecondition(PeftServeError):
    """The server is not in a state to run this request."""


class Unavailable(PeftServeError):
    """The server is unreachable, starting or draining; retry elsewhere or later."""


class DeadlineExceeded(PeftServeError):
    """The call's timeout passed before it completed."""


class Cancelled(PeftServeError):
    """The call was cancelled."""


class Unauthenticated(PeftServeError):
    """No valid api_key was presented."""


class PermissionDenied(PeftServeError):
    """The api_key lacks the scope this call needs."""


class InternalError(PeftServeError):
    """The server failed; not the caller's fault."""


_BY_CODE: dict[grpc.StatusCode, type[PeftServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def from_rpc_error(error: grpc.RpcError) -> PeftServeError:
    """The exception of this tree that stands for a failed gRPC call."""
    # Sync calls raise grpc.Call errors, grpc.aio raises AioRpcError: both have code() and details().
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or code.name
    exc = _BY_CODE.get(code, PeftServeError)(code.name, message)
    if isinstance(exc, ResourceExhausted):
        exc.retry_after = _retry_after(error)
    return exc


def _retry_after(error: grpc.RpcError) -> float | None:
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_AFTER_TRAILER:
            try:
                return float(value)
            except ValueError:
                return None
    return None
