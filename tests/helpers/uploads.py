"""An upload's files as the admin receives them: (file name, bytes) chunks, each file's in a row."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping


async def chunks(files: Mapping[str, bytes], size: int = 64 * 1024) -> AsyncIterator[tuple[str, bytes]]:
    for name, data in files.items():
        for start in range(0, max(len(data), 1), size):
            yield name, data[start : start + size]
