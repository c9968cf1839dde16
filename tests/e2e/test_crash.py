"""kill -9 in the middle of an ``upto`` stream: the gateway that comes back meters the stream by
what it delivered (saved as it went) and settles that — never the payment's maximum — while the
payment is still valid."""

from __future__ import annotations

import os
import signal
import time

from x402.http.clients import x402HttpxClient

from conftest import anvil_process
from support import ADMIN_TOKEN, CHAT, Chain, free_port, receipt, serve_process, stop_process, upto_client
from tollway.devnet.deploy import Devnet


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
