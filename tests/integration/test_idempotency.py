"""payment-identifier and Idempotency-Key: a repeat of a paid call gets its first answer and is
never charged twice; the same id for another request, or while the first runs, gets 409; an id
whose call was not served may pay a retry; ``required`` means an id with every payment."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import httpx
import pytest

from support import (
    CHAT,
    chat_body,
    dedicated_gateway,
    envelope,
    error_code,
    exact_offer,
    payment_header,
    payment_required,
    payment_rows,
    wait_receipt,
)
from tollway.client.payer import sign_exact


def new_id() -> str:
    return "pay_" + secrets.token_hex(16)


def paid(url: str, account: Any, body: dict[str, Any], ident: str | None = None) -> dict[str, str]:
    """The PAYMENT-SIGNATURE of an exact payment for ``body`` — with a payment identifier."""
    required = payment_required(httpx.post(url + CHAT, json=body))
    assert required["extensions"]["payment-identifier"] == {"info": {"required": False}}
    offer = exact_offer(required)
    doc = envelope(required, offer, sign_exact(account, offer, int(time.time())))
    if ident is not None:
        doc["extensions"] = {"payment-identifier": {"info": {"required": False, "id": ident}}}
    return payment_header(doc)


def asked(upstream) -> int:
    return httpx.get(f"{upstream.url}/mock/stats").json()["requests"]


def test_the_same_payment_twice_is_answered_twice_and_charged_once(gateway, chain, upstream):
    payer = chain.fund()
    body = chat_body("once only", max_tokens=8)
    header = paid(gateway.url, payer, body, new_id())
    first = httpx.post(gateway.url + CHAT, json=body, headers=header)
    assert first.status_code == 200
    wait_receipt(gateway.url, first.headers["x-tollway-receipt"])
    before_chain, before_upstream = chain.balance(payer.address), asked(upstream)
    again = httpx.post(gateway.url + CHAT, json=body, headers=header)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    for name in ("x-tollway-receipt", "payment-response", "x-tollway-cost"):
        assert again.headers[name] == first.headers[name]
    assert chain.balance(payer.address) == before_chain and asked(upstream) == before_upstream
    assert len(payment_rows(gateway.store.engine, payer.address)) == 1


def test_the_same_id_for_another_request_is_a_409(gateway, chain):
    payer, ident = chain.fund(), new_id()
    body = chat_body("the first request", max_tokens=8)
    assert httpx.post(gateway.url + CHAT, json=body, headers=paid(gateway.url, payer, body, ident)).status_code == 200
    other = chat_body("another request", max_tokens=8)
    r = httpx.post(gateway.url + CHAT, json=other, headers=paid(gateway.url, payer, other, ident))
    assert r.status_code == 409 and error_code(r) == "payment_identifier_reused"
    assert len(payment_rows(gateway.store.engine, payer.address)) == 1  # the second payment was never taken


async def test_a_repeat_while_the_first_runs_is_a_409(gateway, chain):
    payer = chain.fund()
    body = chat_body("slow", max_tokens=8, mock={"latency": 1.0})
    header = paid(gateway.url, payer, body, new_id())
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        first = asyncio.create_task(http.post(CHAT, json=body, headers=header))
        await asyncio.sleep(0.3)
        during = await http.post(CHAT, json=body, headers=header)
        assert during.status_code == 409 and error_code(during) == "request_in_progress"
        assert (await first).status_code == 200
        after = await http.post(CHAT, json=body, headers=header)
    assert after.status_code == 200 and after.headers["idempotent-replayed"] == "true"


def test_an_id_whose_call_was_not_served_pays_a_retry(gateway, chain):
    payer, ident = chain.fund(), new_id()
    failing = chat_body("fail first", max_tokens=8, mock={"fail": 500})
    r = httpx.post(gateway.url + CHAT, json=failing, headers=paid(gateway.url, payer, failing, ident))
    assert r.status_code == 502
    body = chat_body("then succeed", max_tokens=8)  # (nothing was charged: the id is free again)
    assert httpx.post(gateway.url + CHAT, json=body, headers=paid(gateway.url, payer, body, ident)).status_code == 200


def test_a_stream_repeated_gets_its_receipt(gateway, chain):
    payer = chain.fund()
    body = chat_body("a stream", max_tokens=8, stream=True)
    header = paid(gateway.url, payer, body, new_id())
    with httpx.stream("POST", gateway.url + CHAT, json=body, headers=header) as r:
        assert r.status_code == 200 and "data: [DONE]" in r.read().decode()
    wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    again = httpx.post(gateway.url + CHAT, json=body, headers=header)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    doc = again.json()
    assert doc["object"] == "tollway.receipt" and doc["id"] == r.headers["x-tollway-receipt"]
    assert doc["payment"]["state"] == "settled"


def test_idempotency_key_header_behaves_the_same(gateway, chain):
    payer, key = chain.fund(), new_id()
    body = chat_body("keyed", max_tokens=8)
    header = {**paid(gateway.url, payer, body), "Idempotency-Key": key}
    first = httpx.post(gateway.url + CHAT, json=body, headers=header)
    again = httpx.post(gateway.url + CHAT, json=body, headers=header)
    assert first.status_code == again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content


@pytest.mark.parametrize("ident", ["short", "x" * 129, "spaces are not allowed here", 12345678901234567])
def test_a_malformed_id_is_a_400(gateway, chain, ident):
    body = chat_body("bad id", max_tokens=8)
    r = httpx.post(gateway.url + CHAT, json=body, headers=paid(gateway.url, chain.fund(), body, ident))
    assert r.status_code == 400 and error_code(r) == "invalid_payment_identifier"


def test_required_means_an_id_with_every_payment(gateway, chain, tmp_path):
    payer = chain.fund()
    with dedicated_gateway(gateway, chain, tmp_path, payment_identifier_required=True) as (url, _):
        body = chat_body("no id", max_tokens=8)
        required = payment_required(httpx.post(url + CHAT, json=body))
        assert required["extensions"]["payment-identifier"]["info"]["required"] is True
        offer = exact_offer(required)
        header = payment_header(envelope(required, offer, sign_exact(payer, offer, int(time.time()))))
        r = httpx.post(url + CHAT, json=body, headers=header)
        assert r.status_code == 400 and error_code(r) == "payment_identifier_required"
