"""Bring your own key: a payer's provider key goes out with the call, in place of the operator's,
and the payer pays the BYOK fee instead of the list price. The key is never logged, stored or
echoed; a quote for a BYOK call cannot pay for a call without the key."""

from __future__ import annotations

import logging
import sqlite3
import time
from fractions import Fraction

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import gateway_settings
from support import SETTLE_WAIT, ServerThread, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.client.payer import sign_exact
from tollway.config import UpstreamSettings
from tollway.mock_upstream import create_app as create_mock
from tollway.payments.x402 import b64json, unb64json
from tollway.pricing import to_atomic

KEY = "sk-payer-0123456789abcdef-SECRET"
BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "my key"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def byok(devnet, tmp_path_factory):
    """A gateway over two upstreams: "house" (the operator's key only) and "own" (takes payers' keys)."""
    house, own = create_mock(), create_mock()
    with ServerThread(house) as house_server, ServerThread(own) as own_server:
        db = tmp_path_factory.mktemp("byok") / "l.sqlite3"
        settings = gateway_settings(devnet, "", db)
        upstreams = [
            UpstreamSettings(name="house", url=house_server.url + "/v1", api_key="sk-operator-house"),
            UpstreamSettings(name="own", url=own_server.url + "/v1", api_key="sk-operator-own", byok=True),
        ]
        with ServerThread(create_app(settings.model_copy(update={"upstreams": upstreams}))) as gw:
            yield gw, house, own, db, settings


def exact_amount(r: httpx.Response) -> int:
    offers = unb64json(r.headers["payment-required"])["accepts"]
    return next(int(o["amount"]) for o in offers if o["scheme"] == "exact")


def test_a_payers_key_goes_out_with_the_call_and_the_fee_is_charged(byok, chain, devnet, caplog):
    gw, house, own, db, settings = byok
    url = f"{gw.url}/v1/chat/completions"
    big = {**BODY, "model": "mock/echo-large", "max_tokens": 4000}  # (a quote well above the smallest payment)
    listed = exact_amount(httpx.post(url, json=big))
    own_key = exact_amount(httpx.post(url, json=big, headers={"X-Provider-Key": KEY}))
    assert abs(own_key * 20 - listed) <= 20  # 5% of the list price (each rounded up)

    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with caplog.at_level(logging.DEBUG), httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        r = http.post(url, json=BODY, headers={"X-Provider-Key": KEY})
        assert r.status_code == 200, r.text
        doc = wait_receipt(gw.url, r.headers["x-tollway-receipt"])
    assert doc["upstream"] == "own"  # (only an upstream that takes payers' keys)
    assert own.state.mock.last_headers["authorization"] == f"Bearer {KEY}"
    u, price = doc["usage"], settings.models["mock/echo"]
    usd = (u["prompt_tokens"] * Fraction(price.prompt) + u["completion_tokens"] * Fraction(price.completion)) / 20
    assert int(doc["cost"]["atomic"]) == to_atomic(usd, 6)

    # Never echoed, logged or stored.
    assert KEY not in r.text and KEY not in str(r.headers) and KEY not in str(doc)
    assert KEY not in caplog.text
    with sqlite3.connect(db) as conn:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            assert KEY not in str(conn.execute(f'SELECT * FROM "{table}"').fetchall()), table
        call_id = r.headers["x-tollway-receipt"]  # (recorded as a BYOK call: a crash's sweep meters it at the fee)
        assert conn.execute("SELECT byok FROM calls WHERE id = ?", (call_id,)).fetchone() == (1,)

    # Without a key, the operator's (on whichever upstream serves it).
    with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        plain = http.post(url, json=BODY)
        assert plain.status_code == 200, plain.text
    served = wait_receipt(gw.url, plain.headers["x-tollway-receipt"])["upstream"]
    mock = {"house": house, "own": own}[served]
    assert mock.state.mock.last_headers["authorization"] == f"Bearer sk-operator-{served}"


def test_a_quote_for_a_call_with_a_key_does_not_pay_one_without(byok, chain):
    url = f"{byok[0].url}/v1/chat/completions"
    required = unb64json(httpx.post(url, json=BODY, headers={"X-Provider-Key": KEY}).headers["payment-required"])
    offer = next(o for o in required["accepts"] if o["scheme"] == "exact")
    payload = sign_exact(chain.fund(), offer, int(time.time()))  # signed for the fee ...
    doc = {"x402Version": 2, "resource": required["resource"], "accepted": offer, "payload": payload}
    r = httpx.post(url, json=BODY, headers={"PAYMENT-SIGNATURE": b64json(doc)})  # ... sent without the key
    assert r.status_code == 402, r.text  # the list price applies: not paid


@pytest.mark.parametrize("key", ["short", "x" * 600, "sk-with space", "sk-\u00e9t\u00e9"])
def test_a_malformed_key_is_refused_without_echoing_it(byok, key):
    r = httpx.post(f"{byok[0].url}/v1/chat/completions", json=BODY, headers={"X-Provider-Key": key.encode()})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_provider_key"
    assert key not in r.text


def test_a_key_the_provider_refuses_is_the_payers_problem(byok, chain, devnet):
    gw = byok[0]
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        r = http.post(
            f"{gw.url}/v1/chat/completions", json={**BODY, "mock": {"fail": 401}}, headers={"X-Provider-Key": KEY}
        )
    assert r.status_code == 401 and r.json()["error"]["code"] == "provider_key_refused", r.text
    assert KEY not in r.text
    health = httpx.get(f"{gw.url}/healthz", headers={"Authorization": "Bearer " + byok[4].admin_token}).json()
    assert all(u["healthy"] for u in health["upstreams"])  # (no cooldown: the upstream did nothing wrong)


def test_a_refused_key_costs_the_payer_nothing(byok, chain, devnet):
    """A payer who wants the gateway to pay: a key the provider refuses, with a payment signed for
    it. The call is not served, so nothing of the payment moves and it is never settled."""
    gw, _, _, db, _ = byok
    wallet = chain.fund()
    before = chain.balance(wallet.address)
    payer = Payer(wallet, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
    with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        r = http.post(
            f"{gw.url}/v1/chat/completions", json={**BODY, "mock": {"fail": 403}}, headers={"X-Provider-Key": KEY}
        )
    assert r.status_code == 401 and r.json()["error"]["code"] == "provider_key_refused", r.text
    time.sleep(SETTLE_WAIT * 3)
    assert chain.balance(wallet.address) == before
    with sqlite3.connect(db) as conn:
        states = {s for (s,) in conn.execute("SELECT state FROM payments WHERE payer = ?", (wallet.address.lower(),))}
    assert states == {"released"}


def key_quoting_upstream(pad: int) -> Starlette:
    """An upstream whose 400 quotes the key it was sent (some proxies and self-hosted servers do),
    after ``pad`` characters of message."""

    async def chat(request: Request) -> JSONResponse:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        message = "x" * pad + f" invalid request for api key {key}"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=400)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.mark.parametrize("pad", [0, 251])  # (251: the 300-character cut falls inside the key)
def test_an_upstream_quoting_the_key_it_was_sent_passes_on_neither_the_operators_nor_the_payers(
    devnet, chain, tmp_path, pad
):
    operator = "sk-operator-0123456789abcdef-SECRET"
    with ServerThread(key_quoting_upstream(pad)) as upstream:
        settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
        upstreams = [UpstreamSettings(name="quoting", url=upstream.url + "/v1", api_key=operator, byok=True)]
        with ServerThread(create_app(settings.model_copy(update={"upstreams": upstreams}))) as gw:
            for headers in ({}, {"X-Provider-Key": KEY}):
                payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
                with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
                    r = http.post(f"{gw.url}/v1/chat/completions", json=BODY, headers=headers)
                assert r.status_code == 400 and r.json()["error"]["code"] == "upstream_rejected_request", r.text
                assert operator[:12] not in r.text and KEY[:12] not in r.text, r.text
    with sqlite3.connect(tmp_path / "l.sqlite3") as conn:
        errors = [e for (e,) in conn.execute("SELECT error FROM calls")]
    assert len([e for e in errors if e.startswith("upstream answered 400")]) == 2, errors
    assert not [e for e in errors if operator[:12] in e or KEY[:12] in e], errors
