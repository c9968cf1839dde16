"""Two gateway replicas sharing one PostgreSQL ledger and one settlement account."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from conftest import gateway_settings
from support import ServerThread, await_receipt, exact_offer
from tollway.app import create_app
from tollway.client.payer import sign_exact
from tollway.payments.x402 import b64json, unb64json

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "replicated"}], "max_tokens": 4}


def postgres_settings(devnet, upstream, postgres_url: str, tmp_path) -> Any:
    """Settings of replicas sharing one PostgreSQL ledger (and so one settlement account)."""
    settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path / "unused.sqlite3")
    return settings.model_copy(update={"database_url": postgres_url})


async def quoted(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """The exact offer of an unpaid call's 402."""
    r = await http.post(f"{url}/v1/chat/completions", json=BODY)
    return exact_offer(unb64json(r.headers["PAYMENT-REQUIRED"]))


async def test_replicas_on_postgres_serve_a_payment_once_and_settle_all(
    devnet, upstream, chain, postgres_url, tmp_path
):
    settings = postgres_settings(devnet, upstream, postgres_url, tmp_path)
    with ServerThread(create_app(settings)) as a, ServerThread(create_app(settings)) as b:
        async with httpx.AsyncClient(timeout=30) as http:
            offer = await quoted(http, a.url)

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
            served = next(i for i, r in enumerate(replies) if r.status_code == 200)
            await await_receipt((a, b)[served % 2].url, replies[served].headers["x-tollway-receipt"])  # (settled)

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


async def test_a_payer_spending_its_balance_several_times_at_once_across_replicas_is_served_at_most_once_per_coin(
    devnet, upstream, chain, postgres_url, tmp_path
):
    """Eight distinct authorizations from one payer whose balance covers three, fired at two
    replicas at once: each lock counts the payments locked before it (the payer's credit row
    serializes them on PostgreSQL), so no more than three are served, the upstream is asked for
    no other, and every one served is paid on chain."""
    settings = postgres_settings(devnet, upstream, postgres_url, tmp_path)
    with ServerThread(create_app(settings)) as a, ServerThread(create_app(settings)) as b:
        async with httpx.AsyncClient(timeout=30) as http:
            offer = await quoted(http, a.url)
            payer = chain.fund(amount=3 * int(offer["amount"]))
            headers = [
                {"PAYMENT-SIGNATURE": b64json({"x402Version": 2, "accepted": offer, "payload": p})}
                for p in [sign_exact(payer, offer, int(time.time())) for _ in range(8)]
            ]
            asked = (await http.get(f"{upstream.url}/mock/stats")).json()["requests"]
            before = chain.balance(devnet.payee)
            replies = await asyncio.gather(
                *[
                    http.post(f"{(a, b)[i % 2].url}/v1/chat/completions", json=BODY, headers=h)
                    for i, h in enumerate(headers)
                ]
            )
            served = [(a, b)[i % 2].url for i, r in enumerate(replies) if r.status_code == 200]
            assert 1 <= len(served) <= 3, [r.status_code for r in replies]
            assert all(r.status_code in (200, 402) for r in replies)
            assert (await http.get(f"{upstream.url}/mock/stats")).json()["requests"] == asked + len(served)
            for url, r in zip(served, [r for r in replies if r.status_code == 200], strict=True):
                await await_receipt(url, r.headers["x-tollway-receipt"])  # (until its payment is settled)
            assert chain.balance(devnet.payee) == before + len(served) * int(offer["amount"])


def test_one_sign_in_sent_to_both_replicas_at_once_pays_one_call(devnet, upstream, chain, postgres_url, tmp_path):
    """Credit spent twice at once: the same sign-in (wallet and nonce) fired at two replicas on one
    ledger is served, and charged, once."""
    from support import CHAT, chat_body, run_concurrently, wait_receipt
    from tollway import siwe
    from tollway.client import AllowedAsset, Payer, SyncPayingTransport

    settings = postgres_settings(devnet, upstream, postgres_url, tmp_path)
    with ServerThread(create_app(settings)) as a, ServerThread(create_app(settings)) as b:
        payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=a.url, timeout=30) as http:
            funded = http.post(CHAT, json=chat_body("fund my credit", max_tokens=4000))
        assert funded.status_code == 200
        wait_receipt(a.url, funded.headers["x-tollway-receipt"])  # (its surplus is credit, final)
        body = chat_body("one sign-in, two replicas", max_tokens=8)
        asked = httpx.post(a.url + CHAT, json=body, timeout=30)
        info = unb64json(asked.headers["PAYMENT-REQUIRED"])["extensions"]["sign-in-with-x"]["info"]
        header = {"SIGN-IN-WITH-X": b64json(siwe.sign(payer.account, info, f"eip155:{devnet.chain_id}"))}
        statuses: list[int] = []
        run_concurrently(
            lambda url: statuses.append(httpx.post(url + CHAT, json=body, headers=header, timeout=30).status_code),
            [a.url, b.url] * 4,
        )
        assert sorted(statuses) == [200] + [402] * 7


def test_a_replica_whose_database_sessions_are_dropped_serves_again(devnet, upstream, chain, postgres_url, tmp_path):
    """Its connections are opened anew; the call that finds one gone is a 503 with Retry-After (the
    ledger's every thread kept one connection for ever: each later call was a 500, until a restart)."""
    from support import CHAT, chat_body, drop_sessions, exact_payment, payment_header, payment_required

    settings = postgres_settings(devnet, upstream, postgres_url, tmp_path)
    with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:

        def paid_call(text: str) -> httpx.Response:
            body = chat_body(text)
            required = payment_required(http.post(CHAT, json=body))
            return http.post(CHAT, json=body, headers=payment_header(exact_payment(chain.fund(), required)))

        assert paid_call("before").status_code == 200
        assert drop_sessions(postgres_url) >= 1
        answers = [paid_call(f"after {i}") for i in range(3)]
    assert all(a.status_code in (200, 503) for a in answers), [a.text for a in answers]
    assert [a.status_code for a in answers][-2:] == [200, 200]
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
