"""Reading an adapter upload over HTTP: the PEFT files as multipart/form-data parts, or a tar archive.

The limits are the gRPC upload's (api/upload.py): the byte cap on all files, the file count, the name
length; whether the files make a servable adapter is the adapter admin's check, as over gRPC. The
request body itself is capped by the route (the byte cap plus room for multipart headers), so nothing
larger is ever stored; files are spooled to temporary files past 1 MiB while they arrive.
"""

from __future__ import annotations

import asyncio
import posixpath
import tarfile
import tempfile
from typing import IO

from fastapi import Request
from starlette.datastructures import UploadFile

from peftserve.api.upload import MAX_FILE_NAME_CHARS, MAX_UPLOAD_FILES
from peftserve.errors import CapacityExceeded, InvalidRequest, PayloadTooLarge, quote

MULTIPART = "multipart/form-data"
TAR_TYPES = ("application/x-tar", "application/tar", "application/gzip", "application/x-gzip")
"""A tar archive, plain or gzip-compressed."""
BODY_OVERHEAD_BYTES = 1 << 20
"""Room above the byte cap for multipart headers and tar headers in the request body."""
_SPOOL_BYTES = 1 << 20


async def read_upload_files(request: Request, max_bytes: int) -> dict[str, bytes]:
    """The files of an upload request by name; InvalidRequest or PayloadTooLarge as over gRPC."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type == MULTIPART:
        files = await _multipart_files(request)
    elif content_type in TAR_TYPES:
        files = await _tar_files(request, max_bytes)
    else:
        raise InvalidRequest(
            f"upload the adapter's files as {MULTIPART} (one part per file) or as a tar archive"
            f" (Content-Type: {TAR_TYPES[0]} or {TAR_TYPES[2]}), got {quote(content_type or 'none')}"
        )
    if not files:
        raise InvalidRequest("the upload has no files")
    total = sum(len(data) for data in files.values())
    if total > max_bytes:
        raise PayloadTooLarge(f"the upload is larger than the server's limit of {max_bytes} bytes")
    return files


def _check_name(name: str, files: dict[str, bytes]) -> str:
    if not name or len(name) > MAX_FILE_NAME_CHARS:
        raise InvalidRequest(f"every file needs a name of 1 to {MAX_FILE_NAME_CHARS} characters")
    if name in files:
        raise InvalidRequest(f"file {quote(name)} appears twice in the upload")
    if len(files) == MAX_UPLOAD_FILES:
        raise CapacityExceeded(f"an upload holds at most {MAX_UPLOAD_FILES} files")
    return name


async def _multipart_files(request: Request) -> dict[str, bytes]:
    """One file per part, named by the part's filename; parts that are not files are refused."""
    form = await request.form(max_files=MAX_UPLOAD_FILES + 1, max_fields=MAX_UPLOAD_FILES + 1)
    files: dict[str, bytes] = {}
    try:
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise InvalidRequest(f"part {quote(field)} is not a file: send each file as a file part")
            files[_check_name(value.filename or "", files)] = await value.read()
    finally:
        await form.close()
    return files


async def _tar_files(request: Request, max_bytes: int) -> dict[str, bytes]:
    with tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as body:
        async for chunk in request.stream():
            body.write(chunk)
        body.seek(0)
        return await asyncio.to_thread(_untar, body, max_bytes)


def _untar(archive: IO[bytes], max_bytes: int) -> dict[str, bytes]:
    """The regular files of a tar, at its top or in one top folder; links and devices are refused.

    Member sizes are checked against the cap before anything is read, so a compressed archive cannot
    inflate past it.
    """
    try:
        with tarfile.open(fileobj=archive, mode="r:*") as tar:
            members = [m for m in tar if not m.isdir()]
            for m in members:
                if not m.isreg():
                    raise InvalidRequest(
                        f"tar member {quote(m.name)} is not a regular file (links are refused)"
                    )
            if sum(m.size for m in members) > max_bytes:
                raise PayloadTooLarge(f"the upload is larger than the server's limit of {max_bytes} bytes")
            names = _flat_names([m.name for m in members])
            files: dict[str, bytes] = {}
            for member, name in zip(members, names, strict=True):
                data = tar.extractfile(member)
                assert data is not None  # a regular file
                files[_check_name(name, files)] = data.read()
            return files
    except tarfile.TarError as e:
        raise InvalidRequest(f"the upload is not a readable tar archive: {quote(str(e))}") from None


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
