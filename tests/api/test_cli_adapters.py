"""`peftserve adapters ...` and `peftserve keys ...` as subprocesses against servers started by the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from peftserve.auth import KeyRing
from peftserve.bench.server import source_env

from .conftest import Served, serving
from .fake_admin import write_peft_dir


def _peftserve(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = source_env()
    env.pop("PEFTSERVE_API_KEY", None)
    if api_key is not None:
        env["PEFTSERVE_API_KEY"] = api_key
    argv = [sys.executable, "-m", "peftserve.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)


def _ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_adapter_lifecycle_with_json_and_text_output(served: Served, tmp_path: Path) -> None:
    at = ("--address", served.address)
    peft_dir = write_peft_dir(tmp_path / "lora")
    manifest = json.loads(_ok(_peftserve("adapters", "upload", str(peft_dir), "--id", "x", *at, "--json")))
    assert (manifest["adapter_id"], manifest["version"], len(manifest["files"])) == ("default/x", "v1", 3)
    assert _ok(_peftserve("adapters", "upload", str(peft_dir), "--id", "x", *at)).startswith(
        "default/x v2: lora (LORA), 3 files,"
    )
    listed = json.loads(_ok(_peftserve("adapters", "list", *at, "--json")))
    assert [(s["manifest"]["adapter_id"], s["tier"]) for s in listed] == [("default/x", "disk")]
    loaded = _ok(_peftserve("adapters", "load", "x", "--pin", *at))
    assert loaded == (
        "default/x v2: lora (LORA), tier device, pinned, 0 active requests\n"
        "  served as low_rank x 2: 4096 bytes per slot, needs --adapter-max-rank >= 8\n"
    )
    status = json.loads(_ok(_peftserve("adapters", "get", "x", *at, "--json")))
    assert (status["tier"], status["pinned"], status["active_requests"]) == ("device", True, 0)
    manifest = status["manifest"]
    assert (manifest["device_bytes"], manifest["forms"], manifest["needs_max_rank"]) == (
        4096,
        [["low_rank", 2]],
        8,
    )
    assert json.loads(_ok(_peftserve("adapters", "unload", "x", *at, "--json")))["tier"] == "disk"
    assert _ok(_peftserve("adapters", "delete", "x", *at)) == "deleted x\n"

    gone = _peftserve("adapters", "get", "x", *at)
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr == "error: NOT_FOUND: adapter 'default/x' not found\n"


def test_upload_of_a_directory_with_a_symlink_fails_before_any_call(served: Served, tmp_path: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "lora")
    (peft_dir / "escape").symlink_to("/etc/passwd")
    run = _peftserve("adapters", "upload", str(peft_dir), "--id", "x", "--address", served.address)
    assert run.returncode == 1 and "symbolic link" in run.stderr
    assert served.admin.calls == []


def test_keys_add_then_the_key_from_the_environment_works(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    added = _peftserve(
        "keys", "add", "--tenant", "acme", "--scopes", "infer,admin", "--keys-file", str(keys_file)
    )
    key = _ok(added).strip()
    assert key.startswith("psk_") and key not in keys_file.read_text()
    for bad, message in (
        (("--tenant", "Bad Tenant"), "is not valid"),
        (("--scopes", "root"), "scopes must be"),
    ):
        refused = _peftserve("keys", "add", "--tenant", "acme", *bad, "--keys-file", str(keys_file))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr

    with serving(KeyRing.load(keys_file)) as served:
        at = ("--address", served.address)
        assert _ok(_peftserve("adapters", "list", *at, "--json", api_key=key)) == "[]\n"
        anonymous = _peftserve("adapters", "list", *at)
        assert anonymous.returncode == 1 and anonymous.stderr.startswith("error: UNAUTHENTICATED: ")
        upload = _peftserve(
            "adapters", "upload", str(write_peft_dir(tmp_path / "a")), "--id", "x", *at, api_key=key
        )
        assert _ok(upload).startswith("acme/x v1:")


def test_serve_refuses_a_bad_keys_file_before_loading_a_model(tmp_path: Path) -> None:
    run = _peftserve("serve", "--port", "0", "--keys-file", str(tmp_path / "missing.json"))
    assert run.returncode == 2 and "does not exist" in run.stderr


def test_adapters_commands_do_not_import_torch() -> None:
    code = (
        "import sys; from peftserve.cli import main; "
        "rc = main(['adapters', 'list', '--address', '127.0.0.1:1', '--timeout', '1']); "
        "assert rc == 1, rc; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=source_env(), timeout=30
    )
    assert run.returncode == 0, run.stderr
    assert "error: UNAVAILABLE" in run.stderr
