"""Requests priced a moment ago, kept for their paid retry.

A paid call comes twice: unpaid, it gets a 402 with its quote; the client signs and sends the
same bytes again, now with the payment. Parsing and pricing a request (``chat.py``: strict JSON,
its digest, its prompt's bound, each model's body) costs ~50 µs for a short one and ~0.9 ms for an
agent's 175 KB conversation (``scripts/bench_parse.py``), and the retry would pay it again for
the very same result. Here the parse of the 402 is kept, keyed by the body's bytes (compared in
full: no hash stands for them) with the API, the gateway's origin and whether the call brings its
own provider key; the retry gets a copy as if parsed as it arrived — received then, its quotes
expiring a quote's lifetime later (``ChatCall.at``) — while its quote could still be paid.
New settings or prices (a catalogue refresh) forget every parse made under the old ones.

The bound: ``MAX_REQUESTS`` requests and ``MAX_BYTES`` of their bodies (a body larger than a
quarter of that is not kept), least recently used out first. A parse takes ~2-4× its body's bytes
for a conversation's text, and at worst ~30× (a body of empty arrays, which anyone may send for a
402): 1 MiB of bodies is a few MiB kept, 32 MiB at worst.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .chat import ChatCall
from .config import Settings
from .pricing import Prices

MAX_REQUESTS = 256
MAX_BYTES = 2**20

Parse = Callable[..., ChatCall]


class PricedRequests:
    def __init__(self, max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        # (parse, origin, byok, body) → (prices, when parsed, the parse as made then)
        self._kept: OrderedDict[tuple[Parse, str, bool, bytes], tuple[dict[str, Prices], float, ChatCall]]
        self._kept = OrderedDict()
        self._bytes = 0
        self._settings: Settings | None = None

    def parse(
        self, parse: Parse, raw: bytes, settings: Settings, prices: dict[str, Prices], *, origin: str, byok: bool
    ) -> ChatCall:
        """``parse(raw, settings, prices, origin=origin, byok=byok)``, or a copy of the parse of the
        same request made lately, as if made now. ``parse`` must be one object per API (a
        module-level function or constant)."""
        now = time.time()
        if settings is not self._settings:
            self._kept.clear()
            self._bytes, self._settings = 0, settings
        key = (parse, origin, byok, raw)
        kept = self._kept.get(key)
        if kept is not None:
            made_at, at, call = kept
            if made_at is prices and now - at < settings.quote_ttl_seconds:
                self._kept.move_to_end(key)
                return call.at(now, settings.quote_ttl_seconds)
            self._drop(key)
        call = parse(raw, settings, prices, origin=origin, byok=byok, now=now)
        if len(raw) <= self.max_bytes // 4:  # (a copy: what the call works out later is not kept)
            self._kept[key] = (prices, now, call.at(now, settings.quote_ttl_seconds))
            self._bytes += len(raw)
            while len(self._kept) > self.max_requests or self._bytes > self.max_bytes:
                self._drop(next(iter(self._kept)))
        return call

    def _drop(self, key: tuple[Any, ...]) -> None:
        del self._kept[key]  # type: ignore[arg-type]
        self._bytes -= len(key[-1])

    def __len__(self) -> int:
        return len(self._kept)
