"""The one error hierarchy of the server; api/status.py maps it to gRPC status codes, api/http to HTTP.

Plain Python (no torch): the scheduler, the servicer and the registry raise these.
"""

from __future__ import annotations

QUOTE_CHARS = 64
"""Most characters of a caller's input that an error message repeats."""


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr() of something a caller sent, cut to `limit` characters so errors never echo large input."""
    text = str(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    shown = repr(text[:limit]) if isinstance(value, str) else text[:limit]
    return f"{shown}... ({len(text)} characters)"


class PeftServeError(Exception):
    """Base of every error the server reports to a caller on purpose."""


class InvalidRequest(PeftServeError):
    """The caller sent something it must fix (INVALID_ARGUMENT)."""


class NonFiniteOutput(InvalidRequest):
    """This request's own logits became NaN or Inf (its adapter or mixture overflows on its input).

    Rows of a batch never mix, so no other request is affected; retrying the same request fails the
    same way (INVALID_ARGUMENT).
    """


class AdapterNotFound(PeftServeError):
    """No adapter with this id is visible to the caller (NOT_FOUND)."""


class AdapterRejected(InvalidRequest):
    """An adapter's files are not something the server can serve exactly (INVALID_ARGUMENT)."""


class CapacityExceeded(PeftServeError):
    """A bounded resource (queue, slots, quota) is full; retry later (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """When a retry may succeed, if known (gRPC `retry-after` trailer, HTTP Retry-After)."""


class PayloadTooLarge(CapacityExceeded):
    """A request or upload is larger than the server accepts (RESOURCE_EXHAUSTED; HTTP 413)."""


class FailedPrecondition(PeftServeError):
    """The request is well formed but the system is not in a state to run it (FAILED_PRECONDITION)."""


class Unavailable(PeftServeError):
    """The server is starting or draining (UNAVAILABLE)."""


class Unauthenticated(PeftServeError):
    """No valid credentials were presented (UNAUTHENTICATED)."""


class PermissionDenied(PeftServeError):
    """The credentials lack the scope this call needs (PERMISSION_DENIED)."""


class EngineFailure(PeftServeError):
    """The engine failed for reasons that are not the caller's (INTERNAL; details in the server log)."""
