"""Ray's failures as peftserve errors, so api/status.py's one mapping gives callers their codes.

Ray's proxy turns any exception of a deployment into INTERNAL unless the deployment sets a code on
the gRPC context it passes; the ingress sets it through the servicers (ingress.RayContext). What
reaches them from a replica is unwrapped here: peftserve errors as raised, a replica that died as
UNAVAILABLE, a full queue as RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from peftserve.errors import CapacityExceeded, PeftServeError, Unavailable

REPLICA_LOST = "the replica serving this request stopped; retry the request"
NO_REPLICA = "no replica is available right now; retry the request"
QUEUE_FULL = "every replica is busy and the cluster's queue is full; retry later"


def cause_of(exc: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's RayTaskError wrapping (the error itself otherwise)."""
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) and exc.cause is not exc:
        exc = exc.cause
    return exc


def as_peftserve_error(exc: BaseException) -> BaseException:
    """A Ray failure as the peftserve error a caller should see; peftserve errors unwrapped; else as is."""
    exc = cause_of(exc)
    if isinstance(exc, PeftServeError):
        return exc
    if isinstance(exc, BackPressureError):
        return CapacityExceeded(QUEUE_FULL, retry_after_s=1.0)
    if isinstance(exc, (DeploymentUnavailableError, ReplicaUnavailableError)):
        return Unavailable(NO_REPLICA)
    if isinstance(exc, RayActorError):  # ActorDiedError, ActorUnavailableError: the replica went away
        return Unavailable(REPLICA_LOST)
    return exc
