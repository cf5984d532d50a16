"""Reading an adapter upload over HTTP: the PEFT files as multipart/form-data parts, or a tar archive.

The files go on to the adapter admin as (file name, bytes) chunks, as over gRPC: the admin writes them
to disk as they arrive, under the size cap, and checks the whole upload before it commits anything. The
request body itself is capped by the route (the byte cap plus room for multipart or tar headers);
multipart parts and tar bodies are spooled to temporary files past 1 MiB while they arrive.
"""

from __future__ import annotations

import asyncio
import posixpath
import tarfile
import tempfile
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import UploadFile

from peftserve.api.upload import MAX_FILE_NAME_CHARS
from peftserve.engine.protocol import FileChunks
from peftserve.errors import InvalidRequest, PayloadTooLarge, quote
from peftserve.store.files import CHUNK_BYTES

MULTIPART = "multipart/form-data"
TAR_TYPES = ("application/x-tar", "application/tar", "application/gzip", "application/x-gzip")
"""A tar archive, plain or gzip-compressed."""
BODY_OVERHEAD_BYTES = 1 << 20
"""Room above the byte cap for multipart headers and tar headers in the request body."""
MAX_PARTS = 8
"""Multipart parts read at most (an adapter has three files; more is refused by name anyway)."""
_SPOOL_BYTES = 1 << 20


async def upload_chunks(request: Request, max_bytes: int) -> FileChunks:
    """The files of an upload request as (name, bytes) chunks; errors as over gRPC (InvalidRequest, ...)."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type == MULTIPART:
        parts = _multipart_chunks(request)
    elif content_type in TAR_TYPES:
        parts = _tar_chunks(request, max_bytes)
    else:
        raise InvalidRequest(
            f"upload the adapter's files as {MULTIPART} (one part per file) or as a tar archive"
            f" (Content-Type: {TAR_TYPES[0]} or {TAR_TYPES[2]}), got {quote(content_type or 'none')}"
        )
    async for chunk in parts:
        yield chunk


def _check_name(name: str, seen: set[str]) -> str:
    """A file's name, once: each part (or tar member) is a whole file."""
    if not name or len(name) > MAX_FILE_NAME_CHARS:
        raise InvalidRequest(f"every file needs a name of 1 to {MAX_FILE_NAME_CHARS} characters")
    if name in seen:
        raise InvalidRequest(f"file {quote(name)} appears twice in the upload")
    seen.add(name)
    return name


async def _multipart_chunks(request: Request) -> AsyncIterator[tuple[str, bytes]]:
    """One file per part, named by the part's filename; parts that are not files are refused."""
    form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS)
    seen: set[str] = set()
    try:
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise InvalidRequest(f"part {quote(field)} is not a file: send each file as a file part")
            name = _check_name(value.filename or "", seen)
            chunk = await value.read(CHUNK_BYTES)
            yield name, chunk  # an empty file is one empty chunk
            while chunk := await value.read(CHUNK_BYTES):
                yield name, chunk
    finally:
        await form.close()


async def _tar_chunks(request: Request, max_bytes: int) -> AsyncIterator[tuple[str, bytes]]:
    with tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as body:
        async for data in request.stream():
            body.write(data)
        body.seek(0)
        try:
            tar = await asyncio.to_thread(tarfile.open, fileobj=body, mode="r:*")
            with tar:
                members = await asyncio.to_thread(_members, tar, max_bytes)
                for member, name in members:
                    reader = tar.extractfile(member)
                    assert reader is not None  # a regular file
                    chunk = await asyncio.to_thread(reader.read, CHUNK_BYTES)
                    yield name, chunk
                    while chunk := await asyncio.to_thread(reader.read, CHUNK_BYTES):
                        yield name, chunk
        except tarfile.TarError as e:
            raise InvalidRequest(f"the upload is not a readable tar archive: {quote(str(e))}") from None


def _members(tar: tarfile.TarFile, max_bytes: int) -> list[tuple[tarfile.TarInfo, str]]:
    """The regular files of a tar and their names, at its top or in one top folder; links are refused.

    Member sizes are checked against the cap before anything is read, so a compressed archive cannot
    inflate past it.
    """
    members = [m for m in tar if not m.isdir()]
    for m in members:
        if not m.isreg():
            raise InvalidRequest(f"tar member {quote(m.name)} is not a regular file (links are refused)")
    if sum(m.size for m in members) > max_bytes:
        raise PayloadTooLarge(f"the upload is larger than the server's limit of {max_bytes} bytes")
    seen: set[str] = set()
    names = [_check_name(name, seen) for name in _flat_names([m.name for m in members])]
    return list(zip(members, names, strict=True))


def _flat_names(paths: list[str]) -> list[str]:
    """File names of tar paths: 'a', './a' and 'dir/a' (one folder shared by all) give 'a'."""
    parts = []
    for path in paths:
        p = posixpath.normpath(path).split("/")
        if path.startswith("/") or ".." in p:
            raise InvalidRequest(f"tar member {quote(path)} points outside the archive")
        parts.append(p)
    if parts and all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    for path, p in zip(paths, parts, strict=True):
        if len(p) != 1:
            raise InvalidRequest(
                f"tar member {quote(path)}: the adapter's files must be at the top of the archive"
                " (or all in one folder)"
            )
    return [p[0] for p in parts]
