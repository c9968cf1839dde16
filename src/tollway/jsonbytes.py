"""JSON out, fast: the compact UTF-8 bytes the gateway hashes (a request's digest, its prompt's
prefixes), bounds (the prompt's byte bound) and forwards (the body an upstream gets, an answer
with its charge). A request carries its whole conversation, often tens or hundreds of KB, and is
encoded several times on its way: the standard library's encoder took ~0.2 ms per 40 KB each
time, orjson a tenth of that (``scripts/bench_parse.py``).

The standard library still encodes what orjson refuses — integers beyond 64 bits, nesting deeper
than 254 — and raises ``ValueError`` for what JSON cannot carry in UTF-8 (a lone surrogate).
Documents that reach here were parsed by ``chat.parse_json``, which refuses NaN and infinities.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(doc: Any, *, sort_keys: bool = False) -> bytes:
    """``doc`` as compact JSON (no spaces, non-ASCII as is) in UTF-8; keys sorted if ``sort_keys``."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except orjson.JSONEncodeError:
        text = json.dumps(doc, sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode()  # (a lone surrogate: UnicodeEncodeError, a ValueError)
