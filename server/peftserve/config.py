"""Frozen, validated configuration of the engine and the server."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from peftserve.engine.fairness import POLICIES
from peftserve.engine.request import TenantLimits
from peftserve.errors import InvalidRequest
from peftserve.store.staging import MAX_UPLOAD_BYTES

DTYPES = ("auto", "float32", "bfloat16", "float16")
ON_OFF = ("on", "off")
CPU_LINEARS = ("onednn", "torch")
ATTENTIONS = ("cpp", "flex", "sdpa")
WARM_UPS = ("background", "before")


def _user_cache(name: str) -> str:
    """$XDG_CACHE_HOME/peftserve/<name> (~/.cache/peftserve/<name>)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "peftserve", name)


def default_packed_cache() -> str:
    """$PEFTSERVE_PACKED_CACHE, else $XDG_CACHE_HOME/peftserve/packed (~/.cache/peftserve/packed)."""
    return os.environ.get("PEFTSERVE_PACKED_CACHE") or _user_cache("packed")


def default_kernel_cache() -> str:
    """Where our built C++ kernels are kept (peftserve/native.py): $PEFTSERVE_KERNEL_CACHE, else
    $XDG_CACHE_HOME/peftserve/kernels (~/.cache/peftserve/kernels)."""
    return os.environ.get("PEFTSERVE_KERNEL_CACHE") or _user_cache("kernels")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes the engine: model, device, memory and batching budgets."""

    model: str = "default"
    """'default' (the embedded model) or a local Hugging Face model directory."""
    device: str = "cpu"
    """'cpu' or 'cuda' (or 'cuda:N')."""
    dtype: str = "auto"
    """auto: bfloat16 on CUDA and on CPUs with bfloat16 units (AVX512-BF16, AMX), float32 on other
    CPUs (logged, and in ModelInfo); or float32|bfloat16|float16."""
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
    scheduling: str = "fair"
    """Admission order: fair (the tenant that received the least service goes first) or fcfs."""
    tenant_max_queued: int | None = None
    """Default per-tenant limit on waiting requests (an API key may set its own); None: no limit."""
    tenant_max_running: int | None = None
    """Default per-tenant limit on running requests (an API key may set its own); None: no limit."""
    tenant_tokens_per_minute: int | None = None
    """Default per-tenant prompt + max_new_tokens per minute (an API key may set its own); None: no limit."""
    prefix_cache: str = "on"
    """on: full KV blocks of a prompt are reused by later requests of the same tenant and adapter version
    that start with the same tokens (engine/prefix_cache.py); off: every prompt is computed in full."""
    prefix_cache_tenant_share: float | None = None
    """Largest fraction of the KV blocks one tenant's cached prefixes may hold, in (0, 1]; None: no limit."""
    max_new_tokens_limit: int = 2048
    """Upper bound a request may ask for in max_new_tokens."""
    max_context: int | None = None
    """Longest prompt plus completion; None takes the model's max_position_embeddings."""
    threads: int | None = None
    """torch intra-op threads on CPU; None keeps torch's default."""
    cpu_linear: str = "onednn"
    """onednn: the model's Linear layers run on weights packed for oneDNN on CPU, which replace the
    plain ones (1.1-3.6x faster on serving shapes); torch: plain F.linear."""
    attention: str = field(default_factory=lambda: os.environ.get("PEFTSERVE_ATTENTION", "cpp"))
    """cpp (default, or $PEFTSERVE_ATTENTION): on CPU, attention reads each sequence's K/V in place in
    the paged pools, in our C++ kernel (built once per machine, loaded in milliseconds); flex: the same
    with torch's flex attention, compiled once per process; sdpa: each context is gathered first."""
    warm_up: str = field(default_factory=lambda: os.environ.get("PEFTSERVE_WARM_UP", "background"))
    """When the CPU engine compiles attention in place, builds the adapter kernel and packs the Linear
    weights (seconds on a multi-GB model). background (default, or $PEFTSERVE_WARM_UP): the engine serves
    as soon as the weights are loaded, while a low-priority thread does the three; until each is done, a
    step gathers attention, runs the adapters' parallel kernel and runs each layer on whatever weight it
    has, plain or packed (same outputs, up to rounding). before: the engine serves once all are done, at
    full speed from the first request."""
    packed_cache: str = field(default_factory=default_packed_cache)
    """Where packed Linear weights are kept across starts (cpu_linear onednn), or 'off'. The first start
    of a model in a dtype packs them, then writes them there (as many bytes as the weights); later starts
    map them back instead of packing (seconds sooner at full speed on a multi-GB model). Default:
    $PEFTSERVE_PACKED_CACHE, else ~/.cache/peftserve/packed ($XDG_CACHE_HOME/peftserve/packed)."""
    cuda_graphs: bool = False
    """CUDA only: replay pure decode steps from graphs captured per batch-size bucket (runner/graphs.py)."""
    adapter_slots: int | None = None
    """Adapters resident on the device at once, of any kind but prefix tuning (which needs no slot);
    None: max_running, so every running request can have an adapter of its own (a step never reads more).
    A slot takes memory once an adapter is loaded into it: its factors in the served dtype."""
    adapters: tuple[tuple[str, str], ...] = ()
    """Adapters registered at start: (id, PEFT directory) pairs; a bare name is the default tenant's."""
    store: str | None = None
    """Adapter store root (<root>/<tenant>/<name>/vN/); its manifests are read at start; None: no store."""
    host_cache_mb: float = 1024.0
    """CPU memory for adapters loaded from disk (LRU; versions in use by requests are never evicted)."""
    adapter_load_threads: int = 2
    """Threads loading adapters from disk, off the engine thread."""
    adapter_max_rank: int = 256
    """Largest adapter rank accepted (kinds without a rank: max_rank * (out + in) entries per module)."""
    adapter_versions_kept: int = 3
    """Versions of each adapter kept in the store; older ones go once no request uses them."""
    max_adapters_per_tenant: int = 1000
    """Adapters one tenant may hold in the store; beyond it uploads are RESOURCE_EXHAUSTED."""
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    """Bytes of all files of one upload; beyond it RESOURCE_EXHAUSTED."""
    adapter_metrics_top_n: int = 20
    """Adapters exported with their own label in per-adapter metrics; the rest count as 'other'."""

    @property
    def slots(self) -> int:
        """The adapter slots the engine builds: adapter_slots, or max_running when unset."""
        return self.adapter_slots or self.max_running

    @property
    def tenant_limits(self) -> TenantLimits:
        """The per-tenant limits every caller gets unless its API key sets its own."""
        return TenantLimits(self.tenant_max_queued, self.tenant_max_running, self.tenant_tokens_per_minute)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequest(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.scheduling not in POLICIES:
            choices = ", ".join(POLICIES)
            raise InvalidRequest(f"scheduling must be one of {choices}, got {self.scheduling!r}")
        try:
            self.tenant_limits  # noqa: B018 - validates the three fields
        except ValueError as exc:
            raise InvalidRequest(f"tenant limits: {exc}") from exc
        if self.prefix_cache not in ON_OFF:
            raise InvalidRequest(f"prefix_cache must be on or off, got {self.prefix_cache!r}")
        share = self.prefix_cache_tenant_share
        if share is not None and not 0.0 < share <= 1.0:
            raise InvalidRequest(f"prefix_cache_tenant_share must be in (0, 1], got {share}")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise InvalidRequest(f"cuda_graphs needs a CUDA device, got device {self.device!r}")
        if self.cpu_linear not in CPU_LINEARS:
            choices = ", ".join(CPU_LINEARS)
            raise InvalidRequest(f"cpu_linear must be one of {choices}, got {self.cpu_linear!r}")
        if self.attention not in ATTENTIONS:
            choices = ", ".join(ATTENTIONS)
            raise InvalidRequest(f"attention must be one of {choices}, got {self.attention!r}")
        if self.warm_up not in WARM_UPS:
            choices = ", ".join(WARM_UPS)
            raise InvalidRequest(f"warm_up must be one of {choices}, got {self.warm_up!r}")
        if not self.packed_cache or os.path.isfile(self.packed_cache):
            raise InvalidRequest(f"packed_cache must be a directory or 'off', got {self.packed_cache!r}")
        positive = (
            "block_size",
            "max_batched_tokens",
            "max_running",
            "max_queue",
            "max_new_tokens_limit",
            "kv_cache_mb",
            "host_cache_mb",
            "adapter_load_threads",
            "adapter_max_rank",
            "adapter_versions_kept",
            "max_adapters_per_tenant",
            "max_upload_bytes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidRequest(f"{name} must be > 0, got {getattr(self, name)}")
        if self.adapter_slots is not None and self.adapter_slots <= 0:
            raise InvalidRequest(f"adapter_slots must be > 0, got {self.adapter_slots}")
        if self.adapter_metrics_top_n < 0:
            raise InvalidRequest(f"adapter_metrics_top_n must be >= 0, got {self.adapter_metrics_top_n}")


@dataclass(frozen=True)
class TlsConfig:
    """TLS of every listener (gRPC and HTTP): PEM files, read at start and again on SIGHUP."""

    cert_file: str
    """The server's certificate chain."""
    key_file: str
    """The private key of that certificate."""
    client_ca_file: str | None = None
    """Mutual TLS: clients must present a certificate signed by this CA; None: no client certificates."""

    def __post_init__(self) -> None:
        if not self.cert_file or not self.key_file:
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the gRPC server (and the optional OpenAI-compatible HTTP server) listen."""

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int | None = None
    """Prometheus endpoint port; None disables it."""
    http_port: int | None = None
    """OpenAI-compatible HTTP API port (same engine, same keys); 0 picks a free one; None disables it."""
    tls: TlsConfig | None = None
    """TLS (and optionally mutual TLS) on the gRPC and HTTP listeners; None serves plaintext."""
    grace_s: float = 30.0
    """On SIGTERM, seconds in-flight requests get to finish before they are cancelled."""
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        for name in ("port", "http_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
