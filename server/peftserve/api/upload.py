"""Reading a client-streamed UploadAdapter: the adapter id first, then file chunks, under limits.

The limits bound what one upload may hold in memory; whether the files make a servable adapter is
the adapter admin's check, done on the whole upload before it commits anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from peftserve.errors import CapacityExceeded, InvalidRequest, quote
from peftserve_client._proto import peftserve_pb2 as pb

MAX_UPLOAD_BYTES = 2 << 30
"""Default cap on the bytes of all files of one upload."""
MAX_CONCURRENT_UPLOADS = 4
"""Uploads received at once; with the byte cap, this bounds the memory uploads take."""
MAX_UPLOAD_FILES = 64
MAX_FILE_NAME_CHARS = 255


async def read_adapter_id(messages: AsyncIterator[pb.UploadAdapterRequest]) -> str:
    """The adapter id of the first message, which carries nothing else."""
    first = await anext(messages, None)
    if first is None or not first.adapter_id:
        raise InvalidRequest("the first UploadAdapterRequest must carry adapter_id")
    if first.file_name or first.data:
        raise InvalidRequest("the first UploadAdapterRequest carries adapter_id only; files follow it")
    return first.adapter_id


async def read_files(messages: AsyncIterator[pb.UploadAdapterRequest], max_bytes: int) -> dict[str, bytes]:
    """The files of the remaining messages; fails as soon as a limit is passed, not at the end."""
    chunks: dict[str, list[bytes]] = {}
    current: str | None = None
    total = 0
    async for msg in messages:
        name = msg.file_name
        if msg.adapter_id:
            raise InvalidRequest("adapter_id belongs in the first UploadAdapterRequest only")
        if not name or len(name) > MAX_FILE_NAME_CHARS:
            raise InvalidRequest(f"every chunk needs a file_name of 1 to {MAX_FILE_NAME_CHARS} characters")
        if name != current:
            if name in chunks:
                raise InvalidRequest(f"the chunks of file {quote(name)} must be consecutive")
            if len(chunks) == MAX_UPLOAD_FILES:
                raise CapacityExceeded(f"an upload holds at most {MAX_UPLOAD_FILES} files")
            chunks[name], current = [], name
        total += len(msg.data)
        if total > max_bytes:
            raise CapacityExceeded(f"the upload is larger than the server's limit of {max_bytes} bytes")
        chunks[name].append(msg.data)
    if not chunks:
        raise InvalidRequest("the upload has no files")
    return {name: b"".join(parts) for name, parts in chunks.items()}
