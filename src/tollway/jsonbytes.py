"""JSON in and out, fast.

Out: the compact UTF-8 bytes the gateway hashes (a request's digest, its prompt's prefixes),
bounds (the prompt's byte bound) and forwards (the body an upstream gets, an answer with its
charge). A request carries its whole conversation, often tens or hundreds of KB, and is encoded
several times on its way: the standard library's encoder took ~0.2 ms per 40 KB each time, orjson
a tenth of that (``scripts/bench_parse.py``). The standard library still encodes what orjson
refuses — integers beyond 64 bits, nesting deeper than 254 — and raises ``ValueError`` for what
JSON cannot carry in UTF-8 (a lone surrogate). Documents that reach here were parsed by
``chat.parse_json``, which refuses NaN and infinities.

In: what needs no checks of its own beyond ``json.loads``'s (an upstream's answer, a payment
header), read as ``json.loads`` reads it. (A request's body is read by ``chat.parse_json``, which
refuses duplicate keys as it goes.)
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import orjson


def dumps(doc: Any, *, sort_keys: bool = False) -> bytes:
    """``doc`` as compact JSON (no spaces, non-ASCII as is) in UTF-8; keys sorted if ``sort_keys``."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except orjson.JSONEncodeError:
        text = json.dumps(doc, sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode()  # (a lone surrogate: UnicodeEncodeError, a ValueError)


def compact(doc: Any) -> str:
    """``json.dumps(doc, separators=(",", ":"))`` — printable ASCII, anything else escaped, so it
    can go in a header — at orjson's speed (a tenth of the standard library's, for the few small
    documents every call writes: its proof, receipt, cache hops and attempts). Unlike it, NaN and
    the infinities (which JSON has not) are written ``null``."""
    try:
        out = orjson.dumps(doc)
        if out.isascii() and b"\x7f" not in out:  # (orjson leaves DEL as it is; HTTP headers refuse it)
            return out.decode()
    except orjson.JSONEncodeError:  # (what orjson refuses: see ``dumps``)
        pass
    return json.dumps(doc, separators=(",", ":"))


# What orjson reads otherwise than json.loads: an integer beyond -2**63 … 2**64 - 1 (it reads a float).
# That is a run of 19 digits or more where a number may begin — at the start, or after "[", ":", ",",
# whitespace or "-". A regular expression looking for it took ~30 times orjson's parse (~8 ns a byte)
# and a chain reply's hex words matched it; so each byte is mapped, in C, to its shape — a digit "0",
# a byte a number may follow ".", anything else "a" — and the shapes searched for "." and 19 "0"s.
# (A hex word's digits follow an "x" or a letter; a run in a string after a space takes the slow path.)
_SHAPES = bytes(48 if 48 <= b <= 57 else 46 if b in b"[:, \t\n\r-" else 97 for b in range(256))
_BIG = b"." + b"0" * 19


def _may_hold_a_big_integer(data: bytes) -> bool:
    shapes = data.translate(_SHAPES)
    return _BIG in shapes or shapes.startswith(_BIG[1:])


def loads(data: bytes) -> Any:
    """Untrusted JSON in, as ``json.loads`` reads it (raising ``ValueError`` or ``RecursionError``),
    in a fifth of the time: orjson, and the standard library — under Python's default recursion
    limit — for what orjson refuses (NaN, lone surrogates, deep nesting) or reads otherwise
    (integers beyond 64 bits)."""
    if not _may_hold_a_big_integer(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    with python_recursion_limit():
        return json.loads(data)


@contextlib.contextmanager
def python_recursion_limit(limit: int = 1000) -> Iterator[None]:
    """Parse untrusted JSON under Python's default recursion limit. The eth libraries raise it
    to 100,000 at import, past what the C stack holds: deeply nested JSON would crash the process
    instead of raising RecursionError. (The event loop runs one parse at a time.)"""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(min(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)
