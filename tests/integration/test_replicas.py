"""Two gateway replicas sharing one PostgreSQL ledger and one settlement account."""

from __future__ import annotations

import asyncio
import time

import httpx

from conftest import gateway_settings
from support import ServerThread, await_receipt, exact_offer
from tollway.app import create_app
from tollway.client.payer import sign_exact
from tollway.payments.x402 import b64json, unb64json

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "replicated"}], "max_tokens": 4}


async def test_replicas_on_postgres_serve_a_payment_once_and_settle_all(
    devnet, upstream, chain, postgres_url, tmp_path
):
    settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path / "unused.sqlite3")
    settings = settings.model_copy(update={"database_url": postgres_url})
    with ServerThread(create_app(settings)) as a, ServerThread(create_app(settings)) as b:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{a.url}/v1/chat/completions", json=BODY)
            offer = exact_offer(unb64json(r.headers["PAYMENT-REQUIRED"]))

            def header(account) -> dict[str, str]:
                doc = {"x402Version": 2, "accepted": offer, "payload": sign_exact(account, offer, int(time.time()))}
                return {"PAYMENT-SIGNATURE": b64json(doc)}

            # One payment fired at both replicas at once: served exactly once.
            payer = chain.fund()
            h = header(payer)
            replies = await asyncio.gather(
                *[http.post(f"{url}/v1/chat/completions", json=BODY, headers=h) for url in [a.url, b.url] * 8]
            )
            assert sorted(r.status_code for r in replies) == [200] + [402] * 15

            # Distinct payments spread over both replicas: every settlement lands, nonces never clash.
            payers = [chain.fund() for _ in range(6)]
            before = chain.balance(devnet.payee)
            replies = await asyncio.gather(
                *[
                    http.post(f"{(a, b)[i % 2].url}/v1/chat/completions", json=BODY, headers=header(p))
                    for i, p in enumerate(payers)
                ]
            )
            assert [r.status_code for r in replies] == [200] * 6
            for i, r in enumerate(replies):
                await await_receipt((a, b)[i % 2].url, r.headers["x-tollway-receipt"])
            assert chain.balance(devnet.payee) == before + 6 * int(offer["amount"])
