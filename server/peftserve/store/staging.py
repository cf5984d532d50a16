"""An upload written to disk while it arrives: one folder under the store's .tmp/, hashed as it is written.

Memory per upload is one received chunk, whatever the size cap. The caps are enforced per chunk, so an
oversized upload fails as soon as it passes a limit; nothing here is visible to readers of the store
until ``AdapterStore.commit`` renames the folder into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from peftserve.errors import AdapterRejected, PayloadTooLarge, quote

from .files import fsync_dir
from .manifest import FileEntry
from .peft_files import CONFIG_NAME, MAX_CONFIG_BYTES, MAX_README_BYTES, README_NAME, check_file_name

MAX_UPLOAD_BYTES = 256 << 20
"""Default cap on the bytes of all files of one upload (serve --max-upload-bytes)."""
MAX_FILE_BYTES = {CONFIG_NAME: MAX_CONFIG_BYTES, README_NAME: MAX_README_BYTES}
"""Per-file caps below the upload's; the weights may take the whole upload cap."""


class StagedUpload:
    """Files written one after another into `folder`, each sized and hashed while it is written."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.total = 0
        self._entries: list[FileEntry] = []
        self._name: str | None = None
        self._fd: int | None = None
        self._size = 0
        self._hash = hashlib.sha256()

    def write(self, name: str, data: bytes) -> None:
        """Append data to file `name`: the current file, or a new one (files arrive one after another)."""
        if name != self._name:
            self._close_file()
            if any(e.name == name for e in self._entries):
                raise AdapterRejected(
                    f"file {quote(name)} arrived in two parts: send each file's chunks together"
                )
            self._name = check_file_name(name)
            path = self.folder / name
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            self._size, self._hash = 0, hashlib.sha256()
        self.total += len(data)
        if self.total > self.max_bytes:
            raise PayloadTooLarge(f"the upload is larger than the server's limit of {self.max_bytes} bytes")
        self._size += len(data)
        file_cap = MAX_FILE_BYTES.get(name)
        if file_cap is not None and self._size > file_cap:
            raise AdapterRejected(f"{name}: larger than the limit of {file_cap} bytes")
        self._hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def finish(self) -> tuple[FileEntry, ...]:
        """Make every file durable; the name, size and sha256 of each, sorted by name."""
        self._close_file()
        if not self._entries:
            raise AdapterRejected("the upload has no files")
        fsync_dir(self.folder)
        return tuple(sorted(self._entries, key=lambda e: e.name))

    def discard(self) -> None:
        """Remove the folder (a no-op once the store has committed it: it was renamed away)."""
        self._close_file(keep=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _close_file(self, keep: bool = True) -> None:
        if self._fd is None:
            return
        try:
            if keep:
                os.fsync(self._fd)
                self._entries.append(FileEntry(self._name, self._size, self._hash.hexdigest()))
        finally:
            os.close(self._fd)
            self._fd, self._name = None, None
