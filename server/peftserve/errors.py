"""The one error hierarchy of the server; api/status.py maps it to gRPC status codes.

Plain Python (no torch): the scheduler, the servicer and the registry raise these.
"""


class PeftServeError(Exception):
    """Base of every error the server reports to a caller on purpose."""


class InvalidRequest(PeftServeError):
    """The caller sent something it must fix (INVALID_ARGUMENT)."""


class AdapterNotFound(PeftServeError):
    """No adapter with this id is visible to the caller (NOT_FOUND)."""


class AdapterRejected(InvalidRequest):
    """An adapter's files are not something the server can serve exactly (INVALID_ARGUMENT)."""


class CapacityExceeded(PeftServeError):
    """A bounded resource (queue, slots, quota) is full; retry later (RESOURCE_EXHAUSTED)."""


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
