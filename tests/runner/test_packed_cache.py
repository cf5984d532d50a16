"""Packed weights kept across starts: a later start maps them back bit for bit and serves the same tokens;
a stale, damaged or half-written entry is never used; keeping them never stops the engine."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import GenerationRequest, SamplingParams
from peftserve.errors import InvalidRequest
from peftserve.model.loader import load_base_model
from peftserve.runner import packed_cache
from peftserve.runner.linear import PackedLinear, pack_linears, packing_targets
from peftserve.runner.packed_cache import INDEX, WEIGHTS, PackedCache, usable
from tests.engine.conftest import random_prompts

pytestmark = pytest.mark.skipif(not usable(torch.float32), reason="packed weights cannot be kept here")

PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=True)


def _loaded(model_dir: Path, dtype: str = "float32") -> nn.Module:
    return load_base_model(str(model_dir), "cpu", dtype).model


def _kept(model_dir: Path, root: Path, dtype: str = "float32") -> PackedCache:
    """The model's packed weights written as an entry under root (by a first start's steps)."""
    model = _loaded(model_dir, dtype)
    pack_linears(model)
    cache = PackedCache(root, model_dir, model.dtype)
    assert cache.keep(model).startswith("packed weights kept in")
    return cache


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kept_weights_unpack_bit_for_bit_and_give_the_same_logits(model_dir, tmp_path, dtype):
    if not usable(getattr(torch, dtype)):
        pytest.skip(f"no packed {dtype} here")
    cache = _kept(model_dir, tmp_path / "packed", dtype)
    plain, packed, restored = _loaded(model_dir, dtype), _loaded(model_dir, dtype), _loaded(model_dir, dtype)
    pack_linears(packed)
    targets = packing_targets(plain)
    assert cache.restore(restored) == len(targets) > 0
    for path in targets:
        layer = restored.get_submodule(path)
        assert isinstance(layer, PackedLinear) and layer._holder is not None  # mapped, not packed here
        assert torch.equal(layer.weight, plain.get_submodule(path).weight)
    ids = torch.tensor([random_prompts([11], 100, seed=3)[0]])
    with torch.inference_mode():
        assert torch.equal(restored(ids).logits, packed(ids).logits)


def test_a_second_start_serves_the_same_tokens_on_the_kept_weights(model_dir, tmp_path, caplog):
    config = EngineConfig(model=str(model_dir), packed_cache=str(tmp_path / "packed"), warm_up="before")
    prompts = random_prompts([5, 17, 2], 100, seed=1)
    requests = [
        GenerationRequest(f"r{i}", prompt_token_ids=p, sampling=PARAMS) for i, p in enumerate(prompts)
    ]
    first = LLMEngine.create(config)
    assert "packed weights kept in" in first.runner.keeping.result(timeout=60)
    with caplog.at_level(logging.INFO, logger="peftserve.runner.packed_cache"):
        second = LLMEngine.create(config)
    assert "run on packed weights kept in" in caplog.text
    assert second.runner.keeping is None  # nothing was packed, so nothing to keep
    holders = {m._holder is not None for m in second.runner.model.modules() if isinstance(m, PackedLinear)}
    assert holders == {True}
    a, b = first.generate_all(requests), second.generate_all(requests)
    assert [a[r.request_id].token_ids for r in requests] == [b[r.request_id].token_ids for r in requests]
    assert [a[r.request_id].logprobs for r in requests] == [b[r.request_id].logprobs for r in requests]


def test_changed_weights_are_packed_again_and_their_old_entry_dropped(model_dir, tmp_path):
    root = tmp_path / "packed"
    old = _kept(model_dir, root)
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    model = _loaded(model_dir)
    new = PackedCache(root, model_dir, model.dtype)
    assert new.key != old.key and new.restore(model) == 0
    pack_linears(model)
    assert new.keep(model).startswith("packed weights kept in")
    assert _entries(root) == [new.key]  # the old entry would never be read again
    assert PackedCache(root, model_dir, torch.bfloat16).key != new.key  # and each dtype has its own


def _truncate(entry: Path) -> None:
    with open(entry / WEIGHTS, "r+b") as f:
        f.truncate(entry.joinpath(WEIGHTS).stat().st_size - 4096)


def _flip_first_layer(entry: Path) -> None:
    index = json.loads((entry / INDEX).read_text())
    first = min(index["layers"].values(), key=lambda layer: layer["offset"])
    with open(entry / WEIGHTS, "r+b") as f:
        f.seek(first["offset"] + 8)
        byte = f.read(1)
        f.seek(first["offset"] + 8)
        f.write(bytes([byte[0] ^ 0x40]))


def _reshape_a_layer(entry: Path) -> None:
    index = json.loads((entry / INDEX).read_text())
    layer = next(iter(index["layers"].values()))
    layer["shape"] = [layer["shape"][1], layer["shape"][0] + 1]
    (entry / INDEX).write_text(json.dumps(index))


def _garble_index(entry: Path) -> None:
    (entry / INDEX).write_text('{"format": 1, "layers": ')


def _drop_a_layer(entry: Path) -> None:
    index = json.loads((entry / INDEX).read_text())
    index["layers"].pop(next(iter(index["layers"])))
    (entry / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "damage", [_truncate, _flip_first_layer, _reshape_a_layer, _garble_index, _drop_a_layer]
)
def test_a_damaged_entry_is_removed_and_the_engine_packs_and_serves_as_without_it(
    model_dir, tmp_path, damage, caplog
):
    root = tmp_path / "packed"
    cache = _kept(model_dir, root)
    damage(cache.entry)
    model = _loaded(model_dir)
    with caplog.at_level(logging.WARNING, logger="peftserve.runner.packed_cache"):
        assert cache.restore(model) == 0
    assert "not used" in caplog.text and not cache.entry.exists()
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # all or nothing
    config = EngineConfig(model=str(model_dir), packed_cache=str(root), warm_up="before")
    engine = LLMEngine.create(config)
    assert engine.runner.keeping.result(timeout=60).startswith("packed weights kept in")
    request = GenerationRequest("r", prompt_token_ids=[3, 4, 5], sampling=PARAMS)
    assert len(engine.generate_all([request])["r"].token_ids) == PARAMS.max_new_tokens


def test_a_writer_that_died_leaves_only_a_temporary_which_the_next_writer_sweeps(model_dir, tmp_path):
    root = tmp_path / "packed"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    model = _loaded(model_dir)
    cache = PackedCache(root, model_dir, model.dtype)
    temporary = root / f".{cache.key}.{int(dead.stdout)}.tmp"
    temporary.mkdir(parents=True)
    (temporary / WEIGHTS).write_bytes(b"\0" * 4096)  # cut off before its index
    assert cache.restore(model) == 0  # a temporary is never read
    pack_linears(model)
    assert cache.keep(model).startswith("packed weights kept in")
    assert _entries(root) == [cache.key]


def test_a_close_while_writing_leaves_nothing(model_dir, tmp_path):
    model = _loaded(model_dir)
    pack_linears(model)
    cache = PackedCache(tmp_path / "packed", model_dir, model.dtype)
    stop = threading.Event()
    stop.set()
    assert cache.keep(model, stop) == "packed weights not kept: the engine closed"
    assert _entries(tmp_path / "packed") == []


def test_only_a_model_whose_every_layer_is_packed_is_kept(model_dir, tmp_path):
    model = _loaded(model_dir)
    first = packing_targets(model)[0]
    pack_linears(model.get_submodule(first.rpartition(".")[0]))  # one block's layers, not the rest
    cache = PackedCache(tmp_path / "packed", model_dir, model.dtype)
    assert cache.keep(model) == "packed weights not kept: some layers are not packed"
    assert not (tmp_path / "packed").exists()


def test_without_room_or_a_writable_directory_nothing_is_kept_and_nothing_raised(
    model_dir, tmp_path, monkeypatch, caplog
):
    model = _loaded(model_dir)
    pack_linears(model)
    (tmp_path / "a-file").write_text("")
    cache = PackedCache(tmp_path / "a-file" / "packed", model_dir, model.dtype)
    assert cache.keep(model).startswith(f"packed weights not kept in {tmp_path / 'a-file' / 'packed'}")
    full = shutil.disk_usage(tmp_path)._replace(free=packed_cache.FREE_MARGIN)
    monkeypatch.setattr(packed_cache.shutil, "disk_usage", lambda path: full)
    cache = PackedCache(tmp_path / "packed", model_dir, model.dtype)
    assert "GB free in" in cache.keep(model)
    assert _entries(tmp_path / "packed") == []
    warned = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("the next start packs again" in m for m in warned)


def test_an_entry_kept_once_is_not_written_again(model_dir, tmp_path):
    cache = _kept(model_dir, tmp_path / "packed")
    model = _loaded(model_dir)
    pack_linears(model)
    written = (cache.entry / WEIGHTS).stat().st_mtime_ns
    targets = len(packing_targets(_loaded(model_dir)))
    assert cache.keep(model).startswith(
        f"packed weights already kept in {cache.entry}: {targets} layers moved"
    )
    assert (cache.entry / WEIGHTS).stat().st_mtime_ns == written


def test_the_probe_refuses_wrapping_that_does_not_give_the_packed_weight_back(monkeypatch, caplog):
    probe = usable.__wrapped__  # usable() is cached per dtype
    assert probe(torch.float32) and not probe(torch.float16)  # float16 is not packed at all
    other = packed_cache.pack(torch.zeros(48, 40))
    monkeypatch.setattr(packed_cache, "wrap", lambda *args: other)
    assert not probe(torch.float32)

    monkeypatch.undo()

    def missing():
        raise OSError("libtorch_cpu.so: cannot open shared object file")

    monkeypatch.setattr(packed_cache, "_shim", missing)
    with caplog.at_level(logging.WARNING, logger="peftserve.runner.packed_cache"):
        assert not probe(torch.float32)
    assert "cannot be kept across starts" in caplog.text


@pytest.mark.parametrize("value", ["", "a-file"])
def test_packed_cache_must_name_a_directory_or_off(tmp_path, value):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InvalidRequest, match="packed_cache must be a directory or 'off'"):
        EngineConfig(packed_cache=str(tmp_path / value) if value else value)
    assert EngineConfig(packed_cache="off").packed_cache == "off"


def test_two_starts_writing_at_once_leave_one_whole_entry(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "packed"
    other = _kept(model_dir, tmp_path / "other")  # what the other start wrote, renamed in just before ours
    model = _loaded(model_dir)
    pack_linears(model)
    cache = PackedCache(root, model_dir, model.dtype)
    write = PackedCache._write

    def beaten(self, directory, *args):
        write(self, directory, *args)
        shutil.copytree(other.entry, self.entry)

    monkeypatch.setattr(PackedCache, "_write", beaten)
    targets = len(packing_targets(_loaded(model_dir)))
    assert cache.keep(model).startswith(
        f"packed weights already kept in {cache.entry}: {targets} layers moved"
    )
    assert _entries(root) == [cache.key]  # ours is gone, theirs is whole, and this start moved onto it
    assert {m._holder is not None for m in model.modules() if isinstance(m, PackedLinear)} == {True}
    assert cache.restore(_loaded(model_dir)) == targets > 0


def test_peftserve_model_pack_keeps_what_a_later_start_maps(model_dir, tmp_path, capsys, monkeypatch):
    from peftserve.adapters.forms import low_rank_rows
    from peftserve.cli import main
    from peftserve.runner import paged_kernel

    root, kernels = tmp_path / "packed", tmp_path / "kernels"
    monkeypatch.setenv("PEFTSERVE_KERNEL_CACHE", str(kernels))
    for kernel in (paged_kernel.KERNEL, low_rank_rows.KERNEL):  # as a new process finds them: not loaded
        monkeypatch.setattr(kernel, "_loaded", {})
    argv = ["model", "pack", "--model", str(model_dir), "--dtype", "float32", "--packed-cache", str(root)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("packed weights kept in")
    assert f"C++ kernels built for torch.float32 and kept in {kernels}" in out
    built = sorted(p.name.rsplit("-", 1)[0] for p in kernels.iterdir())
    assert built == ["low-rank-rows-float32", "paged-attention-float32"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("packed weights already kept in")
    config = EngineConfig(model=str(model_dir), dtype="float32", packed_cache=str(root), attention="cpp")
    engine = LLMEngine.create(config)
    layers = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert engine.runner.keeping is None and {m._holder is not None for m in layers} == {True}  # mapped
    assert engine.runner.in_place is not None and engine.runner.warming == ()  # nothing left to warm up
    assert len(layers) == len(packing_targets(_loaded(model_dir)))  # though adapter layers wrap them now
    (tmp_path / "a-file").write_text("")
    assert main([*argv[:-1], str(tmp_path / "a-file" / "packed")]) == 1
    assert "error: packed weights not kept in" in capsys.readouterr().err
    assert main([*argv[:-1], "off"]) == 2
    assert "error: --packed-cache off keeps nothing" in capsys.readouterr().err
    assert main(["model", "pack", "--model", str(tmp_path / "missing"), "--packed-cache", str(root)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_the_share_of_a_file_in_the_page_cache_is_sampled_over_all_of_it(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(3000 * packed_cache.PAGE))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    assert packed_cache.cached_share(mapped) == 1.0  # just written
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if packed_cache.cached_share(mapped) > 0.1:
        pytest.skip("this file system keeps the file's pages (tmpfs?)")
    os.pread(fd, 1000 * packed_cache.PAGE, 2000 * packed_cache.PAGE)  # the last third, read back
    os.close(fd)
    assert 0.3 < packed_cache.cached_share(mapped) < 0.4
    assert packed_cache.cached_share(mapped, samples=10) == pytest.approx(1 / 3, abs=0.1)


def test_a_kept_file_out_of_the_page_cache_is_left_for_packing(model_dir, tmp_path, monkeypatch, caplog):
    cache = _kept(model_dir, tmp_path / "packed")
    weights = cache.entry / WEIGHTS

    def share() -> float:
        mapped = torch.UntypedStorage.from_file(str(weights), shared=False, nbytes=weights.stat().st_size)
        return packed_cache.cached_share(mapped)

    assert share() > packed_cache.RESIDENT_MIN  # just written
    fd = os.open(weights, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if share() > 0.1:
        pytest.skip("this file system keeps the file's pages (tmpfs?)")
    model = _loaded(model_dir)
    with caplog.at_level(logging.INFO, logger="peftserve.runner.packed_cache"):
        assert cache.restore(model) == 0
    assert "of them is in the page cache, so this start packs" in caplog.text
    assert cache.entry.exists() and not any(isinstance(m, PackedLinear) for m in model.modules())
    reference = _loaded(model_dir)
    targets = len(packing_targets(reference))
    pack_linears(reference)
    pack_linears(model)
    assert f": {targets} layers moved onto it" in cache.keep(model)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert {m._holder is not None for m in layers} == {True}  # the copies packed here are freed
    assert share() > packed_cache.RESIDENT_MIN  # so the next start maps it
    ids = torch.tensor([random_prompts([9], 100, seed=4)[0]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_moving_onto_a_damaged_entry_removes_it_and_keeps_the_copies_made_here(model_dir, tmp_path, caplog):
    cache = _kept(model_dir, tmp_path / "packed")
    index = json.loads((cache.entry / INDEX).read_text())
    last = max(index["layers"].values(), key=lambda layer: layer["offset"])
    with open(cache.entry / WEIGHTS, "r+b") as f:
        f.seek(last["offset"] + last["bytes"] - 1)
        byte = f.read(1)
        f.seek(last["offset"] + last["bytes"] - 1)
        f.write(bytes([byte[0] ^ 1]))
    model, reference = _loaded(model_dir), _loaded(model_dir)
    pack_linears(model)
    pack_linears(reference)
    with caplog.at_level(logging.WARNING, logger="peftserve.runner.packed_cache"):
        result = cache.keep(model)
    assert "removed" in result and "differ from those packed here" in result and not cache.entry.exists()
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert 0 < sum(m._holder is not None for m in layers) < len(layers)  # those before it had moved
    ids = torch.tensor([random_prompts([9], 100, seed=5)[0]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_nothing_is_written_where_torch_could_not_map_it_back(model_dir, tmp_path, monkeypatch):
    model = _loaded(model_dir)
    pack_linears(model)
    monkeypatch.setattr(packed_cache, "usable", lambda dtype: False)
    cache = PackedCache(tmp_path / "packed", model_dir, model.dtype)
    assert cache.keep(model) == "packed weights not kept: torch cannot map them back here"
    assert not (tmp_path / "packed").exists()
