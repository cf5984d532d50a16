"""`peftserve train`: flags to TrainConfig, exit code 2 for bad input, --push through the SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftserve.cli import build_parser, main
from peftserve.training import (
    Ia3Options,
    LokrOptions,
    LoraOptions,
    SparseOptions,
    TrainConfig,
    VeraOptions,
    train,
)
from peftserve.training.cli import _cmd_demo, train_config
from peftserve_client import Client

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> int:
    return main(["train", *args, "--no-progress"])


def test_flags_build_the_config():
    args = build_parser().parse_args(
        ["train", "--method", "sparse", "--data", "d.jsonl", "--out", "o", "--sparse-budget", "0.01",
         "--sparse-rule", "gps", "--target-modules", "q_proj, v_proj", "--max-steps", "5", "--lr", "0.1"]
    )  # fmt: skip
    config = train_config(args, "o")
    assert config.method == SparseOptions(budget=0.01, rule="gps", target_modules=("q_proj", "v_proj"))
    assert (config.max_steps, config.lr, config.epochs, config.base) == (
        5,
        0.1,
        TrainConfig.epochs,
        "default",
    )
    vera = build_parser().parse_args(
        ["train", "--method", "vera", "--data", "d.jsonl", "--rank", "64", "--d-initial", "0.2",
         "--projection-prng-key", "7", "--early-stopping", "0", "--eval-every", "5"]
    )  # fmt: skip
    config = train_config(vera, None)
    assert config.method == VeraOptions(rank=64, d_initial=0.2, projection_prng_key=7)
    assert (config.early_stopping, config.eval_every, config.epochs) == (0, 5, None)
    ia3 = build_parser().parse_args(
        ["train", "--method", "ia3", "--data", "d", "--target-modules", "k_proj,down_proj",
         "--feedforward-modules", "down_proj"]
    )  # fmt: skip
    assert train_config(ia3, None).method == Ia3Options(("k_proj", "down_proj"), ("down_proj",))
    lokr = build_parser().parse_args(["train", "--method", "lokr", "--data", "d", "--decompose-both"])
    assert train_config(lokr, None).method == LokrOptions(decompose_both=True)
    demo = build_parser().parse_args(["train", "demo", "--out", "store"])
    assert (demo.run, demo.out, demo.base, demo.threads) == (_cmd_demo, "store", "default", 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "missing.jsonl", "--out", "o"], "does not exist"),
        (["--data", "{data}", "--method", "prefix", "--rank", "4", "--out", "o"], "--rank applies to"),
        (["--data", "{data}", "--method", "ia3", "--rank", "4", "--out", "o"], "--rank applies to"),
        (["--data", "{data}", "--method", "lora", "--d-initial", "1", "--out", "o"], "--d-initial applies"),
        (["--data", "{data}", "--method", "ia3", "--feedforward-modules", "down_proj", "--out", "o"],
         "feedforward_modules needs target_modules"),
        (["--data", "{data}"], "give --out DIR, or --push HOST:PORT"),
        (["--data", "{data}", "--push", "127.0.0.1:1"], "--push HOST:PORT and --adapter-id NAME go together"),
        (["--out", "o"], "--data FILE is required"),
        (["--data", "{bad}", "--out", "o"], r"bad.jsonl:2: not valid JSON"),
        (["--data", "{data}", "--out", "o", "--method", "adalora", "--tinit", "9", "--tfinal", "9",
          "--max-steps", "10"], "no pruning phase"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_a_clear_message(tmp_path, tiny_llama_dir, task_file, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops}\n')
    args = [a.format(data=task_file, bad=bad) for a in args]
    assert run_cli("--base", str(tiny_llama_dir), *args) == 2
    assert message in capsys.readouterr().err


def test_push_without_the_upload_api_fails_before_training(monkeypatch, tiny_llama_dir, task_file, capsys):
    monkeypatch.delattr(Client, "upload_adapter", raising=False)
    code = run_cli(
        "--base", str(tiny_llama_dir), "--data", str(task_file), "--push", "h:1", "--adapter-id", "a/b"
    )
    assert code == 1
    assert "no Client.upload_adapter" in capsys.readouterr().err


def test_push_to_an_unreachable_server_fails_before_training(tiny_llama_dir, task_file, capsys):
    args = ["--base", str(tiny_llama_dir), "--data", str(task_file), "--max-steps", "500"]
    assert run_cli(*args, "--push", "127.0.0.1:1", "--adapter-id", "acme/faq") == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_push_uploads_the_trained_directory(monkeypatch, tiny_llama_dir, task_file, capsys):
    calls = []

    def upload_adapter(self, directory, adapter_id):
        files = sorted(p.name for p in Path(directory).iterdir())
        calls.append((self, adapter_id, files))
        return SimpleNamespace(version="v3")

    monkeypatch.setattr(Client, "upload_adapter", upload_adapter, raising=False)
    monkeypatch.setattr(Client, "health", lambda self, service="": "SERVING")
    args = ["--base", str(tiny_llama_dir), "--data", str(task_file), "--max-steps", "2", "--rank", "2"]
    assert run_cli(*args, "--push", "127.0.0.1:1", "--adapter-id", "acme/faq") == 0
    ((client, adapter_id, files),) = calls
    assert adapter_id == "acme/faq" and {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert "pushed to 127.0.0.1:1 as acme/faq (v3)" in capsys.readouterr().out


def test_cli_in_a_new_process_writes_the_same_bytes_as_train(tmp_path, tiny_llama_dir, task_file):
    """The command end to end, and determinism across processes (a different hash seed, too)."""
    args = ["--base", str(tiny_llama_dir), "--data", str(task_file), "--max-steps", "3", "--rank", "2",
            "--dropout", "0.1", "--seed", "5", "--threads", "1", "--json", "--no-progress"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONHASHSEED": "123",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "server"), str(ROOT / "client")]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "peftserve.cli", "train", *args, "--out", str(tmp_path / "cli")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert (record["method"], record["steps"], record["output_dir"]) == ("lora", 3, str(tmp_path / "cli"))
    assert record["eval_loss_after"] < record["eval_loss_before"]
    here = train(
        TrainConfig(data=str(task_file), base=str(tiny_llama_dir), method=LoraOptions(rank=2, dropout=0.1),
                    max_steps=3, seed=5, out_dir=str(tmp_path / "here"), progress=False)
    )  # fmt: skip
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "cli" / name).read_bytes() == (here.output_dir / name).read_bytes(), name
