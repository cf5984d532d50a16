"""Python SDK of the peftserve gRPC API: Client (blocking) and AsyncClient (asyncio).

Needs grpcio and protobuf only; results are plain frozen dataclasses, failures one exception tree::

    with Client("127.0.0.1:50051", timeout=30) as client:
        print(client.generate("Hello", adapter_id="acme/support", max_new_tokens=32).text)
        for chunk in client.generate_stream("Hello", temperature=0.7, seed=1):
            print(chunk.text, end="")
        client.upload_adapter("out/support-lora", "support")  # admin scope: the caller's tenant
        for status in client.iter_adapters():
            print(status.adapter_id, status.manifest.version, status.tier)

Over TLS: Client("host:50051", ca_file="ca.pem"), plus cert_file= and key_file= for mutual TLS.
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
    AdapterFile,
    AdapterManifest,
    AdapterPage,
    AdapterStatus,
    FinishReason,
    GenerateResult,
    ModelInfo,
    PrefixCacheStats,
    StreamChunk,
    Tier,
    TokenizeResult,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFile",
    "AdapterManifest",
    "AdapterPage",
    "AdapterStatus",
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
    "PrefixCacheStats",
    "NotFound",
    "PeftServeError",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamChunk",
    "Tier",
    "TokenizeResult",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
