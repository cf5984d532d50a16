"""load_base_model: frozen models of every tiny family, and clear InvalidRequest for user mistakes."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from peftserve.errors import InvalidRequest
from peftserve.model import loader
from peftserve.model.default_model import DEFAULT_MODEL_NAME
from peftserve.model.loader import LoadedModel, load_base_model, resolve_dtype
from tests.helpers.tiny_models import ALL_FAMILIES


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_loads_each_family_frozen(tiny_family_dir: Path) -> None:
    loaded = load_base_model(str(tiny_family_dir), device="cpu", dtype="float32")
    assert isinstance(loaded, LoadedModel)
    assert loaded.family == loaded.model.config.model_type
    assert loaded.model_id == tiny_family_dir.name
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.max_context == 512
    assert loaded.eos_token_ids == (loaded.tokenizer.eos_token_id,)
    assert not loaded.model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"


def test_default_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    loaded = load_base_model("default", device="cpu", dtype="bfloat16")
    assert (loaded.model_id, loaded.family, loaded.max_context) == ("default", "llama", 2048)
    assert loaded.dtype == torch.bfloat16 and next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.eos_token_ids == (2,)
    assert (tmp_path / "models" / DEFAULT_MODEL_NAME / "model.safetensors").is_file()


def test_eos_ids_merge_generation_config_and_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    directory = copy_model(tiny_llama_dir, tmp_path / "m")
    generation = json.loads((directory / "generation_config.json").read_text())
    generation["eos_token_id"] = [5, 2, 5]
    (directory / "generation_config.json").write_text(json.dumps(generation))
    assert load_base_model(str(directory), "cpu", "auto").eos_token_ids == (5, 2)


@pytest.mark.parametrize("family", ["gpt_neox", "falcon", "bloom", "mpt"])
def test_unsupported_family_is_named(family: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    directory = copy_model(tiny_llama_dir, tmp_path / "m")
    (directory / "config.json").write_text(json.dumps({"model_type": family}))
    with pytest.raises(InvalidRequest, match=rf"'{family}' is not supported.*nearest .* is 'llama'"):
        load_base_model(str(directory), "cpu", "auto")


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="is not a directory"):
        load_base_model(str(tmp_path / "nope"), "cpu", "auto")
    with pytest.raises(InvalidRequest, match="no config.json"):
        load_base_model(str(tmp_path), "cpu", "auto")


def test_pickle_only_weights_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    directory = copy_model(tiny_llama_dir, tmp_path / "m")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(InvalidRequest, match=r"pickled weights \(pytorch_model.bin\).*safetensors only"):
        load_base_model(str(directory), "cpu", "auto")
    (directory / "pytorch_model.bin").unlink()
    with pytest.raises(InvalidRequest, match="no \\*.safetensors"):
        load_base_model(str(directory), "cpu", "auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(tiny_llama_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"cuda requested but torch.cuda.is_available\(\) is False"):
        load_base_model(str(tiny_llama_dir), "cuda", "auto")


@pytest.mark.parametrize(("device", "dtype"), [("tpu", "auto"), ("cpu", "float64"), ("nonsense:x", "auto")])
def test_bad_device_or_dtype(device: str, dtype: str, tiny_llama_dir: Path) -> None:
    with pytest.raises(InvalidRequest):
        load_base_model(str(tiny_llama_dir), device, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_is_bfloat16(tiny_llama_dir: Path) -> None:
    loaded = load_base_model(str(tiny_llama_dir), "cuda", "auto")
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cuda"
    assert next(loaded.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize(
    ("units", "expected"), [("AVX512-BF16", torch.bfloat16), ("AMX", torch.bfloat16), (None, torch.float32)]
)
def test_auto_on_cpu_is_bfloat16_where_the_cpu_has_bfloat16_units(
    units, expected, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(loader, "cpu_bf16_units", lambda: units)
    with caplog.at_level(logging.INFO, logger=loader.__name__):
        assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert f"dtype auto: {str(expected).removeprefix('torch.')}" in caplog.text
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # a named dtype is kept


def test_bf16_units_agree_with_the_kernel_flags(monkeypatch) -> None:
    found = loader.cpu_bf16_units()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # torch's probe gone: /proc/cpuinfo
    assert loader.cpu_bf16_units() == found


def test_auto_is_reported_in_model_info(tiny_llama_dir: Path, monkeypatch) -> None:
    from peftserve.config import EngineConfig
    from peftserve.engine.engine import LLMEngine

    monkeypatch.setattr(loader, "cpu_bf16_units", lambda: "AVX512-BF16")
    engine = LLMEngine.create(EngineConfig(model=str(tiny_llama_dir), kv_cache_mb=1))
    assert engine.model_info.dtype == "bfloat16"
    assert engine.runner.cache.keys.dtype == torch.bfloat16


def _linear_weights(model: torch.nn.Module) -> list[str]:
    """The weights of the model's Linear layers but a head tied to the embeddings (what a start leaves
    unread when the packed weights are kept)."""
    embeddings = model.get_input_embeddings().weight
    linears = [(path, m) for path, m in model.named_modules() if type(m) is torch.nn.Linear]
    return [f"{path}.weight" for path, m in linears if m.weight is not embeddings]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "read-in"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_unread_weights_are_left_as_placeholders_and_the_rest_read_as_from_pretrained(
    family: str, cached: bool, tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tiny_model_dir(family)
    monkeypatch.setattr(loader, "_in_page_cache", lambda path: cached)  # or what is read, read in first
    whole = load_base_model(str(directory), "cpu", "float32")
    source = loader.find_base_model(str(directory), "cpu", "float32")
    weights = _linear_weights(whole.model)[1::2]  # every other one
    if family == "gpt2":
        weights = ["transformer.h.0.attn.c_attn.weight"]  # Conv1D layers: no Linear but the tied head
    unread = {*weights, "model.no_such.weight"}  # a name the checkpoint does not hold is only read
    part = loader.read_base_model(source, unread)
    assert part.unread == frozenset(weights) and weights
    parameters = dict(part.model.named_parameters())
    assert parameters.keys() == dict(whole.model.named_parameters()).keys()
    for name, value in whole.model.named_parameters():
        assert parameters[name].shape == value.shape and parameters[name].dtype == value.dtype
        assert not parameters[name].requires_grad
        if name not in weights:
            assert torch.equal(parameters[name], value), name
    for name, value in whole.model.named_buffers():
        assert torch.equal(part.model.get_buffer(name), value), name
    assert part.model.generation_config.to_dict() == whole.model.generation_config.to_dict()
    assert part.model.config.to_dict() == whole.model.config.to_dict()
    assert part.eos_token_ids == whole.eos_token_ids and not part.model.training
    assert (part.family, part.model_id, part.max_context) == (whole.family, whole.model_id, whole.max_context)


def test_a_sharded_checkpoint_leaves_its_unread_weights_in_every_shard(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    whole = load_base_model(str(tiny_llama_dir), "cpu", "float32")
    directory = tmp_path / "sharded"
    whole.model.save_pretrained(directory, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).is_file():
            shutil.copy(tiny_llama_dir / name, directory / name)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (directory / "model.safetensors").exists()
    (directory / "stray.safetensors").write_bytes(shards[0].read_bytes())  # not in the index: never read
    weights = _linear_weights(whole.model)
    part = loader.read_base_model(loader.find_base_model(str(directory), "cpu", "float32"), weights[1:])
    assert part.unread == frozenset(weights[1:])
    assert torch.equal(part.model.get_parameter(weights[0]), whole.model.get_parameter(weights[0]))
    assert torch.equal(part.model.get_input_embeddings().weight, whole.model.get_input_embeddings().weight)


def test_a_weight_transformers_would_convert_is_read_with_the_rest(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    whole = load_base_model(str(tiny_llama_dir), "cpu", "float32")
    weights = _linear_weights(whole.model)
    real = loader.MODEL_FOR_CAUSAL_LM_MAPPING[type(whole.model.config)]

    class KeepsOneInFloat64(real):  # as a model class with a module kept in another dtype
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            model = real.from_pretrained(*args, **kwargs)
            layer = model.get_submodule(weights[1].removesuffix(".weight"))
            layer.weight = torch.nn.Parameter(layer.weight.double().float())  # a copy, as a conversion makes
            return model

    monkeypatch.setattr(loader, "MODEL_FOR_CAUSAL_LM_MAPPING", {type(whole.model.config): KeepsOneInFloat64})
    with caplog.at_level(logging.INFO, logger="peftserve.model.loader"):
        part = loader.read_base_model(loader.find_base_model(str(tiny_llama_dir), "cpu", "float32"), weights)
    assert "reading them all" in caplog.text
    assert part.unread == frozenset()
    for name, value in whole.model.named_parameters():
        assert torch.equal(part.model.get_parameter(name), value), name


def test_a_file_out_of_the_page_cache_is_told_from_one_in_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peftserve.runner.linear import cached_share

    path = tmp_path / "weights.safetensors"
    path.write_bytes((tiny_llama_dir / "model.safetensors").read_bytes() * 8)  # a few pages to sample
    assert loader._in_page_cache(path)  # just written
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    if cached_share(mapped) > 0.1:
        pytest.skip("this file system keeps the file's pages (tmpfs?)")
    assert not loader._in_page_cache(path)
    path.read_bytes()
    assert loader._in_page_cache(path)


def _page_cached(path: Path, offset: int) -> bool:
    """Whether the page of `path` at `offset` is in the page cache (read without waiting: RWF_NOWAIT;
    where it is not, the kernel starts reading it and a little after it in)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], offset // 4096 * 4096, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_only_the_tensors_to_read_are_read_into_the_page_cache(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    big = 8 * 2**20  # float32 elements: 32 MiB, past any read-ahead
    tensors = {"a.weight": torch.ones(big), "b.norm": torch.arange(-8.0, 0.0), "c.weight": torch.ones(big)}
    save_file(tensors, path)  # in the file in that order
    at = path.read_bytes().index(tensors["b.norm"].numpy().tobytes())
    size = path.stat().st_size
    assert 32 * 2**20 < at < size - 32 * 2**20
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _page_cached(path, at):
        pytest.skip("this file system keeps the file's pages (tmpfs?)")
    loader._read_into_page_cache(path, ["b.norm"])
    assert _page_cached(path, at)
    assert not _page_cached(path, at - 2**20) and not _page_cached(path, at + 16 * 2**20)  # no read-around
    loader._read_into_page_cache(path, ["c.weight"], piece=2**20)
    assert all(_page_cached(path, offset) for offset in range(size - 1, at, -(2**20)))


def test_garbage_collection_is_paused_while_reading_and_left_as_it_was() -> None:
    import gc

    assert gc.isenabled()
    with loader.garbage_collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(RuntimeError), loader.garbage_collection_paused():
            raise RuntimeError("a failed read")
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
