"""`peftserve train ...` and `peftserve train demo`: argument parsing and the two commands.

Building the parser imports no torch (the client commands share it); the commands import the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftserve.client_flags import add_tls_args, tls_kwargs
from peftserve.errors import InvalidRequest, PeftServeError
from peftserve.training.config import (
    METHOD_OPTIONS,
    SPARSE_RULES,
    LoraOptions,
    MethodOptions,
    TrainConfig,
)
from peftserve.training.run_length import DEFAULT_EPOCHS, MAX_STEPS, MIN_STEPS

if TYPE_CHECKING:
    from peftserve.training.trainer import TrainResult

METHOD_FLAGS: dict[str, dict[str, str]] = {
    "rank": {m: "rank" for m in ("lora", "dora", "loha", "lokr", "vera")},
    "alpha": {m: "alpha" for m in ("lora", "dora", "adalora", "loha", "lokr")},
    "dropout": {m: "dropout" for m in ("lora", "dora", "adalora", "vera")},
    "target_modules": {
        m: "target_modules" for m in ("lora", "dora", "adalora", "ia3", "loha", "lokr", "vera", "sparse")
    },
    "feedforward_modules": {"ia3": "feedforward_modules"},
    "module_dropout": {"loha": "module_dropout"},
    "decompose_both": {"lokr": "decompose_both"},
    "decompose_factor": {"lokr": "decompose_factor"},
    "d_initial": {"vera": "d_initial"},
    "projection_prng_key": {"vera": "projection_prng_key"},
    "init_r": {"adalora": "init_r"},
    "target_r": {"adalora": "target_r"},
    "tinit": {"adalora": "tinit"},
    "tfinal": {"adalora": "tfinal"},
    "delta_t": {"adalora": "delta_t"},
    "orth_reg_weight": {"adalora": "orth_reg_weight"},
    "num_virtual_tokens": {"prefix": "num_virtual_tokens"},
    "prefix_projection": {"prefix": "projection"},
    "encoder_hidden_size": {"prefix": "encoder_hidden_size"},
    "sparse_budget": {"sparse": "budget"},
    "sparse_rule": {"sparse": "rule"},
    "calibration_examples": {"sparse": "calibration_examples"},
}
"""Method flag (argparse dest) -> {method: options field}; a flag given for another method is an error."""

RUN_FLAGS = (
    "base", "epochs", "max_steps", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm",
    "batch_size", "max_length", "seed", "device", "dtype", "checkpoint_dir", "checkpoint_every",
    "keep_checkpoints", "resume", "eval_every", "early_stopping",
)  # fmt: skip
"""Flags copied onto TrainConfig fields of the same name when given."""


def _modules(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` (and its `demo` subcommand) to the peftserve command."""
    train = subparsers.add_parser(
        "train",
        help="train an adapter of any served kind (LoRA, DoRA, AdaLoRA, IA3, LoHa, LoKr, VeRA, prefix, "
        "gradient-selected sparse) from a JSONL file",
        description="Train an adapter on the base model and save it in PEFT format (--out) and/or upload it "
        "to a running server (--push). Data: JSONL lines with prompt/completion (loss on the completion), "
        "text, or messages (with the tokenizer's chat template).",
    )
    io = train.add_argument_group("data and output")
    io.add_argument(
        "--base", default=None, help="'default' (the embedded model) or a local HF model directory"
    )
    io.add_argument("--method", default="lora", choices=tuple(METHOD_OPTIONS), help="default: %(default)s")
    io.add_argument("--data", help="training JSONL file (required)")
    io.add_argument("--eval", dest="eval_data", help="evaluation JSONL file (default: the training data)")
    io.add_argument("--out", help="write the PEFT adapter directory here")
    io.add_argument("--push", metavar="HOST:PORT", help="upload the adapter to this running server")
    io.add_argument("--adapter-id", help="id of the pushed adapter, e.g. acme/support/v2")
    io.add_argument(
        "--api-key", default=os.environ.get("PEFTSERVE_API_KEY"), help="for --push (env PEFTSERVE_API_KEY)"
    )
    io.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_tls_args(train)

    method = train.add_argument_group("method options (each applies to the methods named)")
    method.add_argument(
        "--rank",
        type=int,
        help=f"lora, dora, loha, lokr: r (default {LoraOptions.rank}); vera: r (default 256)",
    )
    method.add_argument("--alpha", type=float, help="lora, dora, adalora, loha, lokr: alpha (default 16)")
    method.add_argument(
        "--dropout", type=float, help="lora, dora, adalora, vera: adapter dropout (default 0)"
    )
    method.add_argument(
        "--target-modules",
        type=_modules,
        help="every method but prefix: comma-separated names (default all-linear; ia3: peft's choice for "
        "the model family)",
    )
    method.add_argument(
        "--feedforward-modules",
        type=_modules,
        help="ia3: the targets whose input is scaled (default: peft's choice for the model family)",
    )
    method.add_argument("--module-dropout", type=float, help="loha: drop a module's update (default 0)")
    method.add_argument(
        "--decompose-both", action="store_true", default=None, help="lokr: make both factors low-rank"
    )
    method.add_argument("--decompose-factor", type=int, help="lokr: factor size, -1 near the square root")
    method.add_argument("--d-initial", type=float, help="vera: initial lambda_d (default 0.1)")
    method.add_argument("--projection-prng-key", type=int, help="vera: seed of the frozen projections")
    method.add_argument("--init-r", type=int, help="adalora: starting rank (default 12)")
    method.add_argument("--target-r", type=int, help="adalora: average final rank (default 4)")
    method.add_argument(
        "--tinit", type=int, help="adalora: warm-up steps at full rank (default 10%% of the run)"
    )
    method.add_argument("--tfinal", type=int, help="adalora: final steps at the target budget (default 20%%)")
    method.add_argument("--delta-t", "--deltaT", type=int, help="adalora: steps between budget allocations")
    method.add_argument(
        "--orth-reg-weight", type=float, help="adalora: orthogonality regularizer (default 0.5)"
    )
    method.add_argument("--num-virtual-tokens", type=int, help="prefix: prefix length (default 16)")
    method.add_argument(
        "--prefix-projection", action="store_true", default=None, help="prefix: train through an MLP"
    )
    method.add_argument(
        "--encoder-hidden-size", type=int, help="prefix: that MLP's width (default: hidden size)"
    )
    method.add_argument(
        "--sparse-budget",
        type=float,
        help="sparse: integer r = r*(in+out) entries per module (a rank-r LoRA's count), or a fraction in "
        "(0, 1) of all target entries (default 8)",
    )
    method.add_argument(
        "--sparse-rule", choices=SPARSE_RULES, help="sparse: fisher (Σgrad², FISH) or gps (per row)"
    )
    method.add_argument("--calibration-examples", type=int, help="sparse: examples scored (default 128)")

    loop = train.add_argument_group("optimization")
    loop.add_argument(
        "--epochs",
        type=int,
        help=f"passes over the data (default: chosen from its size, {DEFAULT_EPOCHS} unless that makes fewer "
        f"than {MIN_STEPS} or more than {MAX_STEPS} steps)",
    )
    loop.add_argument("--max-steps", type=int, help="optimizer steps, exactly (overrides --epochs)")
    loop.add_argument("--eval-every", type=int, help="steps between evaluations (default: 20 over the run)")
    loop.add_argument(
        "--early-stopping",
        type=int,
        help="evaluations without improvement that stop a run of epochs, keeping its best adapter "
        f"(default {TrainConfig.early_stopping}; 0: never)",
    )
    loop.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (default per method: "
        + ", ".join(f"{name} {options.default_lr:g}" for name, options in METHOD_OPTIONS.items())
        + ")",
    )
    loop.add_argument("--lr-schedule", choices=("linear", "constant"), help="default: linear decay")
    loop.add_argument("--warmup-steps", type=int)
    loop.add_argument("--weight-decay", type=float)
    loop.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0)")
    loop.add_argument("--batch-size", type=int, help=f"default {TrainConfig.batch_size}")
    loop.add_argument(
        "--max-length", type=int, help=f"longest example in tokens (default {TrainConfig.max_length})"
    )
    loop.add_argument("--seed", type=int, help="same seed, same adapter bytes on CPU (default 0)")
    loop.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    loop.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="base model dtype (default float32)"
    )
    loop.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    loop.add_argument("--checkpoint-dir", help="save checkpoints here")
    loop.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    loop.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept (default 2)")
    loop.add_argument(
        "--resume", action="store_true", default=None, help="continue from the latest checkpoint"
    )
    loop.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_cmd_train)

    demo_commands = train.add_subparsers(dest="train_command", metavar="{demo}")
    demo = demo_commands.add_parser("demo", help="train the demo adapters of two tenants (cached)")
    demo.add_argument(
        "--out", help="directory of the demo adapters (default: $PEFTSERVE_CACHE/demo-adapters)"
    )
    demo.add_argument("--base", default="default", help="model to train on (default: %(default)s)")
    demo.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the model is tiny)"
    )
    demo.set_defaults(run=_cmd_demo)


def method_options(args: argparse.Namespace) -> MethodOptions:
    """The --method's options from the method flags; InvalidRequest for a flag of another method."""
    fields: dict[str, Any] = {}
    for dest, targets in METHOD_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if args.method not in targets:
            flag = "--" + dest.replace("_", "-")
            raise InvalidRequest(f"{flag} applies to --method {' or '.join(targets)}, not {args.method}")
        fields[targets[args.method]] = value
    return METHOD_OPTIONS[args.method](**fields)


def train_config(args: argparse.Namespace, out_dir: str | None) -> TrainConfig:
    """TrainConfig from parsed flags; fields whose flag is absent keep their defaults."""
    fields = {name: getattr(args, name) for name in RUN_FLAGS if getattr(args, name, None) is not None}
    return TrainConfig(
        data=args.data or "",
        eval_data=args.eval_data,
        method=method_options(args),
        out_dir=out_dir,
        progress=not args.no_progress,
        **fields,
    )


def _quiet_libraries() -> None:
    """User-facing output: our log lines and the progress bar, not library deprecation chatter."""
    import warnings

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")  # AdaLoRA reload noise


def check_output_flags(args: argparse.Namespace) -> None:
    """--data, and --out and/or --push with --adapter-id; InvalidRequest otherwise."""
    if not args.data:
        raise InvalidRequest("--data FILE is required (a JSONL file of prompt/completion, text or messages)")
    if not args.out and not args.push:
        raise InvalidRequest("give --out DIR, or --push HOST:PORT with --adapter-id NAME (or both)")
    if bool(args.push) != bool(args.adapter_id):
        raise InvalidRequest("--push HOST:PORT and --adapter-id NAME go together")


def train_and_push(args: argparse.Namespace) -> tuple[TrainResult, Any]:
    """Train as the flags say; then upload when --push (into a temporary directory without --out)."""
    check_output_flags(args)
    if args.push:
        from peftserve.training.push import check_server

        check_server(args.push, args.api_key, **tls_kwargs(args))  # before spending the training time
    _quiet_libraries()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from peftserve.training.push import push_adapter
    from peftserve.training.trainer import train

    with tempfile.TemporaryDirectory(prefix="peftserve-train-") as scratch:
        result = train(train_config(args, args.out or str(Path(scratch) / "adapter")))
        pushed = (
            push_adapter(result.output_dir, args.push, args.adapter_id, args.api_key, **tls_kwargs(args))
            if args.push
            else None
        )
    return result, pushed


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        result, pushed = train_and_push(args)
    except InvalidRequest as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PeftServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    saved = str(result.output_dir) if args.out else None
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "output_dir": saved, "pushed": args.adapter_id}))
        return 0
    print(result.summary())
    if saved:
        print(f"saved to {saved}")
    if args.push:
        version = getattr(pushed, "version", None)  # the SDK's AdapterManifest
        print(f"pushed to {args.push} as {args.adapter_id}" + (f" ({version})" if version else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _quiet_libraries()
    import torch

    from peftserve.model.default_model import cache_root, ensure_default_model
    from peftserve.training.demo import QUESTIONS, prompt_of, train_demo_adapters

    out = Path(args.out) if args.out else cache_root() / "demo-adapters"
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        base = ensure_default_model() if args.base == "default" else Path(args.base)
        adapters = train_demo_adapters(base, out, progress=True)
    except InvalidRequest as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous)
    for adapter in adapters:
        print(f"{adapter.adapter_id}\t{adapter.method}\t{adapter.path}")
    flags = " ".join(f"--adapter {a.adapter_id}={a.path}" for a in adapters)
    print(
        f"\nserve them:  peftserve serve {flags}\n"
        f"then ask:    peftserve generate --adapter {adapters[0].adapter_id} "
        f"--prompt {_shell_quoted(prompt_of(QUESTIONS[0]))} --max-new-tokens 40"
    )
    return 0


def _shell_quoted(text: str) -> str:
    """bash $'...' quoting, so the prompt's newline reaches the server as a newline."""
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
