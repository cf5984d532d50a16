"""Filesystem primitives of the store: durable writes, fsync of folders, reads that never follow symlinks."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from peftserve.errors import FailedPrecondition


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (created, renamed, removed names) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Create a new file with data and fsync it (its folder entry is the caller's fsync_dir)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_regular(path: Path, follow_symlinks: bool) -> int:
    """A read-only fd of a regular file (O_NOFOLLOW unless follow_symlinks); FailedPrecondition otherwise."""
    flags = os.O_RDONLY | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FailedPrecondition(f"{path.name}: is a symlink; the store never follows symlinks") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FailedPrecondition(f"{path.name}: not a regular file")
    return fd


def read_regular_file(path: Path, max_bytes: int | None = None, follow_symlinks: bool = False) -> bytes:
    """A regular file's bytes, refusing symlinks (O_NOFOLLOW unless follow_symlinks) and files over max_bytes.

    FileNotFoundError if absent; FailedPrecondition for a symlink, a non-regular file or one too large.
    """
    fd = _open_regular(path, follow_symlinks)
    try:
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise FailedPrecondition(f"{path.name}: {size} bytes exceeds the limit of {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


CHUNK_BYTES = 1 << 20


def read_chunks(path: Path, follow_symlinks: bool = False) -> Iterator[bytes]:
    """A regular file's bytes in chunks of CHUNK_BYTES, under read_regular_file's rules (no size cap)."""
    fd = _open_regular(path, follow_symlinks)
    try:
        while chunk := os.read(fd, CHUNK_BYTES):
            yield chunk
    finally:
        os.close(fd)


def is_plain_dir(path: Path) -> bool:
    """True for a folder that is not a symlink (lstat: the link itself is looked at)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def ensure_plain_dir(path: Path) -> None:
    """Create a folder (one level) durably, or check the existing one is a folder and not a symlink."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if not is_plain_dir(path):
            raise FailedPrecondition(f"store entry {path.name!r} is not a folder (or is a symlink)") from None
        return
    fsync_dir(path.parent)


def inside(root: Path, path: Path) -> Path:
    """path if it resolves inside root (root already resolved) and no part below root is a symlink."""
    relative = path.relative_to(root)
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise FailedPrecondition(f"store entry {part!r} is a symlink; the store never follows symlinks")
    if not path.resolve().is_relative_to(root):
        raise FailedPrecondition("store path escapes the store root")
    return path
