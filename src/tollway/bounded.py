"""Bounded things: reading a body from the network without letting it grow past a limit, and a
memory of what was found moments ago that cannot grow without end."""

from __future__ import annotations

import time
from collections import OrderedDict
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
    (the chain, say). At most ``most`` of them: past that, the oldest are let go."""

    def __init__(self, seconds: float, most: int = 10_000) -> None:
        self.seconds, self.most = seconds, most
        # (ordered: a plain dict's first key is slow to reach once many before it were deleted)
        self._until: OrderedDict[Hashable, float] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return self._until.get(key, 0.0) > time.monotonic()

    def add(self, key: Hashable, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._until[key] = now + self.seconds
        self._until.move_to_end(key)
        # Every key is kept as long, so the order they were added in is the order they expire in
        # (near enough: a caller's ``now`` may be a moment old): the oldest are let go first, when
        # expired or one too many — each add does O(1) work, on average.
        while self._until and (len(self._until) > self.most or next(iter(self._until.values())) <= now):
            self._until.popitem(last=False)
