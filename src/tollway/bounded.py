"""Bounded things: reading a body from the network without letting it grow past a limit, and a
memory of what was found moments ago that cannot grow without end."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Callable, Hashable


async def read_bounded(chunks: AsyncIterable[bytes], limit: int, too_large: Callable[[], Exception]) -> bytes:
    """The bytes of ``chunks``; ``too_large()`` is raised as soon as they pass ``limit``."""
    body = bytearray()  # (bytes += bytes copies the whole body each time)
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise too_large()
    return bytes(body)


class Recently:
    """Keys found moments ago, each remembered for ``seconds``: what need not be asked again so soon
    (the chain, say). At most about ``most`` of them: past that, the expired ones are let go."""

    def __init__(self, seconds: float, most: int = 10_000) -> None:
        self.seconds, self.most = seconds, most
        self._until: dict[Hashable, float] = {}

    def __contains__(self, key: Hashable) -> bool:
        return self._until.get(key, 0.0) > time.monotonic()

    def add(self, key: Hashable, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if len(self._until) > self.most:
            self._until = {k: t for k, t in self._until.items() if t > now}
        self._until[key] = now + self.seconds
