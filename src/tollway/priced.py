"""Requests answered with a 402 a moment ago, their parse kept for the paid retry.

A paid call usually comes twice: unpaid, it gets a 402 with its quote; the client signs and sends
the same bytes again, now with the payment. Parsing and pricing a request (``chat.py``: strict
JSON, its digest, its prompt's bound, each model's body) costs ~50 µs for a short one and ~0.9 ms
for an agent's 175 KB conversation (``scripts/bench_parse.py``), and the retry would pay it again
for the very same result. So the parse of a request answered 402 is kept, keyed by the body's
bytes (compared in full: no hash stands for them) with the API, the gateway's origin and whether
the call brings its own provider key; the retry gets a copy as if parsed as it arrived — received
then, its quotes expiring a quote's lifetime later (``ChatCall.at``) — while its quote could still
be paid. New settings or prices (a catalogue refresh) forget every parse made under the old ones.
A request paid without a 402 first costs one dictionary lookup more (hashing its bytes:
~45 µs at 175 KB, against ~0.9 ms to parse them).

The bound: ``MAX_REQUESTS`` requests and ``MAX_BYTES`` of their bodies and origins (a body larger
than a quarter of that is not kept, nor looked up), least recently used out first. Kept, a short
chat request takes ~2.5 KB, a conversation ~3× its body's bytes, and at worst a body takes ~33× its
bytes (messages of nested empty arrays and objects, which anyone may send for a 402): ~3 MiB for
1,024 short requests or 1 MiB of conversations, 33 MiB at worst (tracemalloc, Python 3.11). A
client's retry follows its 402 within moments: 1,024 covers as many clients signing at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from .chat import ChatCall
from .config import Settings
from .pricing import Prices

MAX_REQUESTS = 1024
MAX_BYTES = 2**20


class Pricing(NamedTuple):
    """A request to price: ``parse(raw, settings, prices, origin=origin, byok=byok)`` prices it.
    ``parse`` must be one object per API (a module-level function or constant)."""

    parse: Callable[..., ChatCall]
    raw: bytes
    settings: Settings
    prices: dict[str, Prices]
    origin: str
    byok: bool

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.parse, self.origin, self.byok, self.raw)

    @property
    def size(self) -> int:
        return len(self.raw) + len(self.origin)


class PricedRequests:
    def __init__(self, max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        # (parse, origin, byok, body) → (prices, when kept, the parse as of then, its size)
        self._kept: OrderedDict[tuple[Any, ...], tuple[dict[str, Prices], float, ChatCall, int]] = OrderedDict()
        self._bytes = 0
        self._settings: Settings | None = None

    def parse(self, r: Pricing) -> ChatCall:
        """The request parsed and priced as it arrives now: a copy of its kept parse, or a new one."""
        now = time.time()
        self._settle(r.settings)
        key = r.key
        kept = self._kept.get(key) if r.size <= self.max_bytes // 4 else None
        if kept is not None:
            prices, at, call, _ = kept
            if prices is r.prices and now - at < r.settings.quote_ttl_seconds:
                self._kept.move_to_end(key)
                return call.at(now, r.settings.quote_ttl_seconds)
            self._drop(key)
        return r.parse(r.raw, r.settings, r.prices, origin=r.origin, byok=r.byok, now=now)

    def keep(self, r: Pricing, call: ChatCall) -> None:
        """Keep ``call``, what parsing ``r`` made, for its paid retry (it was answered 402)."""
        if r.settings is not self._settings or r.size > self.max_bytes // 4:
            return
        key = r.key
        if key in self._kept:
            self._drop(key)
        now = time.time()  # (a copy: what the call works out, now or later, is not kept)
        self._kept[key] = (r.prices, now, call.at(now, r.settings.quote_ttl_seconds), r.size)
        self._bytes += r.size
        while len(self._kept) > self.max_requests or self._bytes > self.max_bytes:
            self._drop(next(iter(self._kept)))

    def _settle(self, settings: Settings) -> None:
        """New settings (and prices with them): every parse made under the old ones is forgotten."""
        if settings is not self._settings:
            self._kept.clear()
            self._bytes, self._settings = 0, settings

    def _drop(self, key: tuple[Any, ...]) -> None:
        self._bytes -= self._kept.pop(key)[3]

    def __len__(self) -> int:
        return len(self._kept)
