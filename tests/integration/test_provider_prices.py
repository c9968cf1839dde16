"""One model, three upstreams at different prices: each routing mode picks what it should, the
quote covers the dearest upstream the call may take, the call is billed at the prices of the one
that served it; by default the upstream whose cache discount survives is preferred."""

from __future__ import annotations

import os
from decimal import Decimal
from fractions import Fraction

import httpx
import pytest

from conftest import gateway_settings
from support import ServerThread, credit, eventually, wait_receipt
from tollway import stats
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.config import Price, UpstreamSettings
from tollway.mock_upstream import MockOptions
from tollway.mock_upstream import create_app as create_mock
from tollway.pricing import to_atomic

DEAR = Price(prompt=Decimal("0.00003"), completion=Decimal("0.00006"))
MID = Price(prompt=Decimal("0.00001"), completion=Decimal("0.00002"))
# "cheap" has no price of its own: it serves at mock/echo's configured price (0.000001, 0.000002)


@pytest.fixture(scope="module")
def gw(devnet, tmp_path_factory):
    with ServerThread(create_mock()) as dear, ServerThread(create_mock()) as mid, ServerThread(create_mock()) as cheap:
        settings = gateway_settings(devnet, "", tmp_path_factory.mktemp("prices") / "l.sqlite3")
        upstreams = [
            UpstreamSettings(name="dear", url=dear.url + "/v1", prices={"mock/echo": DEAR}),
            UpstreamSettings(name="mid", url=mid.url + "/v1", prices={"mock/echo": MID}),
            UpstreamSettings(name="cheap", url=cheap.url + "/v1"),
        ]
        settings = settings.model_copy(update={"upstreams": upstreams})
        with ServerThread(create_app(settings)) as server:
            yield server, settings


@pytest.fixture
def http(gw, chain, devnet):
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw[0].url, timeout=30) as client:
        yield client


def served(http: httpx.Client, **extra) -> dict:
    """A call (a conversation of its own: no stickiness), paid; its receipt."""
    text = f"price me {os.urandom(4).hex()}"
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return wait_receipt(str(http.base_url), r.headers["x-tollway-receipt"])


def billed(receipt: dict, price: Price) -> int:
    u, p = receipt["usage"], price.per_token()
    cached, written = u["cached_tokens"] or 0, u["cache_write_tokens"] or 0
    usd = (
        (u["prompt_tokens"] - cached - written) * Fraction(p["prompt"])
        + cached * Fraction(p["cache_read"])
        + written * Fraction(p["cache_write"])
        + u["completion_tokens"] * Fraction(p["completion"])
    )
    return to_atomic(usd, 6)


def test_each_mode_picks_its_upstream_and_each_call_is_billed_at_the_one_that_served(gw, http):
    list_price = gw[1].models["mock/echo"]  # (as configured: what "cheap" serves at)
    for extra, upstream, price in [
        ({}, "cheap", list_price),  # the default: the lowest expected cost (configured first: dear)
        ({"provider": {"sort": "price"}}, "cheap", list_price),
        ({"model": "mock/echo:floor"}, "cheap", list_price),
        ({"provider": {"order": ["dear"]}}, "dear", DEAR),
        ({"provider": {"only": ["mid", "dear"]}}, "mid", MID),
        ({"provider": {"ignore": ["cheap"], "sort": "price"}}, "mid", MID),
        # max_price (USD per million tokens) leaves out dear (30), so order's next, mid (10), serves
        ({"provider": {"order": ["dear", "mid"], "max_price": {"prompt": 15}}}, "mid", MID),
    ]:
        receipt = served(http, **extra)
        assert receipt["upstream"] == upstream and receipt["api"] == "chat", extra
        assert int(receipt["cost"]["atomic"]) == billed(receipt, price), extra
        assert int(receipt["cost"]["atomic"]) <= int(receipt["quote"]["atomic"])


def test_the_quote_covers_the_dearest_upstream_and_the_catalogue_shows_each_price(gw, http):
    server = gw[0]
    # The dearest first: a call quoted at the cheap upstream's price and served by dear would be
    # charged more than its quote.
    receipt = served(http, provider={"order": ["dear"]})
    assert billed(receipt, DEAR) <= int(receipt["quote"]["atomic"])
    listed = next(m for m in httpx.get(server.url + "/v1/models").json()["data"] if m["id"] == "mock/echo")
    assert Decimal(listed["pricing"]["prompt"]) == DEAR.prompt  # (what quotes cover)
    endpoints = httpx.get(server.url + "/v1/models/mock/echo/endpoints").json()["data"]["endpoints"]
    prompts = {e["provider_name"]: Decimal(e["pricing"]["prompt"]) for e in endpoints}
    assert prompts == {"dear": DEAR.prompt, "mid": MID.prompt, "cheap": Decimal("0.000001")}


def test_a_max_price_no_upstream_meets_is_refused_before_any_quote(gw):
    r = httpx.post(
        gw[0].url + "/v1/chat/completions",
        json={
            "model": "mock/echo",
            "messages": [{"role": "user", "content": "x"}],
            "provider": {"max_price": {"prompt": 0.5}},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_route", r.text


def test_prices_for_a_model_the_upstream_does_not_serve_are_refused():
    with pytest.raises(ValueError, match="does not serve"):
        UpstreamSettings(name="x", url="http://x.test/v1", models=["a"], prices={"b": MID})


SYSTEM = "You are a careful assistant who follows the rules. " * 40


def test_by_default_the_upstream_whose_cache_discount_survives_is_preferred(devnet, chain, tmp_path):
    """Two upstreams at one price; "forgets" reports no cache hits (its discount never survives),
    "keeps" does. Both have seen the prompt's prefix; a new conversation with it goes to "keeps",
    though "forgets" comes first in the configuration."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "LAG", 0.0)
        forgets, keeps = create_mock(MockOptions(cache=False)), create_mock()
        with ServerThread(forgets) as f, ServerThread(keeps) as k:
            settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
            upstreams = [
                UpstreamSettings(name="forgets", url=f.url + "/v1"),
                UpstreamSettings(name="keeps", url=k.url + "/v1"),
            ]
            settings = settings.model_copy(update={"upstreams": upstreams, "stats_refresh_seconds": 0.1})
            with ServerThread(create_app(settings)) as gw:
                payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
                with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw.url, timeout=30) as http:

                    def ask(user: str, **extra) -> dict:
                        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
                        r = http.post(
                            "/v1/chat/completions",
                            json={"model": "mock/echo", "messages": messages, "max_tokens": 4, **extra},
                        )
                        assert r.status_code == 200, r.text
                        return wait_receipt(gw.url, r.headers["x-tollway-receipt"])

                    for i in range(3):  # each sees the prefix, twice or more: the second time it is expected cached
                        for name in ("forgets", "keeps"):
                            ask(f"warm {i}", provider={"only": [name]})  # (the same prompt to both)

                    def survival(name: str) -> float | None:
                        doc = httpx.get(gw.url + "/v1/models/mock/echo/endpoints").json()["data"]["endpoints"]
                        return next(e for e in doc if e["provider_name"] == name)["cache_survival_last_30m"]

                    eventually(lambda: survival("forgets") == 0.0 and (survival("keeps") or 0) > 0.5, what="survival")
                    receipt = ask("a new conversation")
                    assert receipt["upstream"] == "keeps" and receipt["usage"]["cached_tokens"] > 0


def test_an_exact_payment_of_the_dearest_quote_served_cheaper_keeps_the_rest_as_credit(gw, chain, devnet):
    """Neither side loses: exact pays the quote (which covers "dear"), "cheap" serves and bills
    less, and exactly the difference becomes the wallet's credit — never negative, never more."""
    wallet = chain.fund()  # (no Permit2 allowance: the client pays exact)
    before = chain.balance(wallet.address)
    payer = Payer(wallet, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw[0].url, timeout=30) as http:
        receipt = served(http, provider={"order": ["cheap"]})
    assert receipt["upstream"] == "cheap" and receipt["payment"]["scheme"] == "exact"
    paid, cost = int(receipt["paid"]["atomic"]), int(receipt["cost"]["atomic"])
    assert cost == billed(receipt, gw[1].models["mock/echo"]) < paid == int(receipt["quote"]["atomic"])
    assert int(receipt["credit_after"]["atomic"]) == paid - cost
    assert credit(gw[0].url, payer) == paid - cost
    assert chain.balance(wallet.address) == before - paid
