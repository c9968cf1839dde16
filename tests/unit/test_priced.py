"""A paid retry reuses the parse of its 402 — exactly as parsing it again would make it, and only
where parsing it again would make the same."""

from __future__ import annotations

import json
from decimal import Decimal
from unittest import mock

import pytest

from tollway import chat
from tollway.chat import parse_chat, parse_embeddings
from tollway.config import ModelPrice, Settings
from tollway.errors import BadRequest
from tollway.priced import PricedRequests
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


def counting(parse):
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return parse(*a, **k)

    return counted, calls


def kept_bodies(kept: PricedRequests) -> list[bytes]:
    return [key[-1] for key in kept._kept]


def at(t: float):
    return mock.patch("tollway.priced.time.time", return_value=t)


def test_a_retry_gets_what_a_parse_at_its_arrival_makes():
    kept = PricedRequests()
    body = raw(models=["m", "n"])
    with at(1_000.0):
        first = kept.parse(parse_chat, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
        first.prefixes()  # (what was worked out of the body is kept)
        old_quote = first.quote(100)
    with at(1_030.5):
        again = kept.parse(parse_chat, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    fresh = parse_chat(body, SETTINGS, PRICES, origin=ORIGIN, now=1_030.5)
    assert again is not first
    assert again == fresh  # (every compared field, the fallbacks' too)
    assert again.received == 1_030.5 and again.expires == 1_030 + 120
    assert [f.expires for f in again.fallbacks] == [1_150]
    assert again.quote(100) == fresh.quote(100) and again.quote(100).expires == 1_150 != old_quote.expires
    assert again.prefixes() == first.prefixes()
    assert first.received == 1_000.0  # (the call a request goes on with is its own)


def test_it_parses_again_when_anything_it_depends_on_differs():
    parse, calls = counting(parse_chat)
    kept = PricedRequests()
    body = raw()
    with at(1_000.0):
        kept.parse(parse, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
        kept.parse(parse, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
        assert len(calls) == 1
        kept.parse(parse, body, SETTINGS, PRICES, origin="".join(["http://127.0.0.1", ":8402"]), byok=False)
        assert len(calls) == 1  # (an origin is built anew for each request: equal is the same)
        kept.parse(parse, body, SETTINGS, PRICES, origin="https://other.example", byok=False)
        kept.parse(parse, body, SETTINGS, PRICES, origin=ORIGIN, byok=True)
        kept.parse(parse, body, SETTINGS, dict(PRICES), origin=ORIGIN, byok=False)  # (prices refreshed)
        kept.parse(parse, body, SETTINGS.model_copy(), PRICES, origin=ORIGIN, byok=False)
        kept.parse(parse, raw(user="x"), SETTINGS, PRICES, origin=ORIGIN, byok=False)
        assert len(calls) == 6
    with at(1_000.0 + 120):  # (its quote could no longer be paid)
        kept.parse(parse, raw(user="x"), SETTINGS, PRICES, origin=ORIGIN, byok=False)
    assert len(calls) == 7


def test_another_api_parses_the_same_bytes_its_own_way():
    kept = PricedRequests()
    body = json.dumps({"model": "m", "input": "hi", "messages": [{"role": "user", "content": "hi"}]}).encode()
    as_chat = kept.parse(parse_chat, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    as_embeddings = kept.parse(parse_embeddings, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    assert (as_chat.surface, as_embeddings.surface) == ("chat", "embeddings")
    assert as_chat.digest != as_embeddings.digest


def test_a_refused_request_is_refused_every_time():
    kept = PricedRequests()
    for _ in range(2):
        with pytest.raises(BadRequest):
            kept.parse(parse_chat, b'{"model":"m","model":"m"}', SETTINGS, PRICES, origin=ORIGIN, byok=False)
    assert len(kept) == 0


def test_it_is_bounded_in_requests_and_bytes():
    kept = PricedRequests(max_requests=3, max_bytes=4_000)
    bodies = [raw(user=f"u{i}") for i in range(5)]
    for b in bodies:
        kept.parse(parse_chat, b, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    assert len(kept) == 3 and kept_bodies(kept) == bodies[2:]
    kept.parse(parse_chat, bodies[2], SETTINGS, PRICES, origin=ORIGIN, byok=False)  # (used again: kept longest)
    kept.parse(parse_chat, bodies[0], SETTINGS, PRICES, origin=ORIGIN, byok=False)
    assert kept_bodies(kept) == [bodies[4], bodies[2], bodies[0]]  # (least recently used out first)
    big = raw(user="x" * 1_200)  # (more than a quarter of the bytes: not kept)
    kept.parse(parse_chat, big, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    assert big not in kept_bodies(kept)
    medium = [raw(user=f"{i}" * 900) for i in range(4)]
    for b in medium:
        kept.parse(parse_chat, b, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    assert kept._bytes == sum(len(b) for b in kept_bodies(kept)) <= 4_000


def test_a_kept_parse_is_copied_not_shared(monkeypatch):
    kept = PricedRequests()
    body = raw()
    first = kept.parse(parse_chat, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    monkeypatch.setattr(chat, "parse_generation", None)  # (a hit parses nothing)
    second = kept.parse(parse_chat, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    assert second is not first and second._memo is not first._memo


def test_what_a_call_works_out_after_its_parse_is_not_kept():
    kept = PricedRequests()
    body = raw()
    first = kept.parse(parse_chat, body, SETTINGS, PRICES, origin=ORIGIN, byok=False)
    first.prefixes(), first.forward("max_tokens", 100)
    (stored,) = (call for _, _, call in kept._kept.values())
    assert stored is not first and {k[0] for k in first._memo} == {"quote", "prefixes", "body"}
    assert not stored._memo  # (nor the quote its parse made: quotes carry their expiry)


def test_new_settings_forget_every_parse():
    parse, calls = counting(parse_chat)
    kept = PricedRequests()
    kept.parse(parse, raw(user="a"), SETTINGS, PRICES, origin=ORIGIN, byok=False)
    refreshed = SETTINGS.model_copy()
    kept.parse(parse, raw(user="b"), refreshed, PRICES, origin=ORIGIN, byok=False)
    assert len(kept) == 1 and len(calls) == 2
    kept.parse(parse, raw(user="b"), refreshed, PRICES, origin=ORIGIN, byok=False)
    assert len(calls) == 2
