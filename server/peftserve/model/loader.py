"""Load the frozen base model and its tokenizer from 'default' or a local HF directory, safely."""

from __future__ import annotations

import gc
import json
import logging
import os
import struct
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peftserve.errors import InvalidRequest
from peftserve.model.default_model import ensure_default_model
from peftserve.model.families import check_config
from peftserve.model.text import load_tokenizer
from peftserve.runner.linear import cached_share

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_UNITS = {"AMX": "amx_bf16", "AVX512-BF16": "avx512_bf16"}
"""The CPU units that multiply bfloat16 natively, and their /proc/cpuinfo flags."""


@dataclass(frozen=True)
class LoadedModel:
    """A frozen base model ready to serve, with what the engine needs to know about it."""

    model: PreTrainedModel
    """In eval mode, every parameter with requires_grad False."""
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    """'default' or the model directory's name."""
    directory: Path
    """Where it was loaded from."""
    family: str
    """config.model_type, e.g. 'llama'."""
    dtype: torch.dtype
    device: torch.device
    max_context: int
    """max_position_embeddings (or n_positions)."""
    eos_token_ids: tuple[int, ...]
    """From generation_config then config, deduplicated, in that order."""
    unread: frozenset[str] = frozenset()
    """Weights left unread (read_base_model's `unread`): uninitialized until the caller puts them."""


@dataclass(frozen=True)
class BaseModelSource:
    """A base model found and checked, before any of its weights is read (find_base_model)."""

    directory: Path
    model_id: str
    family: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device; InvalidRequest if it cannot be used here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InvalidRequest(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidRequest(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequest("cuda requested but torch.cuda.is_available() is False")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise InvalidRequest(f"{device} requested but only {count} CUDA devices exist")
    return resolved


def cpu_bf16_units() -> str | None:
    """The bfloat16 units of this CPU ('AMX' or 'AVX512-BF16'), or None where it has neither."""
    try:  # torch's own probes; private, hence the kernel's flags where they are missing
        amx, avx512 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
        present = {"AMX": amx, "AVX512-BF16": avx512}
    except AttributeError:
        flags = cpu_flags()
        present = {name: flag in flags for name, flag in BF16_UNITS.items()}
    return next((name for name, yes in present.items() if yes), None)


def cpu_flags() -> set[str]:
    """The flags /proc/cpuinfo gives this CPU (empty where it is not there)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.partition(":")[2].split()) for line in lines if line.startswith("flags")), set())


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and on CPUs with bfloat16 units (AVX512-BF16 or AMX), float32 on
    other CPUs; otherwise the named dtype."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        units = cpu_bf16_units()
        if units is None:
            log.info("dtype auto: float32 (this CPU has no bfloat16 units: AVX512-BF16 or AMX)")
            return torch.float32
        log.info("dtype auto: bfloat16 (this CPU multiplies it natively: %s)", units)
        return torch.bfloat16
    if dtype not in TORCH_DTYPES:
        raise InvalidRequest(f"dtype must be 'auto' or one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    return TORCH_DTYPES[dtype]


def resolve_model_dir(model: str) -> tuple[Path, str]:
    """The model directory and its id; 'default' builds the embedded model on first use."""
    if model == "default":
        return ensure_default_model(), "default"
    directory = Path(model).expanduser()
    if not directory.is_dir():
        raise InvalidRequest(f"model must be 'default' or a local directory; {model!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise InvalidRequest(f"model directory {model!r} has no config.json (is it a Hugging Face model?)")
    return directory.resolve(), directory.resolve().name


def check_family(directory: Path) -> str:
    """The config's model_type if we serve its family; InvalidRequest naming the nearest one otherwise."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{directory / 'config.json'} is not a readable JSON object: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidRequest(f"{directory / 'config.json'} is not a JSON object")
    return check_config(config).model_type


def check_safetensors(directory: Path) -> None:
    """Refuse directories without safetensors weights: pickled checkpoints can run arbitrary code."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidRequest(
            f"{directory} only has pickled weights ({', '.join(pickles)}); peftserve loads safetensors only "
            "(convert them, e.g. model.save_pretrained(dir, safe_serialization=True))"
        )
    raise InvalidRequest(f"{directory} has no *.safetensors weights")


def eos_token_ids(model: PreTrainedModel) -> tuple[int, ...]:
    """EOS ids of generation_config then config (each may be an int, a list or None), deduplicated."""
    ids: list[int] = []
    sources = (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id)
    for value in sources:
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def max_context(model: PreTrainedModel) -> int:
    """The longest sequence the model's positions cover."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    raise InvalidRequest(f"{model.config.model_type} config has no max_position_embeddings or n_positions")


def find_base_model(model: str, device: str, dtype: str) -> BaseModelSource:
    """Where `model` ('default' or a local HF directory) is, checked as one we serve, and the device and
    dtype ('auto' allowed) it will be read in."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    directory, model_id = resolve_model_dir(model)
    family = check_family(directory)
    check_safetensors(directory)
    return BaseModelSource(directory, model_id, family, torch_device, torch_dtype)


def load_base_model(model: str, device: str, dtype: str) -> LoadedModel:
    """Load `model` ('default' or a local HF directory) frozen, on `device`, in `dtype` ('auto' allowed)."""
    return read_base_model(find_base_model(model, device, dtype))


@contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, then back as it was. Reading a model and
    building an engine on it make objects by the hundred thousand, which set off full collections over
    everything the imports made, freeing nothing: 0.2 s of a 0.65 s start on a cached 3.87 GB model
    (benchmarks/bench_startup.py). Cycles made meanwhile go at the next collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_base_model(source: BaseModelSource, unread: Collection[str] = ()) -> LoadedModel:
    """Read the model `source` names, frozen.

    unread: weights (by parameter name) not to read from the checkpoint, because the caller has them in
    another form (the packed weights kept across starts: runner/packed_cache.py). Each is left as an
    uninitialized tensor of its shape and dtype, which costs no memory until written, for the caller to
    replace before anything reads it; LoadedModel.unread says which were left. Where transformers would
    not have put the checkpoint's tensor under that name as it is (a key it renames, a module kept in
    another dtype), the model is read whole instead.
    """
    with garbage_collection_paused():
        hf_model, left = None, frozenset()
        if unread:
            hf_model, left = _read_leaving_out(source, frozenset(unread))
        if hf_model is None:
            # transformers' default attention (sdpa, or eager for families without it: Gemma 2, GPT-OSS)
            # until the runner installs its own.
            hf_model = AutoModelForCausalLM.from_pretrained(
                source.directory,
                dtype=source.dtype,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
            )
        hf_model.to(source.device).eval().requires_grad_(False)
        tokenizer = load_tokenizer(source.directory)
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        model_id=source.model_id,
        directory=source.directory,
        family=source.family,
        dtype=source.dtype,
        device=source.device,
        max_context=max_context(hf_model),
        eos_token_ids=eos_token_ids(hf_model),
        unread=left,
    )


def _read_leaving_out(
    source: BaseModelSource, unread: frozenset[str]
) -> tuple[PreTrainedModel | None, frozenset[str]]:
    """The model read as from_pretrained reads it, from the checkpoint's tensors (mapped; where a file
    is not in the page cache, the bytes of the tensors to read are read into it first:
    _read_into_page_cache), but with a placeholder for each of `unread`, and the names of those left;
    (None, empty) where that cannot be done as from_pretrained does it: a checkpoint that is not
    model.safetensors or shards listed in its index, a config the causal-LM mapping names no one class
    for, or a placeholder that did not end up as its weight."""
    files = _checkpoint_files(source.directory)
    config = AutoConfig.from_pretrained(source.directory, local_files_only=True, trust_remote_code=False)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if files is None or not isinstance(model_class, type):
        return None, frozenset()
    placeholders: dict[str, torch.Tensor] = {}
    with ExitStack() as files_open:
        state: dict[str, object] = {}
        for file in files:
            checkpoint = files_open.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            if not _in_page_cache(file):
                _read_into_page_cache(file, [key for key in checkpoint.keys() if key not in unread])
            for key in checkpoint.keys():
                state[key] = checkpoint.get_slice(key)
                if key in unread:
                    shape = state[key].get_shape()
                    placeholders[key] = state[key] = torch.empty(shape, dtype=source.dtype)
        generation = source.directory / "generation_config.json"
        hf_model = model_class.from_pretrained(
            None,
            config=config,
            state_dict=state,
            dtype=source.dtype,
            generation_config=GenerationConfig.from_pretrained(source.directory)
            if generation.is_file()
            else None,
        )
    hf_model.config.name_or_path = str(source.directory)  # from_pretrained(None) set None
    parameters = dict(hf_model.named_parameters())
    if any(
        name not in parameters or parameters[name].data_ptr() != placeholder.data_ptr()
        for name, placeholder in placeholders.items()
    ):
        log.info(
            "%s: transformers converts weights that were to be left unread; reading them all", source.model_id
        )
        return None, frozenset()
    return hf_model, frozenset(placeholders)


def _in_page_cache(path: Path) -> bool:
    """Whether a file looks all in the page cache: 16 of its pages, spread over it, asked through a
    mapping of it (cached_share: reads nothing)."""
    mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    return cached_share(mapped, samples=16) == 1.0


def _read_into_page_cache(path: Path, keys: Collection[str], piece: int = 16 * 2**20) -> None:
    """Read the bytes of `keys` in a safetensors file into the page cache (with what the kernel reads
    ahead of each: for the start-up benchmark's checkpoint, 0.6% of the file more than asked for; with
    read-ahead off, reading took 1.1 s rather than 0.6 s).

    A model read without its Linear weights takes the rest of the checkpoint through a mapping, as
    from_pretrained does. From the disk, a fault on a small tensor between two weights left unread (a
    norm) would bring in the kernel's read-ahead around it: 1.4 GB of the start-up benchmark's 3.87 GB
    checkpoint. Read here first, its pages are found in the cache. Plain reads, which let other threads
    run meanwhile: safetensors' own pread backend holds the GIL while it waits for the disk (0.17 s for
    the benchmark's 131 MB embedding). Through it, a cold start took 1.5 s of its 1.9 s to read 0.14 GB
    beside the packed cache's readers.
    """
    with path.open("rb", buffering=0) as f:
        (length,) = struct.unpack("<Q", f.read(8))  # the format: a JSON header of that length, then data
        header = json.loads(f.read(length))
        ranges = [tuple(8 + length + at for at in header[key]["data_offsets"]) for key in keys]
        if hasattr(os, "posix_fadvise"):  # all asked for at once, not each waiting behind the last
            for begin, end in ranges:
                os.posix_fadvise(f.fileno(), begin, min(end - begin, piece), os.POSIX_FADV_WILLNEED)
        scratch = memoryview(bytearray(piece))
        for begin, end in ranges:
            for at in range(begin, end, piece):
                f.seek(at)
                f.readinto(scratch[: min(piece, end - at)])


def _checkpoint_files(directory: Path) -> list[Path] | None:
    """The safetensors files from_pretrained reads in `directory` (the shards its index lists, or
    model.safetensors); None where it would read others."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = directory / "model.safetensors"
    return [single] if single.is_file() else None
