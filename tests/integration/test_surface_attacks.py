"""Attacks on the Messages and Responses APIs' money paths, as a payer who wants something free and
as one who wants the gateway to pay: one payment twice at once over two replicas, a refusal that
must cost nothing, a quote reused for a body that costs more, a client that hangs up mid-stream."""

from __future__ import annotations

import asyncio
import time

import httpx

from support import (
    SETTLE_WAIT,
    ServerThread,
    await_receipt,
    error_code,
    exact_payment,
    payment_header,
    payment_required,
    payment_rows,
    wait_receipt,
)
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport

MESSAGES = "/v1/messages"
MESSAGE = {"model": "mock/echo", "max_tokens": 16, "messages": [{"role": "user", "content": "attack"}]}


async def test_one_payment_for_a_message_sent_to_two_replicas_at_once_is_served_once(gateway, chain):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = {**MESSAGE, "messages": [{"role": "user", "content": "twice at once, two replicas"}]}
    with ServerThread(create_app(gateway.settings)) as replica:
        async with httpx.AsyncClient(timeout=30) as client:
            required = payment_required(await client.post(gateway.url + MESSAGES, json=body))
            payment = exact_payment(payer, required)
            amount = int(payment["accepted"]["amount"])
            headers = payment_header(payment)
            urls = [gateway.url, replica.url] * 6
            responses = await asyncio.gather(*(client.post(u + MESSAGES, json=body, headers=headers) for u in urls))
    served = [r for r in responses if r.status_code == 200]
    assert len(served) == 1, [(r.status_code, r.text[:80]) for r in responses]
    assert all(r.status_code == 402 for r in responses if r.status_code != 200)
    await await_receipt(gateway.url, served[0].headers["x-tollway-receipt"])
    await asyncio.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before - amount
    assert [p["state"] for p in payment_rows(gateway.store.engine, payer.address)] == ["settled"]


def test_a_refused_message_spends_nothing_before_it_is_refused(gateway, chain, upstream):
    """A valid payment on a request refused for what it asks (an unpriced beta, a server tool): no
    payment locked, no chain transaction, nothing asked of the upstream."""
    payer = chain.fund()
    before = chain.balance(payer.address)
    asked = httpx.get(upstream.url + "/mock/stats").json()["requests"]
    required = payment_required(httpx.post(gateway.url + MESSAGES, json=MESSAGE))
    headers = payment_header(exact_payment(payer, required))
    beta = httpx.post(
        gateway.url + MESSAGES, json=MESSAGE, headers={**headers, "anthropic-beta": "context-1m-2025-08-07"}
    )
    tool = {**MESSAGE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    server_tool = httpx.post(gateway.url + MESSAGES, json=tool, headers=headers)
    for r in (beta, server_tool):
        assert r.status_code == 400 and error_code(r) == "unpriced_parameter", r.text
    time.sleep(SETTLE_WAIT)
    assert payment_rows(gateway.store.engine, payer.address) == []
    assert chain.balance(payer.address) == before
    assert httpx.get(upstream.url + "/mock/stats").json()["requests"] == asked


def test_a_quote_for_a_restricted_request_pays_no_other(gateway, chain):
    """A payment for a body pays that body only: not the same request without its routing
    restriction, nor with a larger cap or a longer system prompt (each could cost more)."""
    quoted = {**MESSAGE, "provider": {"only": ["default"]}, "system": "short"}
    required = payment_required(httpx.post(gateway.url + MESSAGES, json=quoted))
    headers = payment_header(exact_payment(chain.fund(), required))
    others = [
        {k: v for k, v in quoted.items() if k != "provider"},
        {**quoted, "max_tokens": 4000},
        {**quoted, "system": "short" + " and much longer" * 50},
    ]
    for body in others:
        r = httpx.post(gateway.url + MESSAGES, json=body, headers=headers)
        assert r.status_code == 402, (body, r.text)


def test_a_client_that_hangs_up_mid_stream_pays_what_was_delivered_at_most(gateway, chain, devnet):
    """upto, a slow stream of Messages events, the client gone after the first bytes: the call is
    metered (at most its quote), and exactly that moves on chain — never the authorised maximum."""
    payer = chain.fund(permit2=True)
    before = chain.balance(payer.address)
    text = " ".join(f"w{i}" for i in range(40))
    body = {**MESSAGE, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": text}]}
    pay = Payer(payer, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with (
        httpx.Client(transport=SyncPayingTransport(pay), timeout=30) as http,
        http.stream("POST", gateway.url + MESSAGES, json={**body, "mock": {"chunk_delay": 0.05}}) as r,
    ):
        assert r.status_code == 200
        receipt_id = r.headers["x-tollway-receipt"]
        next(r.iter_bytes())  # the first bytes, then gone
    receipt = wait_receipt(gateway.url, receipt_id, timeout=30)
    assert receipt["payment"]["scheme"] == "upto" and receipt["status"] == "incomplete"
    cost, quote = int(receipt["cost"]["atomic"]), int(receipt["quote"]["atomic"])
    assert 0 < cost <= quote and receipt["usage"]["dialect"] == "estimated"
    time.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before - cost
