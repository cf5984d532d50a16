"""The `peftserve` command: serve a model, locate the default model, manage API keys, call a server.

Client-side commands (generate, info, health, adapters) import only the client SDK, never torch;
they send the API key of the PEFTSERVE_API_KEY environment variable, and speak TLS with --tls-ca
(and a client certificate with --tls-cert/--tls-key, or the PEFTSERVE_TLS_* variables).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peftserve.bench.cli import add_bench_parser
from peftserve.client_flags import API_KEY_ENV, add_tls_args, tls_kwargs
from peftserve.config import DTYPES, EngineConfig, ServerConfig, TlsConfig, default_packed_cache
from peftserve.deploy.cli import add_cluster_parser
from peftserve.errors import InvalidRequest, PeftServeError
from peftserve.training.cli import add_train_parser

if TYPE_CHECKING:
    from peftserve_client import AdapterManifest, AdapterStatus, Client

DEFAULT_ADDRESS = os.environ.get("PEFTSERVE_ADDRESS", "127.0.0.1:50051")


def _switch(value: str) -> bool:
    """Parse on/off."""
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return value == "on"


# (flag, EngineConfig field, type, help): flags left out keep EngineConfig's own default.
_ENGINE_FLAGS: tuple[tuple[str, str, Callable[[str], object], str], ...] = (
    ("--model", "model", str, "'default' (the embedded model) or a local Hugging Face model directory"),
    ("--device", "device", str, "cpu, cuda or cuda:N"),
    ("--dtype", "dtype", str, "auto: bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32"),
    ("--kv-cache-mb", "kv_cache_mb", float, "memory for the paged KV cache; sets the block budget"),
    ("--block-size", "block_size", int, "tokens per KV block"),
    ("--max-batched-tokens", "max_batched_tokens", int, "prefill and decode tokens in one engine step"),
    ("--max-running", "max_running", int, "requests decoding at once"),
    ("--max-queue", "max_queue", int, "waiting requests before new ones get RESOURCE_EXHAUSTED"),
    ("--max-new-tokens-limit", "max_new_tokens_limit", int, "largest max_new_tokens a request may ask for"),
    ("--max-context", "max_context", int, "longest prompt plus completion (default: the model's)"),
    ("--threads", "threads", int, "torch CPU threads (default: torch's choice)"),
    ("--cpu-linear", "cpu_linear", str, "onednn (default: oneDNN on packed weights, faster) or torch"),
    (
        "--attention",
        "attention",
        str,
        "cpp (default: our kernel reads the paged KV in place), flex (torch's, compiled) or sdpa (gathers)",
    ),
    (
        "--packed-cache",
        "packed_cache",
        str,
        "directory keeping packed weights across starts (default ~/.cache/peftserve/packed), or off",
    ),
    (
        "--warm-up",
        "warm_up",
        str,
        "background (default: serve at once, compile and pack beside) or before (serve once done)",
    ),
    (
        "--cuda-graphs",
        "cuda_graphs",
        _switch,
        "on: replay decode steps from CUDA graphs (default off)",
    ),
    (
        "--adapter-slots",
        "adapter_slots",
        int,
        "adapters resident on the device at once (default: --max-running; prefix tuning needs none)",
    ),
    ("--host-cache-mb", "host_cache_mb", float, "CPU memory for adapters loaded from disk (LRU)"),
    ("--adapter-load-threads", "adapter_load_threads", int, "threads loading adapters from disk"),
    ("--adapter-max-rank", "adapter_max_rank", int, "largest adapter rank (or that many rank-equivalents)"),
    ("--adapter-versions-kept", "adapter_versions_kept", int, "versions of each adapter kept in the store"),
    ("--max-adapters-per-tenant", "max_adapters_per_tenant", int, "adapters a tenant may hold in the store"),
    ("--max-upload-bytes", "max_upload_bytes", int, "bytes of all files of one upload"),
    ("--adapter-metrics-top-n", "adapter_metrics_top_n", int, "adapters with their own metrics label"),
    ("--scheduling", "scheduling", str, "fair (the least served tenant goes first) or fcfs"),
    ("--prefix-cache", "prefix_cache", str, "on (default: reuse the KV of shared prompt prefixes) or off"),
    (
        "--prefix-cache-tenant-share",
        "prefix_cache_tenant_share",
        float,
        "largest fraction of the KV blocks one tenant's cached prefixes may hold (default: no limit)",
    ),
    ("--tenant-max-queued", "tenant_max_queued", int, "waiting requests per tenant (keys may set their own)"),
    (
        "--tenant-max-running",
        "tenant_max_running",
        int,
        "running requests per tenant (keys may set their own)",
    ),
    (
        "--tenant-tokens-per-minute",
        "tenant_tokens_per_minute",
        int,
        "prompt + max_new_tokens per tenant per minute (keys may set their own)",
    ),
)


def _adapter_spec(value: str) -> tuple[str, str]:
    """Parse ID=DIR."""
    adapter_id, sep, directory = value.partition("=")
    if not sep or not adapter_id or not directory:
        raise argparse.ArgumentTypeError(f"expected ID=DIR, got {value!r}")
    return adapter_id, directory


def configure_logging(level: str) -> None:
    """Log lines of the server to stderr."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_serve(args: argparse.Namespace) -> int:
    from peftserve.auth import KeyRing

    configure_logging(args.log_level)
    try:
        keys = KeyRing.load(args.keys_file) if args.keys_file else None
        config = _server_config(args)
    except (InvalidRequest, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import asyncio

    from peftserve.api.server import serve  # server-only: grpc health/reflection, later torch

    try:
        asyncio.run(serve(config, keys=keys, keys_file=Path(args.keys_file) if args.keys_file else None))
    except (PeftServeError, ValueError, OSError) as e:  # a TLS file that does not load, a port in use ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of the `serve` flags; InvalidRequest names a bad value."""
    engine_kwargs = {f: getattr(args, f) for _, f, _, _ in _ENGINE_FLAGS if getattr(args, f) is not None}
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        tls = TlsConfig(args.tls_cert or "", args.tls_key or "", args.tls_client_ca)
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        tls=tls,
        grace_s=args.grace_s,
        engine=EngineConfig(**engine_kwargs, adapters=tuple(args.adapters), store=args.store or None),
    )


def _cmd_model_path(args: argparse.Namespace) -> int:
    if args.model != "default":
        path = Path(args.model).resolve()
        if not path.is_dir():
            print(f"error: {args.model} is not a directory", file=sys.stderr)
            return 1
        print(path)
        return 0
    from peftserve.model.default_model import ensure_default_model  # imports torch and transformers

    print(ensure_default_model())
    return 0


def _cmd_model_pack(args: argparse.Namespace) -> int:
    """What a server's first start does in its warm-up, ahead of it (in an image's build, say): the
    packed weights written under --packed-cache, and the C++ kernels built for the dtype, for this CPU
    and torch."""
    from peftserve.model.loader import load_base_model  # imports torch and transformers
    from peftserve.runner.linear import pack_linears
    from peftserve.runner.packed_cache import PackedCache, usable

    if args.packed_cache == "off":
        print("error: --packed-cache off keeps nothing; name a directory", file=sys.stderr)
        return 2
    try:
        loaded = load_base_model(args.model, "cpu", args.dtype)
    except InvalidRequest as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not usable(loaded.dtype):
        print(f"error: packed {loaded.dtype} weights cannot be kept with this torch and CPU", file=sys.stderr)
        return 1
    cache = PackedCache(args.packed_cache, loaded.directory, loaded.dtype)
    if cache.entry.exists():
        print(f"packed weights already kept in {cache.entry}")
    else:
        pack_linears(loaded.model)
        result = cache.keep(loaded.model)  # or "already kept": another process was first
        if not result.startswith(("packed weights kept", "packed weights already kept")):
            print(f"error: {result}", file=sys.stderr)
            return 1
        print(result)
    print(_build_kernels(loaded.dtype))
    return 0


def _build_kernels(dtype) -> str:
    """Attention's and the adapters' C++ kernels built for `dtype` and kept (peftserve/native.py); where
    they cannot be built, why (servers then gather attention and run the adapters' parallel kernel)."""
    from peftserve.adapters.forms import low_rank_rows
    from peftserve.config import default_kernel_cache
    from peftserve.runner import paged_kernel

    try:
        paged_kernel.load(dtype, build=True)
        low_rank_rows.warm_up(dtype)  # says why where it cannot be built
    except Exception as exc:  # noqa: BLE001 - the weights are kept either way
        return f"warning: C++ kernels not built ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
    if low_rank_rows.unavailable is not None:
        return f"warning: the adapters' C++ kernel not built ({low_rank_rows.unavailable})"
    return f"C++ kernels built for {dtype} and kept in {default_kernel_cache()}"


def _cmd_generate(args: argparse.Namespace) -> int:
    from peftserve_client import GenerateResult

    options = {
        "adapter_id": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop or None,
    }
    with _client(args) as client:
        if args.stream:
            chunks = []
            for chunk in client.generate_stream(args.prompt, **options):
                chunks.append(chunk)
                if not args.json:
                    print(chunk.text, end="", flush=True)
            result = GenerateResult.from_chunks(chunks)
        else:
            result = client.generate(args.prompt, **options)
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": result.request_id,
                    "text": result.text,
                    "token_ids": list(result.token_ids),
                    "finish_reason": result.finish_reason.value if result.finish_reason else None,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                }
            )
        )
    elif args.stream:
        print()
    else:
        print(result.text)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = dataclasses.asdict(client.model_info())
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _adapter_upload(client: Client, args: argparse.Namespace) -> AdapterManifest:
    return client.upload_adapter(args.directory, args.id)


def _adapter_list(client: Client, args: argparse.Namespace) -> list[AdapterStatus]:
    return list(client.iter_adapters())


def _adapter_get(client: Client, args: argparse.Namespace) -> AdapterStatus:
    return client.get_adapter(args.id)


def _adapter_load(client: Client, args: argparse.Namespace) -> AdapterStatus:
    return client.load_adapter(args.id, pin=args.pin)


def _adapter_unload(client: Client, args: argparse.Namespace) -> AdapterStatus:
    return client.unload_adapter(args.id)


def _adapter_delete(client: Client, args: argparse.Namespace) -> dict[str, object]:
    client.delete_adapter(args.id)
    return {"adapter_id": args.id, "deleted": True}


def _describe(result: AdapterManifest | AdapterStatus | dict[str, object]) -> str:
    """One line for a person."""
    from peftserve_client import AdapterManifest

    if isinstance(result, dict):
        return f"deleted {result['adapter_id']}"
    manifest = result if isinstance(result, AdapterManifest) else result.manifest
    line = f"{manifest.adapter_id} {manifest.version}: {manifest.kind} ({manifest.peft_type})"
    if isinstance(result, AdapterManifest):
        return f"{line}, {len(manifest.files)} files, {manifest.nbytes} bytes"
    tier = result.tier.value if result.tier else "unknown"
    pinned = ", pinned" if result.pinned else ""
    forms = ", ".join(f"{name} x {count}" for name, count in manifest.forms) or "prefix K/V"
    shared = f" (+{manifest.shared_bytes} shared)" if manifest.shared_bytes else ""
    return (
        f"{line}, tier {tier}{pinned}, {result.active_requests} active requests\n"
        f"  served as {forms}: {manifest.device_bytes} bytes per slot{shared}, "
        f"needs --adapter-max-rank >= {manifest.needs_max_rank}"
    )


def _cmd_adapters(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            result = args.action(client, args)
    except (OSError, ValueError) as e:  # the directory to upload: missing, a symlink in it, no files
        print(f"error: {e}", file=sys.stderr)
        return 1
    items = result if isinstance(result, list) else [result]
    if args.json:
        rows = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in items]
        print(json.dumps(rows if isinstance(result, list) else rows[0]))
    else:
        for item in items:
            print(_describe(item))
    return 0


def _cmd_keys_add(args: argparse.Namespace) -> int:
    from peftserve.auth import KeyRing
    from peftserve.engine.request import TenantLimits

    path = Path(args.keys_file)
    try:
        limits = TenantLimits(args.max_queued, args.max_running, args.tokens_per_minute)
        ring, key = (KeyRing.load(path) if path.exists() else KeyRing()).add(
            args.tenant, args.scopes, limits if limits != TenantLimits() else None
        )
    except (InvalidRequest, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ring.save(path)
    print(key)
    print(
        f"stored the hash of a new key for tenant {args.tenant!r} in {path}; the key is shown only once",
        file=sys.stderr,
    )
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from peftserve.auth import KeyRing

    try:
        KeyRing.load(args.keys_file).revoke(args.key_id).save(args.keys_file)
    except InvalidRequest as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"revoked key {args.key_id}; a running server applies it on SIGHUP (kill -HUP <pid>)", file=sys.stderr
    )
    return 0


def _client(args: argparse.Namespace) -> Client:
    from peftserve_client import Client

    return Client(args.address, timeout=args.timeout, api_key=os.environ.get(API_KEY_ENV), **tls_kwargs(args))


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server HOST:PORT (env PEFTSERVE_ADDRESS)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the call fails")
    add_tls_args(parser)


def _add_serve_flags(serve: argparse.ArgumentParser) -> None:
    """The flags of `serve`, which `cluster` takes too."""
    serve.add_argument("--host", default=ServerConfig.host)
    serve.add_argument("--port", type=int, default=ServerConfig.port, help="gRPC port; 0 picks a free port")
    serve.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,"
        " /v1/adapters, /health, /metrics) on this port; 0 picks a free port (default: off)",
    )
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    tls = serve.add_argument_group("TLS of every listener (re-read on SIGHUP)")
    tls.add_argument("--tls-cert", metavar="FILE", help="the server's certificate chain (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="the key of --tls-cert (PEM)")
    tls.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="mutual TLS: refuse clients without a certificate signed by this CA (PEM)",
    )
    serve.add_argument("--grace-s", type=float, default=ServerConfig.grace_s, help="drain time on SIGTERM")
    defaults = EngineConfig()
    for flag, field, kind, text in _ENGINE_FLAGS:
        extra = {"choices": DTYPES} if flag == "--dtype" else {}
        default = getattr(defaults, field)
        shown = f"{text} (default: {default})" if default is not None else text
        serve.add_argument(flag, type=kind, default=None, help=shown, **extra)
    serve.add_argument(
        "--adapter",
        dest="adapters",
        type=_adapter_spec,
        action="append",
        default=[],
        metavar="ID=DIR",
        help="register a PEFT adapter directory under ID (repeatable)",
    )
    serve.add_argument(
        "--store",
        default="adapters_store",
        metavar="DIR",
        help="adapter store (<tenant>/<name>/v<N>/ folders), scanned at start; uploads are committed"
        " here (default: %(default)s; '' for none)",
    )
    serve.add_argument(
        "--keys-file",
        default=None,
        metavar="FILE",
        help="API keys (see `peftserve keys add`): every Inference and Adapters call needs one;"
        " without it, single-tenant local mode. SIGHUP re-reads the file (added or revoked keys"
        " apply without a restart); HTTP callers send the key as Authorization: Bearer KEY",
    )
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="peftserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model over gRPC (and OpenAI-style HTTP) until SIGTERM")
    _add_serve_flags(serve)
    serve.set_defaults(run=_cmd_serve)

    model = commands.add_parser("model", help="the served model's files")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    path = model_commands.add_parser("path", help="print the model directory, building the default if absent")
    path.add_argument("--model", default="default")
    path.set_defaults(run=_cmd_model_path)
    pack = model_commands.add_parser(
        "pack",
        help="pack the model's Linear weights for this CPU and keep them, and build the C++ kernels,"
        " for the server's starts",
    )
    pack.add_argument("--model", default="default")
    pack.add_argument("--dtype", default="auto", help="as serve's --dtype (the entry is per dtype)")
    pack.add_argument(
        "--packed-cache",
        default=default_packed_cache(),
        help="as serve's --packed-cache (default: $PEFTSERVE_PACKED_CACHE, else ~/.cache/peftserve/packed)",
    )
    pack.set_defaults(run=_cmd_model_pack)
    add_train_parser(commands)

    generate = commands.add_parser("generate", help="generate a completion on a running server")
    _add_client_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--adapter", default=None, metavar="ID", help="adapter id; default: the base model")
    generate.add_argument("--max-new-tokens", type=int, default=None)
    generate.add_argument("--temperature", type=float, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    generate.set_defaults(run=_cmd_generate)

    info = commands.add_parser("info", help="describe the served model")
    _add_client_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_cmd_info)

    health = commands.add_parser("health", help="print the server's health; exit 0 only when SERVING")
    _add_client_args(health)
    health.add_argument("--service", default="", help="service name; default: the whole server")
    health.set_defaults(run=_cmd_health)

    _add_adapters_parser(commands)
    _add_keys_parser(commands)
    add_bench_parser(commands)
    add_cluster_parser(commands, _add_serve_flags)
    return parser


def _add_adapters_parser(commands: argparse._SubParsersAction) -> None:
    adapters = commands.add_parser("adapters", help="manage the adapters of a running server (admin scope)")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True)

    def add(name: str, action: Callable, text: str) -> argparse.ArgumentParser:
        parser = adapter_commands.add_parser(name, help=text)
        _add_client_args(parser)
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(run=_cmd_adapters, action=action)
        return parser

    upload = add("upload", _adapter_upload, "upload a PEFT directory's files as the adapter's next version")
    upload.add_argument("directory", metavar="DIR")
    upload.add_argument("--id", required=True, metavar="ID", help="name, or tenant/name")
    add("list", _adapter_list, "list the caller's adapters")
    for name, action, text in (
        ("get", _adapter_get, "show an adapter's manifest and where it is"),
        ("load", _adapter_load, "bring an adapter to a device slot"),
        ("unload", _adapter_unload, "drop an adapter from memory; the store keeps it"),
        ("delete", _adapter_delete, "remove every version of an adapter"),
    ):
        parser = add(name, action, text)
        parser.add_argument("id", metavar="ID", help="name, or tenant/name")
        if name == "load":
            parser.add_argument("--pin", action="store_true", help="keep it in its slot until unloaded")


def _add_keys_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage the API keys of a keys file (serve --keys-file)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    add = key_commands.add_parser("add", help="create a key; print it once and store only its hash")
    add.add_argument("--tenant", required=True)
    add.add_argument("--scopes", default="infer", help="comma-separated: infer, admin (default: %(default)s)")
    add.add_argument("--keys-file", required=True, metavar="FILE", help="created if missing")
    add.add_argument("--max-queued", type=int, default=None, help="this key's limit on waiting requests")
    add.add_argument("--max-running", type=int, default=None, help="this key's limit on running requests")
    add.add_argument("--tokens-per-minute", type=int, default=None, help="this key's token budget per minute")
    add.set_defaults(run=_cmd_keys_add)
    revoke = key_commands.add_parser("revoke", help="remove a key by its id (the hex after 'psk_')")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.add_argument("--keys-file", required=True, metavar="FILE")
    revoke.set_defaults(run=_cmd_keys_revoke)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peftserve` console script."""
    args = build_parser().parse_args(argv)
    from peftserve_client.errors import PeftServeError

    try:
        return args.run(args)
    except PeftServeError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
