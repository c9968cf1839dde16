"""Reading a body from the network without letting it grow past a limit."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable


async def read_bounded(chunks: AsyncIterable[bytes], limit: int, too_large: Callable[[], Exception]) -> bytes:
    """The bytes of ``chunks``; ``too_large()`` is raised as soon as they pass ``limit``."""
    body = bytearray()  # (bytes += bytes copies the whole body each time)
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise too_large()
    return bytes(body)
