"""Requests priced a moment ago, kept for their paid retry.

A paid call comes twice: unpaid, it gets a 402 with its quote; the client signs and sends the
same bytes again, now with the payment. Parsing and pricing a request (``chat.py``: strict JSON,
its digest, its prompt's bound, each model's body) costs ~60 µs for a short one and ~0.9 ms for an
agent's 175 KB conversation (``scripts/bench_parse.py``), and the retry would pay it again for
the very same result. Here the parse of the 402 is kept, keyed by the body's bytes (compared in
full: no hash stands for them), and the retry gets a copy as if parsed as it arrived: received
then, its quotes expiring a quote's lifetime later (``ChatCall.at``).

A kept parse serves only a request that is parsed the same way (the same API, the same gateway
origin, with or without a provider key) under the same prices and settings (a price refresh makes
new ones: the old parses are not used again), while its quote could still be paid. The bound:
``MAX_REQUESTS`` requests and ``MAX_BYTES`` of their bodies (a body larger than a quarter of that
is not kept), least recently used out first — a few MiB of parsed JSON at most.
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
MAX_BYTES = 4 * 2**20

Parse = Callable[..., ChatCall]


class PricedRequests:
    def __init__(self, max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self._kept: OrderedDict[bytes, tuple[tuple[Any, ...], float, ChatCall]] = OrderedDict()
        self._bytes = 0

    def parse(
        self, parse: Parse, raw: bytes, settings: Settings, prices: dict[str, Prices], *, origin: str, byok: bool
    ) -> ChatCall:
        """``parse(raw, settings, prices, origin=origin, byok=byok)``, or the copy of a parse of
        the same bytes made that way lately, as if made now. ``parse`` must be one object per API
        (a module-level function or constant)."""
        now = time.time()
        how = (parse, settings, prices, origin, byok)
        kept = self._kept.get(raw)
        if kept is not None:
            made, at, call = kept
            if now - at < settings.quote_ttl_seconds and all(a is b for a, b in zip(made, how, strict=True)):
                self._kept.move_to_end(raw)
                return call.at(now, settings.quote_ttl_seconds)
            self._drop(raw)
        call = parse(raw, settings, prices, origin=origin, byok=byok, now=now)
        if len(raw) <= self.max_bytes // 4:
            self._kept[raw] = (how, now, call)
            self._bytes += len(raw)
            while len(self._kept) > self.max_requests or self._bytes > self.max_bytes:
                self._drop(next(iter(self._kept)))
        return call

    def _drop(self, raw: bytes) -> None:
        del self._kept[raw]
        self._bytes -= len(raw)

    def __len__(self) -> int:
        return len(self._kept)
