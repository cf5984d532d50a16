"""Frozen, validated configuration of the engine and the server."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftserve.errors import InvalidRequest

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes the engine: model, device, memory and batching budgets."""

    model: str = "default"
    """'default' (the embedded model) or a local Hugging Face model directory."""
    device: str = "cpu"
    """'cpu' or 'cuda' (or 'cuda:N')."""
    dtype: str = "auto"
    """auto: float32 on CPU, bfloat16 on CUDA; or float32|bfloat16|float16."""
    kv_cache_mb: float = 512.0
    """Memory for the paged KV cache; the block budget is derived from it."""
    block_size: int = 16
    """Tokens per KV block."""
    max_batched_tokens: int = 1024
    """Tokens (prefill and decode together) processed in one engine step."""
    max_running: int = 64
    """Requests decoding at once."""
    max_queue: int = 1024
    """Requests waiting for admission; beyond it new requests are RESOURCE_EXHAUSTED."""
    max_new_tokens_limit: int = 2048
    """Upper bound a request may ask for in max_new_tokens."""
    max_context: int | None = None
    """Longest prompt plus completion; None takes the model's max_position_embeddings."""
    threads: int | None = None
    """torch intra-op threads on CPU; None keeps torch's default."""
    adapter_slots: int = 32
    """LoRA / sparse adapters resident on the device at once (prefix adapters need no slot)."""
    adapters: tuple[tuple[str, str], ...] = ()
    """Adapters registered at start: (id, PEFT directory) pairs."""
    store: str | None = None
    """Adapter store root scanned at start (every PEFT directory below it); None skips it."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequest(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        positive = ("block_size", "max_batched_tokens", "max_running", "max_queue", "max_new_tokens_limit", "adapter_slots")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidRequest(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kv_cache_mb <= 0:
            raise InvalidRequest(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the gRPC server listens."""

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int | None = None
    """Prometheus endpoint port; None disables it."""
    grace_s: float = 30.0
    """On SIGTERM, seconds in-flight requests get to finish before they are cancelled."""
    engine: EngineConfig = field(default_factory=EngineConfig)
