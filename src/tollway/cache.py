"""Does the upstream's prompt-cache discount survive the trip? What tollway expects and observes.

``PrefixMemory`` remembers, per payer and upstream, the message prefixes of recent prompts and how
many tokens they held, so each call gets an *expected* cached-token figure (its longest prefix its
payer sent that upstream within ``cache_memory_seconds``) to set beside the *observed* one the
upstream reports. Per payer: the figure is on the payer's receipt, and must not tell one payer
what another's prompts were. A prefix's tokens are exact when it was a whole earlier prompt (the usual case: a
conversation's next turn extends its last prompt) and pro rata by bytes otherwise.

Each call's figures form a *hop*; a response carries its hops (ours first, then the upstream's,
when it is itself a tollway or reports hops the same way) in ``X-Tollway-Cache`` (non-streamed)
or the final ``: tollway {...}`` SSE comment (streamed), so the client at the end of a chain of
proxies sees whether the discount survived each one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

from .jsonbytes import compact, dumps, python_recursion_limit
from .usage import Usage

CACHE_HEADER = "x-tollway-cache"
MAX_PREFIXES = 200_000  # prompt prefixes remembered (each with the upstreams it went to), least recent dropped


Prefixes = list[tuple[bytes, int]]


def prefixes_of(model: str, messages: list[Any]) -> Prefixes:
    """(hash, cumulative byte length) of each message prefix of a prompt (a call computes them
    once: ``ChatCall.prefixes``)."""
    out, h, size = [], hashlib.sha256(model.encode()).digest(), 0
    for m in messages:
        raw = dumps(m, sort_keys=True)
        h = hashlib.sha256(h + raw).digest()
        size += len(raw)
        out.append((h[:16], size))
    return out


class PrefixMemory:
    """The prompt prefixes each payer recently sent to each upstream, and their tokens: what it may
    hold cached for them. Keyed by payer and prefix, so a lookup costs one probe per prefix,
    whatever the upstreams."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._seen: OrderedDict[bytes, dict[str, tuple[int, float]]] = OrderedDict()  # payer+prefix → upstream → …

    def expect(self, payer: str, upstream: str, prefixes: Prefixes) -> int:
        """Tokens of this prompt's longest prefix ``payer`` recently sent to ``upstream`` (0 if none)."""
        return self.expected_by(payer, [upstream], prefixes).get(upstream, 0)

    def expected_by(self, payer: str, upstreams: list[str], prefixes: Prefixes) -> dict[str, int]:
        """``expect`` for those of ``upstreams`` that hold some of the prompt (the others: 0)."""
        now, out, wanted, scope = time.monotonic(), {}, None, _scope(payer)
        for h, _ in reversed(prefixes):  # (longest first: an upstream's first hit is its longest)
            seen = self._seen.get(scope + h)
            if seen:
                wanted = wanted or set(upstreams)
                for upstream, (tokens, expires) in seen.items():
                    if expires > now and upstream in wanted and upstream not in out:
                        out[upstream] = tokens
        return out

    def remember(self, payer: str, upstream: str, prefixes: Prefixes, prompt_tokens: int) -> None:
        if not prefixes:
            return
        total, expires, scope = prefixes[-1][1], time.monotonic() + self.ttl, _scope(payer)
        for i, (h, size) in enumerate(prefixes):
            tokens = prompt_tokens if i == len(prefixes) - 1 else prompt_tokens * size // max(total, 1)
            key = scope + h
            seen = self._seen.get(key)
            if seen is None:
                seen = self._seen[key] = {}
            else:
                self._seen.move_to_end(key)
            seen[upstream] = (tokens, expires)
        while len(self._seen) > MAX_PREFIXES:
            self._seen.popitem(last=False)


def _scope(payer: str) -> bytes:
    return payer.lower().encode() + b"|"


def hop(upstream: str, usage: Usage | None, expected: int, discount: int | None) -> dict[str, Any]:
    """This gateway's cache figures for one call."""
    return {
        "by": "tollway",
        "upstream": upstream,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "cached_tokens": usage.cached_tokens if usage else None,  # None: the upstream did not say
        "expected_cached_tokens": expected,
        "discount_passed": None if discount is None else str(discount),  # atomic units, to the payer
    }


def upstream_hops(value: str | None) -> list[dict[str, Any]]:
    """The hops an upstream reported (its ``X-Tollway-Cache`` header or stream summary)."""
    if not value:
        return []
    try:
        with python_recursion_limit():
            hops = json.loads(value)
    except (ValueError, RecursionError):
        return []
    return [h for h in hops if isinstance(h, dict)][:16] if isinstance(hops, list) else []


def encode_hops(hops: list[dict[str, Any]]) -> str:
    return compact(hops)
