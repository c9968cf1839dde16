"""kill -9 in the middle of an ``upto`` stream: the gateway that comes back meters the stream by
what it delivered (saved as it went) and settles that — never the payment's maximum — while the
payment is still valid. kill -9 in the middle of calls not streamed: nobody pays for them. kill -9
between a claim's broadcast and its receipt: no voucher lost, nothing claimed twice."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx
from sqlalchemy import text
from x402.http.clients import x402HttpxClient

from channel_support import Gateway, SdkPayer, escrow_channel, metered_total, payer_channel, wait_for
from conftest import anvil_process
from support import (
    ADMIN_TOKEN,
    CHAT,
    Chain,
    chat_body,
    credit,
    free_port,
    receipt,
    serve_process,
    stop_process,
    upto_client,
    wait_receipt,
)
from tollway import siwe
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.devnet.deploy import Devnet
from tollway.ledger import Store
from tollway.payments.x402 import b64json, unb64json


async def test_kill_9_mid_upto_stream_settles_what_was_delivered_not_the_maximum(xprocess, tmp_path):
    with anvil_process(xprocess, "crash") as rpc:
        args = ["--devnet", "--devnet-url", rpc, "--mock-port", str(free_port())]
        env = {"TOLLWAY_MAX_CALL_SECONDS": "8", "TOLLWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        proc, url = serve_process(tmp_path, args, env)
        devnet = Devnet.load(tmp_path / "var" / "devnet.json")
        chain = Chain(devnet)
        payer = chain.fund(permit2=True)
        client = upto_client(payer, devnet)
        body = {
            "model": "mock/echo",
            "stream": True,
            "messages": [{"role": "user", "content": "a long answer please"}],
            "mock": {"reply": "word " * 200, "chunk_delay": 0.1},
        }
        try:
            async with x402HttpxClient(client, timeout=30) as http, http.stream("POST", url + CHAT, json=body) as r:
                assert r.status_code == 200
                call_id = r.headers["x-tollway-receipt"]
                began = time.monotonic()
                async for _ in r.aiter_lines():
                    if time.monotonic() - began > 3:  # past the first progress save (every 2 s)
                        os.kill(proc.pid, signal.SIGKILL)
                        break
            proc.wait(timeout=10)
            assert chain.balance(payer.address) == 100_000_000  # nothing settled yet: it was to settle at the end
            proc, url = serve_process(tmp_path, args, env)
            deadline = time.monotonic() + 40  # the stream is left to its own process until max_call_seconds
            while (doc := receipt(url, call_id))["payment"]["state"] != "settled":
                assert time.monotonic() < deadline, doc
                time.sleep(0.5)
        finally:
            stop_process(proc)
        cost, maximum = int(doc["cost"]["atomic"]), int(doc["quote"]["atomic"])
        assert doc["status"] == "incomplete"
        assert 0 < cost < maximum // 10 and int(doc["payment"]["amount"]["atomic"]) == cost
        assert chain.balance(payer.address) == 100_000_000 - cost  # the debit is the estimate, not the maximum


def test_kill_9_mid_call_gives_back_what_its_calls_held_and_charges_nobody(xprocess, tmp_path):
    """Two calls not streamed are in flight — one its credit pays (its quote held from credit), one
    paid ``exact`` — when the gateway is killed. Their answers never left, so the gateway that
    comes back gives back the hold and releases the payment, and nothing moves on chain."""
    with anvil_process(xprocess, "crash-call") as rpc:
        args = ["--devnet", "--devnet-url", rpc, "--mock-port", str(free_port())]
        db = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        env = {"TOLLWAY_DATABASE_URL": db, "TOLLWAY_MAX_CALL_SECONDS": "10", "TOLLWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        proc, url = serve_process(tmp_path, args, env)
        devnet = Devnet.load(tmp_path / "var" / "devnet.json")
        chain = Chain(devnet)
        store = Store(db)
        allowed = [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)]
        payer = Payer(chain.fund(), allowed, schemes=("exact",))
        exact_payer = Payer(chain.fund(), allowed, schemes=("exact",))  # (no credit: it pays exact)
        hanging = {"mock": {"latency": 60}}  # the upstream answers after the gateway is gone
        try:
            with httpx.Client(transport=SyncPayingTransport(payer), base_url=url, timeout=30) as paying:
                funded = paying.post(CHAT, json=chat_body("fund my credit", max_tokens=4000))
                assert funded.status_code == 200
                wait_receipt(url, funded.headers["x-tollway-receipt"])
            credit_before, chain_before = credit(url, payer), chain.balance(exact_payer.account.address)

            body = chat_body("paid by credit", max_tokens=8) | hanging
            info = unb64json(httpx.post(url + CHAT, json=body).headers["PAYMENT-REQUIRED"])
            signed = siwe.sign(payer.account, info["extensions"]["sign-in-with-x"]["info"], f"eip155:{devnet.chain_id}")

            def by_credit() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(url + CHAT, json=body, headers={"SIGN-IN-WITH-X": b64json(signed)}, timeout=60)

            def by_exact() -> None:
                with (
                    contextlib.suppress(httpx.HTTPError),
                    httpx.Client(transport=SyncPayingTransport(exact_payer)) as http,
                ):
                    http.post(url + CHAT, json=chat_body("paid exact", max_tokens=8) | hanging, timeout=60)

            calls = [threading.Thread(target=f) for f in (by_credit, by_exact)]
            for t in calls:
                t.start()
            reserved = wait_for(lambda: len(rows := reserved_payments(store)) == 2 and rows, timeout=8)
            assert credit(url, payer) < credit_before  # the credit call's quote is held
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            for t in calls:
                t.join(timeout=30)

            # The next gateway gives back payments reserved longer ago than a call can run anywhere
            # (gateway.abandoned_payment_after: minutes); the ledger is aged by that much instead of waiting.
            with store.engine.begin() as c:
                c.execute(text("UPDATE payments SET updated_at = updated_at - 3600 WHERE state = 'reserved'"))
            proc, url = serve_process(tmp_path, args, env)
            wait_for(lambda: not reserved_payments(store), timeout=30)
            states = {scheme: store.payment(pid)["state"] for pid, scheme in reserved}
            assert states == {"credit": "settled", "exact": "released"}
            assert credit(url, payer) == credit_before
            assert chain.balance(exact_payer.account.address) == chain_before  # the exact payment never settled
        finally:
            store.close()
            stop_process(proc)


def reserved_payments(store: Store) -> list[tuple[str, str]]:
    with store.engine.connect() as c:
        return [(r[0], r[1]) for r in c.execute(text("SELECT id, scheme FROM payments WHERE state = 'reserved'"))]


def test_kill_9_between_a_claims_broadcast_and_its_receipt_loses_no_voucher_and_claims_nothing_twice(
    xprocess, tmp_path
):

    with anvil_process(xprocess, "crash-claim") as rpc:
        db = tmp_path / "ledger.sqlite3"
        args = ["--devnet", "--devnet-url", rpc, "--mock-port", str(free_port())]
        env = {
            "TOLLWAY_DATABASE_URL": f"sqlite:///{db}",
            "TOLLWAY_SCHEMES": '["batch-settlement"]',
            "TOLLWAY_CHANNELS__CLAIM_INTERVAL_SECONDS": "0.5",
            "TOLLWAY_CHANNELS__WATCH_SECONDS": "0.3",
            "TOLLWAY_CHANNELS__WITHDRAW_DELAY_SECONDS": "900",
        }
        proc, url = serve_process(tmp_path, args, env)
        devnet = Devnet.load(tmp_path / "var" / "devnet.json")
        chain = Chain(devnet)
        store = Store(f"sqlite:///{db}")
        try:
            gateway = Gateway(url, store, devnet.payee)
            payer = SdkPayer(chain.fund(100_000_000), devnet)
            payee_before = chain.balance(devnet.payee)
            chain.w3.provider.make_request("evm_setAutomine", [False])  # the claim waits in the pool
            for i in range(5):
                if i == 0:  # (the deposit is mined before the first call is served)
                    chain.w3.provider.make_request("evm_setAutomine", [True])
                assert payer.call(gateway, chat_body(f"before the crash {i}", max_tokens=16)).status_code == 200
                chain.w3.provider.make_request("evm_setAutomine", [False])
            channel = payer_channel(gateway, payer.account.address)
            claiming = wait_for(lambda: store.channel(channel["id"])["claim_tx"])
            wait_for(lambda: store.transaction(claiming)["state"] == "sent")  # broadcast, not mined
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            chain.mine(1)  # the claim is mined while no gateway runs
            chain.w3.provider.make_request("evm_setAutomine", [True])

            proc, url = serve_process(tmp_path, args, env)
            gateway = Gateway(url, store, devnet.payee)
            charged = store.channel(channel["id"])["charged"]  # (the claim in flight may cover only part of it)
            wait_for(lambda: store.channel(channel["id"])["claimed"] == charged)
            assert escrow_channel(chain, channel["id"])[1] == charged
            # The calls after the restart are claimed too, and nothing twice.
            for i in range(3):
                assert payer.call(gateway, chat_body(f"after the crash {i}", max_tokens=16)).status_code == 200
            served, cost = metered_total(gateway, payer.account.address)
            assert served == 8
            wait_for(lambda: store.channel(channel["id"])["claimed"] == cost)
            assert escrow_channel(chain, channel["id"])[1] == cost
            wait_for(lambda: chain.balance(devnet.payee) == payee_before + cost)
        finally:
            store.close()
            stop_process(proc)
