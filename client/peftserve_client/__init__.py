"""Python SDK of the peftserve gRPC API: Client (blocking) and AsyncClient (asyncio).

Needs grpcio and protobuf only; results are plain frozen dataclasses, failures one exception tree::

    with Client("127.0.0.1:50051", timeout=30) as client:
        print(client.generate("Hello", adapter_id="acme/support/v1", max_new_tokens=32).text)
        for chunk in client.generate_stream("Hello", temperature=0.7, seed=1):
            print(chunk.text, end="")
"""

from peftserve_client.async_client import AsyncClient
from peftserve_client.client import Client
from peftserve_client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PeftServeError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from peftserve_client.types import (
    FinishReason,
    GenerateResult,
    ModelInfo,
    StreamChunk,
    TokenizeResult,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FinishReason",
    "GenerateResult",
    "InternalError",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "PeftServeError",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamChunk",
    "TokenizeResult",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
