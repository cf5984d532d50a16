"""A start on the packed weights an earlier start kept: it reads them in place of the checkpoint's Linear
weights, in the background while the model is read, runs bit for bit as a start that read them all, and
reads the checkpoint whole where the entry fails its checks."""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.engine import engine as engine_module
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import GenerationRequest, SamplingParams
from peftserve.model.loader import find_base_model, read_base_model
from peftserve.runner import packed_cache
from peftserve.runner.linear import PackedLinear, pack_linears, packing_targets
from peftserve.runner.packed_cache import WEIGHTS, PackedCache, usable
from tests.engine.conftest import random_prompts
from tests.runner.test_packed_cache import (
    _drop_a_layer,
    _flip_first_layer,
    _garble_index,
    _kept,
    _loaded,
    _reshape_a_layer,
    _truncate,
)

pytestmark = pytest.mark.skipif(not usable(torch.float32), reason="packed weights cannot be kept here")

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True)


def _requests() -> list[GenerationRequest]:
    prompts = random_prompts([5, 13, 2], 100, seed=7)
    return [GenerationRequest(f"r{i}", prompt_token_ids=p, sampling=PARAMS) for i, p in enumerate(prompts)]


def _served(engine: LLMEngine) -> list[tuple[list[int], list]]:
    done = engine.generate_all(_requests())
    return [(done[r.request_id].token_ids, done[r.request_id].logprobs) for r in _requests()]


def _share(weights: Path) -> float:
    mapped = torch.UntypedStorage.from_file(str(weights), shared=False, nbytes=weights.stat().st_size)
    return packed_cache.cached_share(mapped)


def _evict(weights: Path) -> None:
    """Drop the file from the page cache, or skip where this file system keeps it (tmpfs)."""
    fd = os.open(weights, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _share(weights) > 0.1:
        pytest.skip("this file system keeps the file's pages (tmpfs?)")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_read_without_its_linear_weights_runs_on_the_kept_ones_bit_for_bit(
    model_dir, tmp_path, dtype
):
    if not usable(getattr(torch, dtype)):
        pytest.skip(f"no packed {dtype} here")
    root = tmp_path / "packed"
    _kept(model_dir, root, dtype)
    later = PackedCache(root, model_dir, getattr(torch, dtype))
    unread = later.prefetch()
    targets = packing_targets(_loaded(model_dir, dtype))
    assert unread == {f"{path}.weight" for path in targets[1:]}  # the first is read, to compare
    loaded = read_base_model(find_base_model(str(model_dir), "cpu", dtype), unread)
    assert loaded.unread == unread
    assert later.restore(loaded.model, loaded.unread) == len(targets)
    assert later.reading is None  # just written, so all in the page cache: nothing to read in
    layers = [loaded.model.get_submodule(path) for path in targets]
    assert all(isinstance(m, PackedLinear) and m._holder is not None for m in layers)
    reference = _loaded(model_dir, dtype)
    pack_linears(reference)
    ids = torch.tensor([random_prompts([11], 100, seed=3)[0]])
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)


def test_a_start_reads_only_what_the_kept_weights_do_not_hold(model_dir, tmp_path, monkeypatch, caplog):
    root = tmp_path / "packed"
    _kept(model_dir, root)
    read = []

    def recording(source, unread=frozenset()):
        read.append(loaded := read_base_model(source, unread))
        return loaded

    monkeypatch.setattr(engine_module, "read_base_model", recording)
    config = EngineConfig(model=str(model_dir), dtype="float32", packed_cache=str(root), warm_up="before")
    with caplog.at_level(logging.INFO):
        engine = LLMEngine.create(config)
    assert len(read) == 1 and len(read[0].unread) == len(packing_targets(_loaded(model_dir))) - 1
    assert "run on packed weights kept in" in caplog.text and "again, whole" not in caplog.text
    assert engine.runner.keeping is None and engine.runner.warming == ()  # nothing packed, nothing left
    monkeypatch.undo()
    assert _served(engine) == _served(LLMEngine.create(replace(config, packed_cache="off")))


@pytest.mark.parametrize(
    ("damage", "read_twice"),
    [(_flip_first_layer, True), (_reshape_a_layer, True), (_drop_a_layer, True), (_truncate, False),
     (_garble_index, False)],
)  # fmt: skip
def test_a_start_on_a_damaged_entry_reads_the_model_whole_and_serves_as_without_it(
    model_dir, tmp_path, damage, read_twice, caplog
):
    root = tmp_path / "packed"
    damage(_kept(model_dir, root).entry)
    config = EngineConfig(model=str(model_dir), dtype="float32", packed_cache=str(root), warm_up="before")
    with caplog.at_level(logging.INFO):
        engine = LLMEngine.create(config)
    assert "packed weights kept in" in caplog.text and "not used" in caplog.text
    assert ("again, whole" in caplog.text) == read_twice  # the rest are refused before any read
    assert engine.runner.keeping.result(timeout=60).startswith("packed weights kept in")  # packed anew
    served = _served(engine)
    assert served == _served(LLMEngine.create(replace(config, packed_cache="off")))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = LLMEngine.create(config)  # on the entry kept anew
    assert "run on packed weights kept in" in caplog.text and "not used" not in caplog.text
    assert again.runner.keeping is None and _served(again) == served


def test_the_kept_file_is_read_in_from_the_disk_in_the_background(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "packed"
    cache = _kept(model_dir, root)
    weights = cache.entry / WEIGHTS
    _evict(weights)
    monkeypatch.setattr(packed_cache, "READ_CHUNK", packed_cache.PAGE * 3)  # several chunks, one short
    later = PackedCache(root, model_dir, torch.float32)
    assert later.prefetch()
    assert later.reading.result(timeout=60).startswith(f"{weights.stat().st_size / 1e9:.2f} GB of packed")
    assert _share(weights) == 1.0


def test_a_close_stops_reading_the_kept_file_in(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "packed"
    _kept(model_dir, root)
    monkeypatch.setattr(packed_cache, "cached_share", lambda storage: 0.0)  # as if out of the page cache
    later = PackedCache(root, model_dir, torch.float32)
    later.close()
    assert later.prefetch()
    assert later.reading.result(timeout=60) == "reading the packed weights in stopped"


def test_reading_the_kept_weights_in_is_warm_up_work_the_steps_need_not_wait_for(
    model_dir, tmp_path, monkeypatch
):
    root = tmp_path / "packed"
    _kept(model_dir, root)
    pending: Future[str] = Future()
    pending.set_running_or_notify_cancel()
    monkeypatch.setattr(packed_cache, "_read_in", lambda storage, stop: pending)
    monkeypatch.setattr(packed_cache, "cached_share", lambda storage: 0.0)
    config = EngineConfig(
        model=str(model_dir), dtype="float32", packed_cache=str(root), warm_up="background", attention="sdpa"
    )
    engine = LLMEngine.create(config)
    assert engine.runner.warming == ("reading the packed weights",)
    served = _served(engine)  # the steps read what they use from the file themselves
    assert not engine.runner.wait_warm_up(timeout=0.1)
    pending.set_result("read in")
    assert engine.runner.wait_warm_up(timeout=10) and engine.runner.warming == ()
    assert served == _served(LLMEngine.create(replace(config, packed_cache="off", warm_up="before")))
    engine.runner.close()
    assert engine.runner._packed_cache._closed.is_set()  # a close stops the reading too
