"""Errors behind Ray Serve's gRPC proxy: the same codes and messages as one server, set explicitly.

Ray's proxy turns any exception of a deployment into INTERNAL unless the deployment sets a code on
the gRPC context it passes. The ingress sets it here: peftserve errors through api/status.py's one
mapping, Ray's own failures (a replica that died, a full queue, a cancelled call) as the retryable
codes they are.
"""

from __future__ import annotations

import asyncio
import math
from typing import NoReturn

from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.grpc_util import RayServegRPCContext

from peftserve.api.status import RETRY_AFTER_TRAILER, status_of
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


def is_cancellation(exc: BaseException) -> bool:
    return isinstance(cause_of(exc), (asyncio.CancelledError, TaskCancelledError))


def fail(context: RayServegRPCContext, exc: BaseException) -> NoReturn:
    """End the RPC with exc's status: set on Ray's context, then raised so the proxy sends it."""
    error = as_peftserve_error(exc)
    code, message = status_of(error)
    context.set_code(code)
    context.set_details(message)
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        context.set_trailing_metadata([(RETRY_AFTER_TRAILER, str(max(1, math.ceil(retry_after_s))))])
    raise error
