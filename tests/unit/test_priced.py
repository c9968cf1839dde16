"""The paid retry of a 402 reuses the parse the 402 made — exactly as parsing it again would make
it, and only where parsing it again would make the same."""

from __future__ import annotations

import json
from decimal import Decimal
from unittest import mock

import pytest

from tollway import chat
from tollway.chat import parse_chat, parse_embeddings
from tollway.config import ModelPrice, Settings
from tollway.errors import BadRequest
from tollway.priced import PricedRequests, Pricing
from tollway.pricing import Prices

MODELS = {
    "m": ModelPrice(prompt=Decimal("0.000001"), completion=Decimal("0.000002")),
    "n": ModelPrice(prompt=Decimal("0.000003"), completion=Decimal("0.000004")),
}
SETTINGS = Settings(models=MODELS, quote_ttl_seconds=120)
PRICES = {k: Prices.of(v, 6) for k, v in MODELS.items()}
ORIGIN = "http://127.0.0.1:8402"


def raw(**extra) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def pricing(body: bytes, parse=parse_chat, settings=SETTINGS, prices=PRICES, origin=ORIGIN, byok=False) -> Pricing:
    return Pricing(parse, body, settings, prices, origin, byok)


def answered_402(kept: PricedRequests, r: Pricing):
    """What the pipeline does for a request it answers 402: parse it, keep the parse."""
    call = kept.parse(r)
    kept.keep(r, call)
    return call


def counting(parse):
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return parse(*a, **k)

    return counted, calls


def at(t: float):
    return mock.patch("tollway.priced.time.time", return_value=t)


def kept_bodies(kept: PricedRequests) -> list[bytes]:
    return [key[-1] for key in kept._kept]


def test_a_retry_gets_what_a_parse_at_its_arrival_makes():
    kept = PricedRequests()
    body = raw(models=["m", "n"])
    with at(1_000.0):
        first = answered_402(kept, pricing(body))
        old_quote = first.quote(100)
    with at(1_030.5):
        again = kept.parse(pricing(body))
    fresh = parse_chat(body, SETTINGS, PRICES, origin=ORIGIN, now=1_030.5)
    assert again is not first
    assert again == fresh  # (every compared field, the fallbacks' too)
    assert again.received == 1_030.5 and again.expires == 1_030 + 120
    assert [f.expires for f in again.fallbacks] == [1_150]
    assert again.quote(100) == fresh.quote(100) and again.quote(100).expires == 1_150 != old_quote.expires
    assert again.prefixes() == fresh.prefixes() and again.forward("max_tokens", 9) == fresh.forward("max_tokens", 9)
    assert first.received == 1_000.0  # (the call a request goes on with is its own)


def test_only_a_request_answered_402_is_kept():
    parse, calls = counting(parse_chat)
    kept = PricedRequests()
    for _ in range(2):  # (paid without a 402 first: nothing to keep)
        kept.parse(pricing(raw(), parse))
    assert len(calls) == 2 and len(kept) == 0


def test_it_parses_again_when_anything_it_depends_on_differs():
    parse, calls = counting(parse_chat)
    kept = PricedRequests()
    body = raw()
    with at(1_000.0):
        answered_402(kept, pricing(body, parse))
        answered_402(kept, pricing(body, parse))
        assert len(calls) == 1
        answered_402(kept, pricing(body, parse, origin="".join(["http://127.0.0.1", ":8402"])))
        assert len(calls) == 1  # (an origin is built anew for each request: equal is the same)
        answered_402(kept, pricing(body, parse, origin="https://other.example"))
        answered_402(kept, pricing(body, parse, byok=True))
        answered_402(kept, pricing(body, parse, prices=dict(PRICES)))  # (prices refreshed)
        answered_402(kept, pricing(body, parse, settings=SETTINGS.model_copy()))
        answered_402(kept, pricing(raw(user="x"), parse))
        assert len(calls) == 6
    with at(1_000.0 + 120):  # (its quote could no longer be paid)
        kept.parse(pricing(raw(user="x"), parse))
    assert len(calls) == 7


def test_another_api_parses_the_same_bytes_its_own_way():
    kept = PricedRequests()
    body = json.dumps({"model": "m", "input": "hi", "messages": [{"role": "user", "content": "hi"}]}).encode()
    as_chat = answered_402(kept, pricing(body))
    as_embeddings = answered_402(kept, pricing(body, parse_embeddings))
    assert (as_chat.surface, as_embeddings.surface) == ("chat", "embeddings")
    assert as_chat.digest != as_embeddings.digest


def test_a_refused_request_is_refused_every_time():
    kept = PricedRequests()
    for _ in range(2):
        with pytest.raises(BadRequest):
            kept.parse(pricing(b'{"model":"m","model":"m"}'))
    assert len(kept) == 0


def test_it_is_bounded_in_requests_and_bytes():
    kept = PricedRequests(max_requests=3, max_bytes=4_000)
    bodies = [raw(user=f"u{i}") for i in range(5)]
    for b in bodies:
        answered_402(kept, pricing(b))
    assert len(kept) == 3 and kept_bodies(kept) == bodies[2:]
    kept.parse(pricing(bodies[2]))  # (used again: kept longest)
    answered_402(kept, pricing(bodies[0]))
    assert kept_bodies(kept) == [bodies[4], bodies[2], bodies[0]]  # (least recently used out first)
    big = raw(user="x" * 960)  # (with its origin, more than a quarter of the bytes: not kept)
    answered_402(kept, pricing(big))
    assert big not in kept_bodies(kept)
    for b in [raw(user=f"{i}" * 880) for i in range(4)]:
        answered_402(kept, pricing(b))
    assert kept._bytes == sum(len(b) + len(ORIGIN) for b in kept_bodies(kept)) <= 4_000


def test_a_request_answered_402_again_is_kept_once_and_last():
    kept = PricedRequests(max_requests=3)
    a, b = raw(user="a"), raw(user="b")
    for body in (a, b, a):
        answered_402(kept, pricing(body))
    assert kept_bodies(kept) == [b, a]
    assert kept._bytes == len(a) + len(b) + 2 * len(ORIGIN)


def test_what_a_call_works_out_is_not_kept(monkeypatch):
    kept = PricedRequests()
    body = raw()
    first = answered_402(kept, pricing(body))
    first.prefixes(), first.forward("max_tokens", 100)
    (stored,) = (call for _, _, call, _ in kept._kept.values())
    assert stored is not first and not stored._memo
    monkeypatch.setattr(chat, "parse_generation", None)  # (a kept parse parses nothing)
    second = kept.parse(pricing(body))
    assert second is not stored and second._memo is not stored._memo


def test_new_settings_forget_every_parse():
    parse, calls = counting(parse_chat)
    kept = PricedRequests()
    answered_402(kept, pricing(raw(user="a"), parse))
    refreshed = SETTINGS.model_copy()
    answered_402(kept, pricing(raw(user="b"), parse, settings=refreshed))
    assert len(kept) == 1 and len(calls) == 2
    kept.parse(pricing(raw(user="b"), parse, settings=refreshed))
    assert len(calls) == 2
    late = pricing(raw(user="c"), parse)  # (parsed under the old settings, answered after the refresh)
    kept.keep(late, parse_chat(late.raw, SETTINGS, PRICES, origin=ORIGIN))
    assert len(kept) == 1
