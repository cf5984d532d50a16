"""An AdapterAdmin in memory, for API tests: versions, tiers and pins without a store or a model."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from peftserve.engine.protocol import AdapterStatus, FileChunks
from peftserve.errors import AdapterNotFound, AdapterRejected, CapacityExceeded, FailedPrecondition
from peftserve.store.manifest import AdapterManifest
from peftserve.store.staging import StagedUpload

QUOTA_BYTES = 8 * 1024
"""Bytes one tenant may store (all adapters, current versions)."""


def not_found_message(tenant: str, name: str) -> str:
    """The message a missing adapter gets (the store's template)."""
    return f"adapter {f'{tenant}/{name}'!r} not found"


class FakeAdmin:
    """Keeps each adapter's current version; a knob makes every call fail, and calls are recorded."""

    def __init__(self, max_upload_bytes: int = 16 * 1024) -> None:
        self.max_upload_bytes = max_upload_bytes
        """The cap on one upload's bytes, enforced while it arrives (as the store does)."""
        self.adapters: dict[tuple[str, str], AdapterStatus] = {}
        self.fail_with: Exception | None = None
        """Raised by the next calls."""
        self.calls: list[tuple[str, str, str]] = []
        """(method, tenant, name) of every call that got past the servicer."""
        self.page_sizes: list[int] = []

    async def upload(self, tenant: str, name: str, chunks: FileChunks) -> AdapterManifest:
        self._record("upload", tenant, name)
        with tempfile.TemporaryDirectory() as tmp:  # the real staging: names, caps and order checked
            staged = StagedUpload(Path(tmp), self.max_upload_bytes)
            async for file_name, data in chunks:
                staged.write(file_name, data)
            entries = staged.finish()
            files = {e.name: (Path(tmp) / e.name).read_bytes() for e in entries}
        config = _config(files)
        if config.get("base_model") == "another-model":
            raise FailedPrecondition("the adapter was trained for another base model")
        nbytes = sum(len(data) for data in files.values())
        used = sum(s.manifest.nbytes for (t, n), s in self.adapters.items() if t == tenant and n != name)
        if used + nbytes > QUOTA_BYTES:
            raise CapacityExceeded(f"tenant {tenant!r} is over its quota of {QUOTA_BYTES} bytes")
        previous = self.adapters.get((tenant, name))
        version = int(previous.manifest.version[1:]) + 1 if previous else 1
        manifest = AdapterManifest(
            adapter_id=f"{tenant}/{name}",
            version=f"v{version}",
            kind="lora",
            peft_type=config.get("peft_type", "LORA"),
            base_fingerprint="fake-base",
            ranks=(config.get("r", 8),),
            target_modules=tuple(config.get("target_modules", ("q_proj",))),
            num_virtual_tokens=0,
            nbytes=nbytes,
            files=entries,
            created_at=time.time(),
            device_bytes=4096,
            forms=(("low_rank", 2),),
            needs_max_rank=config.get("r", 8),
        )
        self.adapters[tenant, name] = AdapterStatus(manifest, "disk", pinned=False, active_requests=0)
        return manifest

    async def load(self, tenant: str, name: str, pin: bool = False) -> AdapterStatus:
        self._record("load", tenant, name)
        status = self._get(tenant, name)
        return self._set(
            tenant, name, dataclasses.replace(status, tier="device", pinned=status.pinned or pin)
        )

    async def unload(self, tenant: str, name: str) -> AdapterStatus:
        self._record("unload", tenant, name)
        status = self._get(tenant, name)
        return self._set(tenant, name, dataclasses.replace(status, tier="disk", pinned=False))

    async def delete(self, tenant: str, name: str) -> None:
        self._record("delete", tenant, name)
        self._get(tenant, name)
        del self.adapters[tenant, name]

    async def list(
        self, tenant: str | None, page_size: int, page_token: str
    ) -> tuple[list[AdapterStatus], str]:
        self._record("list", tenant or "*", "")
        self.page_sizes.append(page_size)
        ids = sorted(f"{t}/{n}" for t, n in self.adapters if tenant is None or t == tenant)
        page = [i for i in ids if i > page_token][:page_size]
        more = len([i for i in ids if i > page_token]) > page_size
        return [self.adapters[tuple(i.split("/"))] for i in page], page[-1] if more else ""

    async def get(self, tenant: str, name: str) -> AdapterStatus:
        self._record("get", tenant, name)
        return self._get(tenant, name)

    def _record(self, method: str, tenant: str, name: str) -> None:
        self.calls.append((method, tenant, name))
        if self.fail_with is not None:
            raise self.fail_with

    def _get(self, tenant: str, name: str) -> AdapterStatus:
        try:
            return self.adapters[tenant, name]
        except KeyError:
            raise AdapterNotFound(not_found_message(tenant, name)) from None

    def _set(self, tenant: str, name: str, status: AdapterStatus) -> AdapterStatus:
        self.adapters[tenant, name] = status
        return status


def _config(files: dict[str, bytes]) -> dict:
    if "adapter_config.json" not in files:
        raise AdapterRejected("adapter_config.json is missing")
    try:
        return json.loads(files["adapter_config.json"])
    except ValueError:
        raise AdapterRejected("adapter_config.json is not JSON") from None


def write_peft_dir(directory: Path, weights: bytes = b"\x00" * 3000, **config: object) -> Path:
    """A directory shaped like a PEFT save (the fake admin checks only the config)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, **config}))
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "README.md").write_text("trained by a test\n")
    return directory
