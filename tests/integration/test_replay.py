"""Replay: one EIP-3009 authorization pays for at most one served call, whatever the timing.

Concurrent copies of one payment against one gateway and against two replicas sharing one
ledger; a payment released because its call failed, which may pay a retry of the very same
request but never another one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from sqlalchemy import create_engine, select

from support import ServerThread, await_receipt, free_port, wait_receipt
from tollway.app import create_app
from tollway.client.payer import sign_exact
from tollway.ledger.models import Call, Payment
from tollway.mock_upstream import create_app as create_mock

CHAT = "/v1/chat/completions"
P = Payment.__table__
C = Call.__table__
NONCE_USED = "invalid_exact_evm_nonce_already_used"
QUOTE_MISMATCH = "quote_mismatch"
SETTLE_WAIT = 0.3


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "mock/echo", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def b64(doc: Any) -> str:
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def unb64(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def reason(r: httpx.Response) -> str:
    if r.status_code == 402:
        return str(unb64(r.headers["PAYMENT-REQUIRED"])["error"]).split(":", 1)[0]
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"<no reason: {r.text[:200]!r}>"


def required_of(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 402, r.text
    return unb64(r.headers["PAYMENT-REQUIRED"])


def pay_header(payer: Any, required: dict[str, Any], offer: dict[str, Any] | None = None) -> dict[str, str]:
    offer = offer or required["accepts"][0]
    doc = {
        "x402Version": 2,
        "resource": required["resource"],
        "accepted": offer,
        "payload": sign_exact(payer, offer, int(time.time())),
        "extensions": {},
    }
    return {"PAYMENT-SIGNATURE": b64(doc)}


def payments(engine: Any, payer: Any) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(select(P).where(P.c.payer == payer.address.lower())).mappings()]


def calls(engine: Any, payment_id: str) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(select(C).where(C.c.payment_id == payment_id)).mappings()]


def check_one_served(responses: list[httpx.Response]) -> httpx.Response:
    served = [r for r in responses if r.status_code == 200]
    others = [(r.status_code, reason(r)) for r in responses if r.status_code != 200]
    assert len(served) == 1, f"{len(served)} served; the others: {others}"
    assert others == [(402, NONCE_USED)] * (len(responses) - 1), others
    return served[0]


async def test_one_payment_sent_twenty_times_concurrently_is_served_once(gateway, chain):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("replay me twenty times at once")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        required = required_of(await client.post(CHAT, json=body))
        amount = int(required["accepts"][0]["amount"])
        headers = pay_header(payer, required)
        responses = await asyncio.gather(*(client.post(CHAT, json=body, headers=headers) for _ in range(20)))
        served = check_one_served(list(responses))
        assert served.json()["choices"][0]["message"]["content"].startswith("echo:")
        receipt = await await_receipt(gateway.url, served.headers["x-tollway-receipt"])
        assert receipt["payment"]["amount"]["atomic"] == str(amount)

        later = await client.post(CHAT, json=body, headers=headers)
        assert later.status_code == 402 and reason(later) == NONCE_USED, later.text

    await asyncio.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before - amount
    assert [p["state"] for p in payments(gateway.store.engine, payer)] == ["settled"]


async def test_two_replicas_sharing_one_ledger_serve_a_payment_once(gateway, chain):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("replay me across two replicas")
    with ServerThread(create_app(gateway.settings)) as replica:
        async with httpx.AsyncClient(timeout=30) as client:
            required = required_of(await client.post(gateway.url + CHAT, json=body))
            amount = int(required["accepts"][0]["amount"])
            headers = pay_header(payer, required)
            urls = [gateway.url, replica.url] * 10
            responses = await asyncio.gather(*(client.post(u + CHAT, json=body, headers=headers) for u in urls))
            served = check_one_served(list(responses))
            # the receipt is readable from either replica: they share the ledger
            receipt_id = served.headers["x-tollway-receipt"]
            await await_receipt(replica.url, receipt_id)
            await await_receipt(gateway.url, receipt_id)
            for url in (gateway.url, replica.url):
                later = await client.post(url + CHAT, json=body, headers=headers)
                assert later.status_code == 402 and reason(later) == NONCE_USED, later.text

    await asyncio.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before - amount
    assert [p["state"] for p in payments(gateway.store.engine, payer)] == ["settled"]


def test_failed_call_releases_its_payment_and_the_proof_stays_bound_to_its_request(gateway, chain):
    payer = chain.fund()
    before = chain.balance(payer.address)
    failing = chat_body("this call fails upstream", mock={"fail": 500})
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        required = required_of(client.post(CHAT, json=failing))
        offer = required["accepts"][0]
        headers = pay_header(payer, required, offer)

        for _attempt in range(2):  # the failing call, then a retry of it with the same proof
            r = client.post(CHAT, json=failing, headers=headers)
            assert r.status_code == 502, r.text
            assert "PAYMENT-RESPONSE" not in r.headers
            rows = payments(gateway.store.engine, payer)
            assert [(p["state"], p["tx_hash"]) for p in rows] == [("released", None)], rows
            assert {c["status"] for c in calls(gateway.store.engine, rows[0]["id"])} == {"failed"}

        # The released proof cannot pay a different request: not with its quote ...
        other = chat_body("this call would succeed!")  # padded to the same size, so the same price
        size = len(json.dumps(failing, ensure_ascii=False, separators=(",", ":")))
        while len(json.dumps(other, ensure_ascii=False, separators=(",", ":"))) < size:
            other["messages"][0]["content"] += "!"
        other_required = required_of(client.post(CHAT, json=other))
        assert other_required["accepts"][0]["amount"] == offer["amount"]
        r = client.post(CHAT, json=other, headers=headers)
        assert r.status_code == 402 and reason(r) == QUOTE_MISMATCH, r.text
        # ... nor with the quote taken out (then it pays "today's price", which is the same amount)
        doc = unb64(headers["PAYMENT-SIGNATURE"])
        doc["accepted"]["extra"] = {k: v for k, v in doc["accepted"]["extra"].items() if k != "quote"}
        r = client.post(CHAT, json=other, headers={"PAYMENT-SIGNATURE": b64(doc)})
        assert r.status_code == 402 and reason(r) == NONCE_USED, r.text

    time.sleep(SETTLE_WAIT)
    rows = payments(gateway.store.engine, payer)
    assert [(p["state"], p["tx_hash"]) for p in rows] == [("released", None)], rows
    assert chain.balance(payer.address) == before


def test_released_proof_pays_the_retry_of_the_same_request_once_upstream_recovers(gateway, chain, tmp_path: Path):
    """Upstream down → 503 and the payment is released; upstream back → the same proof is served, once."""
    settler = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [settler.address, hex(10**20)])
    upstream_port = free_port()  # nothing listens here yet
    settings = gateway.settings.model_copy(
        update={
            "database_url": f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
            "upstream": gateway.settings.upstream.model_copy(update={"url": f"http://127.0.0.1:{upstream_port}/v1"}),
            "chain": gateway.settings.chain.model_copy(update={"settler_key": "0x" + bytes(settler.key).hex()}),
        }
    )
    engine = create_engine(settings.database_url)
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("retry me when the upstream is back")
    try:
        with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url, timeout=30) as client:
            required = required_of(client.post(CHAT, json=body))
            amount = int(required["accepts"][0]["amount"])
            headers = pay_header(payer, required)

            down = client.post(CHAT, json=body, headers=headers)
            assert down.status_code == 503, down.text
            assert down.headers.get("retry-after"), down.headers
            rows = payments(engine, payer)
            assert [(p["state"], p["tx_hash"]) for p in rows] == [("released", None)], rows

            with ServerThread(create_mock(), port=upstream_port):
                up = client.post(CHAT, json=body, headers=headers)
                assert up.status_code == 200, up.text
                wait_receipt(gw.url, up.headers["x-tollway-receipt"])
                again = client.post(CHAT, json=body, headers=headers)
                assert again.status_code == 402 and reason(again) == NONCE_USED, again.text

            time.sleep(SETTLE_WAIT)
            rows = payments(engine, payer)
            assert [p["state"] for p in rows] == ["settled"], rows
            assert chain.balance(payer.address) == before - amount
    finally:
        engine.dispose()
