"""Reading a client-streamed UploadAdapter: the adapter id first, then file chunks.

The chunks go on to the adapter admin as they arrive, which writes them to disk under the size cap
and checks the whole upload before it commits anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from peftserve.engine.protocol import FileChunks
from peftserve.errors import InvalidRequest
from peftserve_client._proto import peftserve_pb2 as pb

MAX_CONCURRENT_UPLOADS = 4
"""Uploads received at once (each holds a chunk in memory, and a staged folder on disk)."""
MAX_FILE_NAME_CHARS = 255


async def read_adapter_id(messages: AsyncIterator[pb.UploadAdapterRequest]) -> str:
    """The adapter id of the first message, which carries nothing else."""
    first = await anext(messages, None)
    if first is None or not first.adapter_id:
        raise InvalidRequest("the first UploadAdapterRequest must carry adapter_id")
    if first.file_name or first.data:
        raise InvalidRequest("the first UploadAdapterRequest carries adapter_id only; files follow it")
    return first.adapter_id


async def file_chunks(messages: AsyncIterator[pb.UploadAdapterRequest]) -> FileChunks:
    """(file name, bytes) of the remaining messages, which must name their file and carry no id."""
    async for msg in messages:
        if msg.adapter_id:
            raise InvalidRequest("adapter_id belongs in the first UploadAdapterRequest only")
        if not msg.file_name or len(msg.file_name) > MAX_FILE_NAME_CHARS:
            raise InvalidRequest(f"every chunk needs a file_name of 1 to {MAX_FILE_NAME_CHARS} characters")
        yield msg.file_name, msg.data
