"""Attacks on the parse a 402 keeps for its paid retry (``priced.py``): the retry is priced and
served exactly as a fresh parse would be, whoever else sends the same bytes, at once or after.

Each refusal here costs nothing: no upstream call, no payment locked, no gas.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from support import (
    CHAT,
    QUOTE_MISMATCH,
    SETTLE_WAIT,
    chat_body,
    error_code,
    eventually,
    exact_offer,
    exact_payment,
    payment_header,
    payment_required,
    payment_rows,
)

JSON = {"content-type": "application/json"}


def upstream_requests(upstream) -> int:
    return int(httpx.get(f"{upstream.url}/mock/stats").json()["requests"])


def test_a_retry_that_is_not_the_bytes_its_402_priced_is_refused_before_anything_is_spent(gateway, chain, upstream):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("priced small, sent large")
    raw = json.dumps(body).encode()
    required = payment_required(httpx.post(gateway.url + CHAT, content=raw, headers=JSON))
    headers = {**JSON, **payment_header(exact_payment(payer, required))}
    asked = upstream_requests(upstream)
    same_length = chat_body("priced small, sent LARGE", max_tokens=9)  # (bytes as long as the priced ones)
    assert len(json.dumps(same_length)) == len(raw)
    for costlier in (
        same_length,
        {**body, "max_tokens": 4000},  # more output than was priced
        {**body, "messages": body["messages"] * 20},  # a longer prompt
        {**body, "n": 4},  # more completions
    ):
        r = httpx.post(gateway.url + CHAT, content=json.dumps(costlier).encode(), headers=headers)
        assert r.status_code == 402 and error_code(r) == QUOTE_MISMATCH, r.text
    assert upstream_requests(upstream) == asked  # (no upstream work for a refusal)
    assert payment_rows(gateway.store.engine, payer.address) == []  # (nothing locked: no gas either)
    # The same request written otherwise (other bytes, the same JSON) is parsed anew: it is the
    # request the quote is for, and is served at it — once.
    amount = int(exact_offer(required)["amount"])
    r = httpx.post(gateway.url + CHAT, content=json.dumps(body, indent=2).encode(), headers=headers)
    assert r.status_code == 200, r.text
    assert httpx.post(gateway.url + CHAT, content=raw, headers=headers).status_code == 402  # (its payment is spent)
    assert upstream_requests(upstream) == asked + 1
    eventually(lambda: chain.balance(payer.address) == before - amount, what="the payment settled")


async def test_payers_of_the_same_bytes_at_once_are_each_priced_served_and_charged_alone(gateway, chain, upstream):
    payers = [chain.fund() for _ in range(6)]
    before = [chain.balance(p.address) for p in payers]
    raw = json.dumps(chat_body("everyone asks the very same thing", max_tokens=12)).encode()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        quotes = await asyncio.gather(*(client.post(CHAT, content=raw, headers=JSON) for _ in payers))
        required = [payment_required(q) for q in quotes]
        amounts = {int(exact_offer(r)["amount"]) for r in required}
        assert len(amounts) == 1  # (every 402 of the same bytes quotes the same)
        paid = await asyncio.gather(
            *(
                client.post(CHAT, content=raw, headers={**JSON, **payment_header(exact_payment(p, r))})
                for p, r in zip(payers, required, strict=True)
            )
        )
        assert [r.status_code for r in paid] == [200] * len(payers), [r.text for r in paid if r.status_code != 200]
        receipts = {r.headers["x-tollway-receipt"] for r in paid}
        assert len(receipts) == len(payers)
        after = payment_required(await client.post(CHAT, content=raw, headers=JSON))  # (what they did left nothing)
        assert int(exact_offer(after)["amount"]) in amounts
        assert after["accepts"][0]["extra"]["maxTokens"] == required[0]["accepts"][0]["extra"]["maxTokens"]
    await asyncio.sleep(SETTLE_WAIT)
    (amount,) = amounts
    for p, b in zip(payers, before, strict=True):
        eventually(lambda p=p, b=b: chain.balance(p.address) == b - amount, what="each payment settled")
        eventually(lambda p=p: [r["state"] for r in payment_rows(gateway.store.engine, p.address)] == ["settled"])
