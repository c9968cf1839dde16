"""``jsonbytes.loads`` reads untrusted JSON exactly as ``json.loads`` does — orjson where it can, the
standard library (under Python's default recursion limit) for what orjson refuses — and
``dumps`` writes the compact UTF-8 the gateway hashes and forwards."""

from __future__ import annotations

import json
import math

import pytest

from tollway.jsonbytes import _may_hold_a_big_integer, compact, dumps, loads

SAME = [
    b'{"id":"chatcmpl-1","usage":{"prompt_tokens":12,"completion_tokens":3},"choices":[]}',
    b'{"a":1,"a":2}',  # (a duplicate key: the last wins in both)
    b"[1.5e300, -0.0, 1e-320, 123456789012345678901234567890]",  # (an integer beyond 64 bits)
    b'{"a": -9223372036854775809}',  # (just past what orjson reads as integers, each way)
    b'{"b":\n18446744073709551616}',
    b"-99999999999999999999",
    b'[-9223372036854775808, 18446744073709551615, "12345678901234567890123"]',  # (orjson's own)
    b'"\\ud800 lone surrogate"',
    b'{"t": NaN, "u": Infinity}',
    '{"naïve": "日本"}'.encode(),
    b"  [] ",
]


@pytest.mark.parametrize("raw", SAME)
def test_loads_reads_what_json_loads_reads(raw):
    ours, theirs = loads(raw), json.loads(raw)
    if isinstance(theirs, dict) and isinstance(theirs.get("t"), float):
        assert math.isnan(ours["t"]) and ours["u"] == theirs["u"]
    else:
        assert ours == theirs and repr(ours) == repr(theirs)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a":}', b"[1,]", b"\xff\xfe", b"nul"])
def test_loads_refuses_what_json_loads_refuses(raw):
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(ValueError):
        loads(raw)


@pytest.mark.parametrize("n", [-(2**63) - 1, 2**64, -(10**25), 10**25, -(2**63), 2**64 - 1])
@pytest.mark.parametrize("where", ["{}", " {} ", "[{}]", "[ {}]", '{{"a":{}}}', '{{"a" :\n{}}}', "[1,{}]", "[1 ,\t{}]"])
def test_an_integer_beyond_what_orjson_keeps_is_read_as_an_integer_wherever_it_stands(n, where):
    raw = where.format(n).encode()
    assert repr(loads(raw)) == repr(json.loads(raw))


def test_a_chain_reply_of_hex_words_is_read_by_orjson():
    """Its words' runs of zeros are in strings: no integer there for orjson to read as a float."""
    reply = b'[{"jsonrpc":"2.0","id":7,"result":"0x' + b"0" * 58 + b'f4240"},{"id":8,"result":"0x"}]'
    assert not _may_hold_a_big_integer(reply)
    assert loads(reply) == json.loads(reply)


def test_deep_nesting_is_a_recursion_error_not_a_crash():
    with pytest.raises(RecursionError):
        loads(b"[" * 50_000 + b"]" * 50_000)
    assert loads(b"[" * 500 + b"]" * 500) == json.loads(b"[" * 500 + b"]" * 500)


def test_dumps_is_compact_utf8():
    assert dumps({"b": [1, 2.5], "a": "é"}) == '{"b":[1,2.5],"a":"é"}'.encode()
    assert dumps({"b": 1, "a": 2}, sort_keys=True) == b'{"a":2,"b":1}'
    assert dumps([2**70]) == b"[1180591620717411303424]"  # (beyond orjson: the standard library)


@pytest.mark.parametrize(
    "doc",
    [
        {"hops": [{"by": "tollway", "cached_tokens": None, "discount_passed": "12"}]},
        {"note": "a\x7fb"},  # (DEL, which orjson leaves as it is: headers refuse it)
        {"ctl": "\x00\x1f", "text": "naïve 日本", "lone": "\ud800"},
        [2**70, 1.5, -0.0, True],
    ],
)
def test_compact_writes_what_json_dumps_writes_in_printable_ascii(doc):
    ours = compact(doc)
    assert json.loads(ours) == json.loads(json.dumps(doc, separators=(",", ":")))
    assert all(0x20 <= ord(c) < 0x7F for c in ours)  # (it goes into HTTP headers)
