"""Uploads through the AdapterAdmin: the malformed-upload corpus (each case its error, the store and the
registry unchanged), quotas, versions and pruning, listing, tenant scoping."""

from __future__ import annotations

import asyncio
import copy
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load, save
from transformers import PreTrainedModel

from peftserve.adapters import AdapterAdminService, AdapterManager
from peftserve.errors import AdapterNotFound, CapacityExceeded, FailedPrecondition, InvalidRequest
from peftserve.store import AdapterStore
from peftserve.store.files import sha256_hex
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import build_tiny_model
from tests.helpers.uploads import chunks
from tests.store.safetensors_bytes import entry, raw_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
Files = dict[str, bytes]


async def inline(fn):
    return fn()


def peft_files(base: PreTrainedModel, out: Path, r: int) -> Files:
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(out)
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.fixture(scope="module")
def base() -> PreTrainedModel:
    return build_tiny_model("llama", seed=0)[0]


@pytest.fixture(scope="module")
def good(base: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Files:
    return peft_files(base, tmp_path_factory.mktemp("good"), r=4)


@pytest.fixture(scope="module")
def rank12(base: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Files:
    return peft_files(base, tmp_path_factory.mktemp("rank12"), r=12)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Files]:
    gpt2, _ = build_tiny_model("gpt2", seed=0)
    root = tmp_path_factory.mktemp("gpt2")
    dirs = {
        "lora": pf.make_lora_layers(gpt2, "gpt2", root / "l"),
        "prefix": pf.make_prefix(gpt2, root / "p", False),
    }
    return {kind: {p.name: p.read_bytes() for p in d.iterdir()} for kind, d in dirs.items()}


@pytest.fixture
def admin(base: PreTrainedModel, tmp_path: Path) -> AdapterAdminService:
    manager = AdapterManager(copy.deepcopy(base), num_slots=2, device="cpu", dtype=torch.float32, max_rank=8)
    store = AdapterStore(tmp_path / "store", max_adapters_per_tenant=3, max_upload_bytes=1 << 20)
    yield AdapterAdminService(manager, store, inline, keep_versions=2)
    manager.close()


def upload(admin: AdapterAdminService, files: Files, name: str = "lora", tenant: str = "acme"):
    return asyncio.run(admin.upload(tenant, name, chunks(files)))


def tree(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


def with_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Files], Files]:
    def apply(files: Files) -> Files:
        state = load(files[WEIGHTS])
        edit(state)
        return {**files, WEIGHTS: save(state)}

    return apply


def with_config(**fields: object) -> Callable[[Files], Files]:
    def apply(files: Files) -> Files:
        return {**files, CONFIG: json.dumps({**json.loads(files[CONFIG]), **fields}).encode()}

    return apply


def with_file(name: str, data: bytes | None) -> Callable[[Files], Files]:
    def apply(files: Files) -> Files:
        out = {**files, name: data}
        return {k: v for k, v in out.items() if v is not None}

    return apply


def with_weights(make: Callable[[bytes], bytes]) -> Callable[[Files], Files]:
    return lambda files: {**files, WEIGHTS: make(files[WEIGHTS])}


def _header_len(data: bytes, n: int) -> bytes:
    return struct.pack("<Q", n) + data[8:]


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda state: state.__setitem__(key, value)


def _poke(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = state[key].clone()
        state[key][0, 0] = value

    return edit


def _rename_layer(state: dict[str, torch.Tensor]) -> None:
    for suffix in ("lora_A.weight", "lora_B.weight"):
        state[f"{Q0}.{suffix}".replace("layers.0", "layers.9")] = state.pop(f"{Q0}.{suffix}")


F32x2 = {"a": entry("F32", [2], 0, 8)}
CORPUS: list[tuple[str, Callable[[Files], Files], type[Exception], str]] = [
    ("truncated-0", with_weights(lambda d: b""), InvalidRequest, "truncated"),
    ("truncated-7", with_weights(lambda d: d[:7]), InvalidRequest, "truncated"),
    ("truncated-8", with_weights(lambda d: d[:8]), InvalidRequest, "runs past the end"),
    ("truncated-mid-header", with_weights(lambda d: d[:40]), InvalidRequest, "runs past the end"),
    ("truncated-mid-data", with_weights(lambda d: d[:-10]), InvalidRequest, "run past the data buffer"),
    ("header-past-file", with_weights(lambda d: _header_len(d, len(d))), InvalidRequest, "runs past the end"),
    ("header-absurd", with_weights(lambda d: _header_len(d, 1 << 40)), InvalidRequest, "exceeds the limit"),
    ("header-not-json", with_weights(lambda d: raw_file(b"{]", b"")), InvalidRequest, "not valid"),
    ("garbage", with_weights(lambda d: bytes(range(7, 256)) * 16), InvalidRequest, "safetensors"),
    (
        "out-of-range",
        with_weights(lambda d: raw_file({"a": entry("F32", [4], 0, 16)}, b"\0" * 8)),
        InvalidRequest,
        "past the data",
    ),
    (
        "reversed",
        with_weights(lambda d: raw_file({"a": entry("F32", [2], 8, 0)}, b"\0" * 8)),
        InvalidRequest,
        "reversed",
    ),
    (
        "overlap",
        with_weights(lambda d: raw_file({**F32x2, "b": entry("F32", [2], 4, 12)}, b"\0" * 12)),
        InvalidRequest,
        "overlaps",
    ),
    (
        "gap",
        with_weights(lambda d: raw_file({"a": entry("F32", [1], 4, 8)}, b"\0" * 8)),
        InvalidRequest,
        "gap",
    ),
    (
        "size-vs-shape",
        with_weights(lambda d: raw_file({"a": entry("F32", [3], 0, 8)}, b"\0" * 8)),
        InvalidRequest,
        "needs 12",
    ),
    (
        "dtype-f64",
        with_tensors(_set(f"{Q0}.lora_A.weight", torch.zeros(4, 64, dtype=torch.float64))),
        InvalidRequest,
        "F64",
    ),
    (
        "dtype-int",
        with_tensors(_set(f"{Q0}.lora_A.weight", torch.zeros(4, 64, dtype=torch.int32))),
        InvalidRequest,
        "I32",
    ),
    (
        "duplicate-name",
        with_weights(
            lambda d: raw_file(
                b'{"a": %s, "a": %s}'
                % (
                    json.dumps(entry("F32", [1], 0, 4)).encode(),
                    json.dumps(entry("F32", [1], 4, 8)).encode(),
                ),
                b"\0" * 8,
            )
        ),
        InvalidRequest,
        "duplicate",
    ),
    (
        "missing-b",
        with_tensors(lambda s: s.pop(f"{Q0}.lora_B.weight")),
        InvalidRequest,
        "lora_B.weight is missing",
    ),
    (
        "missing-a",
        with_tensors(lambda s: s.pop(f"{Q0}.lora_A.weight")),
        InvalidRequest,
        "lora_A.weight is missing",
    ),
    ("wrong-shape", with_tensors(_set(f"{Q0}.lora_A.weight", torch.ones(4, 32))), InvalidRequest, "shape"),
    (
        "transposed",
        with_tensors(_set(f"{Q0}.lora_B.weight", torch.ones(4, 64))),
        InvalidRequest,
        "do not form",
    ),
    ("unknown-module", with_tensors(_rename_layer), InvalidRequest, "does not exist"),
    (
        "rank-0",
        with_tensors(
            lambda s: s.update(
                {f"{Q0}.lora_A.weight": torch.zeros(0, 64), f"{Q0}.lora_B.weight": torch.zeros(64, 0)}
            )
        ),
        InvalidRequest,
        "rank 0",
    ),
    ("nan", with_tensors(_poke(f"{Q0}.lora_B.weight", float("nan"))), InvalidRequest, "NaN"),
    ("inf", with_tensors(_poke(f"{Q0}.lora_A.weight", float("-inf"))), InvalidRequest, "Inf"),
    ("nan-alpha", with_config(lora_alpha=float("nan")), InvalidRequest, "lora_alpha"),
    ("config-missing", with_file(CONFIG, None), InvalidRequest, "no adapter_config.json"),
    ("config-oversized", with_config(padding="x" * (64 << 10)), InvalidRequest, "larger than the limit"),
    ("config-not-json", with_file(CONFIG, b"{not json"), InvalidRequest, "not valid JSON"),
    ("config-not-object", with_file(CONFIG, b"[1]"), InvalidRequest, "JSON object"),
    ("config-too-deep", with_config(deep=json.loads("[" * 40 + "]" * 40)), InvalidRequest, "nested deeper"),
    ("config-not-utf8", with_file(CONFIG, b"\xff{}"), InvalidRequest, "UTF-8"),
    ("weights-missing", with_file(WEIGHTS, None), InvalidRequest, "no adapter_model.safetensors"),
    ("unknown-peft-type", with_config(peft_type="OFT"), InvalidRequest, "peft_type='OFT'"),
    (
        "dora-without-magnitudes",
        with_config(use_dora=True),
        InvalidRequest,
        "lora_magnitude_vector is missing",
    ),
    ("unexpected-file", with_file("modeling.py", b"import os"), InvalidRequest, "unexpected file"),
    *[
        (f"pickle{ext}", with_file(f"adapter_model{ext}", b"\x80\x04K\x01."), InvalidRequest, "pickle")
        for ext in (".bin", ".pt", ".pth", ".pkl", ".ckpt")
    ],
    *[
        (f"name-{i}", with_file(name, b"x"), InvalidRequest, "file name")
        for i, name in enumerate(["../x", "/etc/passwd", "a/b", "a\\b", "", "x\0y", "..", ".hidden"])
    ],
    ("too-large", with_file("README.md", b"x" * (1 << 20)), CapacityExceeded, "limit of 1048576 bytes"),
]


@pytest.mark.parametrize(("make", "error", "needle"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_malformed_uploads_change_nothing(admin, good, make, error, needle) -> None:
    upload(admin, good)
    before = tree(admin.store.root)
    with pytest.raises(error) as info:
        upload(admin, make(good))
    assert needle in str(info.value), str(info.value)
    assert str(admin.store.root) not in str(info.value) and "upload-" not in str(info.value)  # no paths
    assert tree(admin.store.root) == before
    assert admin.manager.names("acme") == ["lora"] and admin.manager.info("acme/lora").version == "v1"


def test_rank_above_the_server_max(admin, rank12) -> None:
    with pytest.raises(InvalidRequest, match="rank 12 exceeds the server's max rank 8"):
        upload(admin, rank12)
    assert admin.manager.names("acme") == []


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_adapter_for_another_base_is_failed_precondition(admin, foreign, kind) -> None:
    with pytest.raises(FailedPrecondition, match="another base model"):
        upload(admin, foreign[kind])
    assert admin.manager.names("acme") == [] and tree(admin.store.root) == [(".tmp", -1), (".trash", -1)]


def test_invalid_ids_and_tenant_quota(admin, good) -> None:
    for tenant, name in (("acme", "../x"), ("acme", "Bad"), ("UP", "x"), ("acme", "")):
        with pytest.raises(InvalidRequest):
            upload(admin, good, name=name, tenant=tenant)
    for name in ("a", "b", "c"):
        upload(admin, good, name=name)
    upload(admin, good, name="a")  # a new version of an existing adapter is within quota
    with pytest.raises(CapacityExceeded, match="holds 3 adapters"):
        upload(admin, good, name="d")
    upload(admin, good, name="d", tenant="globex")


def test_versions_prune_list_get_delete_and_tenant_scope(admin, good) -> None:
    manifests = [upload(admin, good) for _ in range(3)]
    assert [m.version for m in manifests] == ["v1", "v2", "v3"]
    m = manifests[-1]
    assert (m.kind, m.peft_type, m.ranks, m.base_fingerprint) == (
        "lora",
        "LORA",
        (4,),
        admin.manager.base.fingerprint,
    )
    assert {f.name: f.sha256 for f in m.files}[WEIGHTS] == sha256_hex(good[WEIGHTS])
    assert len(m.target_modules) == 4 and m.nbytes == sum(map(len, good.values()))
    versions = sorted(p.name for p in (admin.store.root / "acme" / "lora").iterdir())
    assert versions == ["v2", "v3"]  # keep_versions=2: v1 pruned from disk and registry
    with pytest.raises(AdapterNotFound):
        admin.manager.registry.lookup("acme/lora@v1")

    for name in ("b", "c"):
        upload(admin, good, name=name)
    page, token = asyncio.run(admin.list("acme", 2, ""))
    assert [s.manifest.adapter_id for s in page] == ["acme/b", "acme/c"] and token == "acme/c"
    page, token = asyncio.run(admin.list("acme", 2, token))
    assert [s.manifest.adapter_id for s in page] == ["acme/lora"] and token == ""
    assert asyncio.run(admin.list("globex", 10, "")) == ([], "")
    upload(admin, good, name="g", tenant="globex")
    every, _ = asyncio.run(admin.list(None, 10, ""))  # local mode: every tenant's
    assert [s.manifest.adapter_id for s in every] == ["acme/b", "acme/c", "acme/lora", "globex/g"]
    status = asyncio.run(admin.get("acme", "lora"))
    assert status.manifest.version == "v3" and status.tier == "host" and not status.pinned
    with pytest.raises(AdapterNotFound, match="adapter 'globex/lora' not found"):
        asyncio.run(admin.get("globex", "lora"))
    with pytest.raises(AdapterNotFound):
        asyncio.run(admin.delete("globex", "lora"))
    asyncio.run(admin.delete("acme", "lora"))
    assert not (admin.store.root / "acme" / "lora").exists()
    with pytest.raises(AdapterNotFound):
        asyncio.run(admin.get("acme", "lora"))
    assert upload(admin, good).version == "v4"  # numbers are not reused while the process lives
