"""Property tests of what callers and uploads control: adapter ids, safetensors bytes, config JSON.

Each input is either refused with the error the API maps to a status (InvalidRequest / AdapterRejected /
AdapterNotFound), or accepted with the invariants the rest of the server relies on; nothing else.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as numpy_load
from safetensors.numpy import save as numpy_save

from peftserve.adapters.peft_format import MAX_MAGNITUDE
from peftserve.errors import AdapterNotFound, AdapterRejected, InvalidRequest
from peftserve.store.ids import full_adapter_id, split_id, split_version
from peftserve.store.peft_files import parse_config
from peftserve.store.safetensors_header import FLOAT_DTYPES, check_safetensors

FULL_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}/[a-z0-9][a-z0-9._-]{0,63}(@v[1-9][0-9]{0,8})?")
ID_TEXT = st.one_of(
    st.text(max_size=150),
    st.text(alphabet="abc./@v19-_\\%\0．", max_size=20),
    st.from_regex(r"([a-z0-9][a-z0-9._-]{0,4}/)?[a-z0-9.][a-z0-9._/-]{0,6}(@v[0-9]{1,3})?", fullmatch=True),
)


@settings(max_examples=1000, deadline=None)
@given(ID_TEXT, st.sampled_from(["acme", "default"]), st.booleans())
def test_adapter_ids_are_full_ids_or_refused(text: str, tenant: str, local_mode: bool) -> None:
    try:
        full = full_adapter_id(text, tenant, local_mode)
    except (InvalidRequest, AdapterNotFound) as err:
        assert len(str(err)) < 300
        event("refused")
        return
    event("accepted")
    assert FULL_ID.fullmatch(full), full
    assert ".." not in full.split("@")[0].split("/") and "\\" not in full and "\0" not in full
    base, version = split_version(full)
    owner, name = split_id(base)
    assert local_mode or owner == tenant
    assert full_adapter_id(full, owner, local_mode=False) == full  # idempotent for its owner
    root = Path("/store").resolve()
    assert (root / owner / name).resolve().parent.parent == root  # never leaves the store


@st.composite
def tensor_dicts(draw) -> dict[str, np.ndarray]:
    names = draw(
        st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True), min_size=1, max_size=4, unique=True)
    )
    dtypes = {"F32": np.float32, "F16": np.float16}
    return {
        name: np.zeros(
            draw(st.lists(st.integers(0, 4), max_size=3)), dtype=dtypes[draw(st.sampled_from(list(dtypes)))]
        )
        for name in names
    }


@settings(max_examples=300, deadline=None)
@given(tensor_dicts())
def test_files_saved_by_safetensors_are_accepted(tensors: dict[str, np.ndarray]) -> None:
    entries = check_safetensors(numpy_save(tensors))
    assert {e.name for e in entries} == set(tensors)
    assert all(e.dtype in FLOAT_DTYPES for e in entries)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_dicts(), st.data())
def test_altered_files_are_refused_or_parse(tensors: dict[str, np.ndarray], data: st.DataObject) -> None:
    """Whatever the hand-written check accepts, the safetensors library reads with the same tensors."""
    raw = bytearray(numpy_save(tensors))
    header_len = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "append", "header-byte", "length"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del raw[data.draw(st.integers(0, len(raw))) :]
        elif kind == "append":
            raw += data.draw(st.binary(max_size=16))
        elif kind == "header-byte" and len(raw) > 8 + header_len > 9:
            raw[data.draw(st.integers(8, 8 + header_len - 1))] = ord(
                data.draw(st.sampled_from('{}[]":,0 9ae'))
            )
        elif kind == "length" and len(raw) >= 8:
            raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    try:
        entries = check_safetensors(bytes(raw))
    except AdapterRejected as err:
        assert "adapter_model.safetensors" in str(err) and len(str(err)) < 600
        event("refused")
        return
    event("accepted")
    loaded = numpy_load(bytes(raw))  # never raises on what the check let through
    assert {e.name for e in entries} == set(loaded)
    for e in entries:
        assert loaded[e.name].shape == e.shape


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_bytes_are_an_object_or_refused(data: bytes) -> None:
    try:
        config = parse_config(data)
    except AdapterRejected as err:
        assert str(err).startswith("adapter_config.json")
        return
    assert isinstance(config, dict)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
LORA_FIELDS = [
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "target_modules",
    "layers_to_transform",
    "bias",
    "init_lora_weights",
    "fan_in_fan_out",
    "modules_to_save",
    "use_dora",
    "peft_type",
    "init_r",
    "num_virtual_tokens",
]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.adapters import peft_factory as pf
    from tests.helpers.tiny_models import build_tiny_model

    base, _ = build_tiny_model("llama")
    return pf.make_lora_patterns(base, "llama", tmp_path_factory.mktemp("lora") / "lora")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(LORA_FIELDS), JSON_VALUES | st.integers(0, 8), max_size=4))
def test_any_config_loads_exactly_or_is_rejected(lora_dir: Path, tmp_path_factory, edits: dict) -> None:
    from peftserve.adapters.loading import load_adapter

    config = {**json.loads((lora_dir / "adapter_config.json").read_text()), **edits}
    folder = tmp_path_factory.mktemp("edited")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((lora_dir / "adapter_model.safetensors").read_bytes())
    try:
        adapter = load_adapter(folder)
    except AdapterRejected as err:
        assert len(str(err)) < 1100
        event("refused")
        return
    event("accepted")
    assert adapter.deltas
    for _, tensor in adapter.served_tensors():  # what the kernels will compute with: finite, bounded
        assert bool(tensor.isfinite().all()) and float(tensor.abs().max()) <= MAX_MAGNITUDE
