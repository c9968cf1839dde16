"""Replay: one EIP-3009 authorization pays for at most one served call, whatever the timing.

Concurrent copies of one payment against one gateway and against two replicas sharing one
ledger; a payment released because its call failed, which may pay a retry of the very same
request but never another one.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from support import (
    CHAT,
    NONCE_USED,
    QUOTE_MISMATCH,
    SETTLE_WAIT,
    ServerThread,
    await_receipt,
    call_rows,
    chat_body,
    dedicated_gateway,
    error_code,
    exact_offer,
    exact_payment,
    free_port,
    payment_header,
    payment_required,
    payment_rows,
    wait_receipt,
)
from tollway.app import create_app
from tollway.mock_upstream import create_app as create_mock
from tollway.payments.x402 import unb64json


def check_one_served(responses: list[httpx.Response]) -> httpx.Response:
    served = [r for r in responses if r.status_code == 200]
    others = [(r.status_code, error_code(r)) for r in responses if r.status_code != 200]
    assert len(served) == 1, f"{len(served)} served; the others: {others}"
    assert others == [(402, NONCE_USED)] * (len(responses) - 1), others
    return served[0]


async def test_one_payment_sent_twenty_times_concurrently_is_served_once(gateway, chain):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("replay me twenty times at once")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        required = payment_required(await client.post(CHAT, json=body))
        amount = int(exact_offer(required)["amount"])
        headers = payment_header(exact_payment(payer, required))
        responses = await asyncio.gather(*(client.post(CHAT, json=body, headers=headers) for _ in range(20)))
        served = check_one_served(list(responses))
        assert served.json()["choices"][0]["message"]["content"].startswith("echo:")
        receipt = await await_receipt(gateway.url, served.headers["x-tollway-receipt"])
        assert receipt["payment"]["amount"]["atomic"] == str(amount)

        later = await client.post(CHAT, json=body, headers=headers)
        assert later.status_code == 402 and error_code(later) == NONCE_USED, later.text

    await asyncio.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before - amount
    assert [p["state"] for p in payment_rows(gateway.store.engine, payer.address)] == ["settled"]


async def test_two_replicas_sharing_one_ledger_serve_a_payment_once(gateway, chain):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("replay me across two replicas")
    with ServerThread(create_app(gateway.settings)) as replica:
        async with httpx.AsyncClient(timeout=30) as client:
            required = payment_required(await client.post(gateway.url + CHAT, json=body))
            amount = int(exact_offer(required)["amount"])
            headers = payment_header(exact_payment(payer, required))
            urls = [gateway.url, replica.url] * 10
            responses = await asyncio.gather(*(client.post(u + CHAT, json=body, headers=headers) for u in urls))
            served = check_one_served(list(responses))
            # the receipt is readable from either replica: they share the ledger
            receipt_id = served.headers["x-tollway-receipt"]
            await await_receipt(replica.url, receipt_id)
            await await_receipt(gateway.url, receipt_id)
            for url in (gateway.url, replica.url):
                later = await client.post(url + CHAT, json=body, headers=headers)
                assert later.status_code == 402 and error_code(later) == NONCE_USED, later.text

    await asyncio.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before - amount
    assert [p["state"] for p in payment_rows(gateway.store.engine, payer.address)] == ["settled"]


def test_failed_call_releases_its_payment_and_the_proof_stays_bound_to_its_request(gateway, chain):
    payer = chain.fund()
    before = chain.balance(payer.address)
    failing = chat_body("this call fails upstream", mock={"fail": 500})
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        required = payment_required(client.post(CHAT, json=failing))
        offer = exact_offer(required)
        headers = payment_header(exact_payment(payer, required, offer))

        for _attempt in range(2):  # the failing call, then a retry of it with the same proof
            r = client.post(CHAT, json=failing, headers=headers)
            assert r.status_code == 502, r.text
            assert "PAYMENT-RESPONSE" not in r.headers
            rows = payment_rows(gateway.store.engine, payer.address)
            assert [(p["state"], p["tx_hash"]) for p in rows] == [("released", None)], rows
            assert {c["status"] for c in call_rows(gateway.store.engine, rows[0]["id"])} == {"failed"}

        # The released proof cannot pay a different request: not with its quote ...
        other = chat_body("this call would succeed!")  # padded to the same size, so the same price
        size = len(json.dumps(failing, ensure_ascii=False, separators=(",", ":")))
        while len(json.dumps(other, ensure_ascii=False, separators=(",", ":"))) < size:
            other["messages"][0]["content"] += "!"
        other_required = payment_required(client.post(CHAT, json=other))
        assert exact_offer(other_required)["amount"] == offer["amount"]
        r = client.post(CHAT, json=other, headers=headers)
        assert r.status_code == 402 and error_code(r) == QUOTE_MISMATCH, r.text
        # ... nor with the quote taken out (then it pays "today's price", which is the same amount)
        doc = unb64json(headers["PAYMENT-SIGNATURE"])
        doc["accepted"]["extra"] = {k: v for k, v in doc["accepted"]["extra"].items() if k != "quote"}
        r = client.post(CHAT, json=other, headers=payment_header(doc))
        assert r.status_code == 402 and error_code(r) == NONCE_USED, r.text

    time.sleep(SETTLE_WAIT)
    rows = payment_rows(gateway.store.engine, payer.address)
    assert [(p["state"], p["tx_hash"]) for p in rows] == [("released", None)], rows
    assert chain.balance(payer.address) == before


def test_released_proof_pays_the_retry_of_the_same_request_once_upstream_recovers(gateway, chain, tmp_path: Path):
    """Upstream down → 503 and the payment is released; upstream back → the same proof is served, once."""
    upstream_port = free_port()  # nothing listens here yet
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("retry me when the upstream is back")
    with (
        dedicated_gateway(gateway, chain, tmp_path, upstream_url=upstream_url) as (url, engine),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        required = payment_required(client.post(CHAT, json=body))
        amount = int(exact_offer(required)["amount"])
        headers = payment_header(exact_payment(payer, required))

        down = client.post(CHAT, json=body, headers=headers)
        assert down.status_code == 503, down.text
        assert down.headers.get("retry-after"), down.headers
        rows = payment_rows(engine, payer.address)
        assert [(p["state"], p["tx_hash"]) for p in rows] == [("released", None)], rows

        with ServerThread(create_mock(), port=upstream_port):
            up = client.post(CHAT, json=body, headers=headers)
            assert up.status_code == 200, up.text
            wait_receipt(url, up.headers["x-tollway-receipt"])
            again = client.post(CHAT, json=body, headers=headers)
            assert again.status_code == 402 and error_code(again) == NONCE_USED, again.text

        time.sleep(SETTLE_WAIT)
        rows = payment_rows(engine, payer.address)
        assert [p["state"] for p in rows] == ["settled"], rows
        assert chain.balance(payer.address) == before - amount
