"""kill -9 in the middle of an ``upto`` stream: the gateway that comes back meters the stream by
what it delivered (saved as it went) and settles that — never the payment's maximum — while the
payment is still valid."""

from __future__ import annotations

import os
import signal
import time

from x402.http.clients import x402HttpxClient

from channel_support import Gateway, SdkPayer, escrow_channel, metered_total, payer_channel, wait_for
from conftest import anvil_process
from support import ADMIN_TOKEN, CHAT, Chain, chat_body, free_port, receipt, serve_process, stop_process, upto_client
from tollway.devnet.deploy import Devnet
from tollway.ledger import Store


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
