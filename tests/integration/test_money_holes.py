"""The money holes of the paid path, one test each (finding numbers of the review in brackets):
no free call, no upstream spend for a call nobody pays, the quote bounds the call, the ledger
never breaks on a debt, and nothing private or unbounded leaks out.

Every test works against the real pipeline: anvil, the ledger, and the mock upstream, whose
request counter shows what the gateway asked of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from decimal import Decimal
from fractions import Fraction
from typing import Any

import aiohttp
import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from test_upto import sign_upto

from support import (
    ADMIN,
    CALLS,
    CHAT,
    EXPIRED,
    INSUFFICIENT_FUNDS,
    NONCE_USED,
    RpcSwitch,
    ServerThread,
    authorize,
    chat_body,
    dedicated_gateway,
    envelope,
    error_code,
    eventually,
    exact_payment,
    manual_mining,
    paying_upstream,
    payment_header,
    payment_required,
    payment_rows,
    receipt,
    send_raw,
    then_the_mock,
    wait_receipt,
    with_own_settler,
)
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, PaymentRefused, SyncPayingTransport
from tollway.client.payer import sign_credit, sign_exact
from tollway.config import ModelPrice, UpstreamSettings
from tollway.gateway import Gateway
from tollway.ledger import Store
from tollway.ledger.store import credit_account
from tollway.payments.x402 import b64json, unb64json
from tollway.pricing import to_atomic

GWEI = 10**9


# -- helpers --------------------------------------------------------------------------------------------


@pytest.fixture
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def asked(upstream) -> int:
    """How many chat requests the mock upstream has been sent so far."""
    return int(httpx.get(f"{upstream.url}/mock/stats").json()["requests"])


def quote(http: httpx.Client, body: dict[str, Any], scheme: str = "exact") -> tuple[dict, dict]:
    required = payment_required(http.post(CHAT, json=body))
    return required, next(o for o in required["accepts"] if o["scheme"] == scheme)


def pay(http: httpx.Client, body: dict, required: dict, offer: dict, payload: dict) -> httpx.Response:
    return http.post(CHAT, json=body, headers=payment_header(envelope(required, offer, payload)))


def wallet(account: Any, devnet) -> Payer:
    return Payer(account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], max_per_call_usd=Decimal(5))


def paying(gateway_url: str, payer: Payer) -> httpx.Client:
    return httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway_url, timeout=60)


def mined(chain, tx_hash: str) -> Any:
    return chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30, poll_latency=0.01)


def token_call(chain, fn: str, *args: Any) -> str:
    return chain.token.encode_abi(fn, args=list(args))


# -- 1. free calls through reverted settlements ---------------------------------------------------------


def test_an_authorization_that_cannot_outlive_the_call_is_refused_before_the_upstream(gateway, chain, http, upstream):
    """[1] validBefore = now + 8: the settlement of a long call would be mined after it expired."""
    payer = chain.fund()
    body = chat_body("answer at length", max_tokens=50)
    required, offer = quote(http, body)
    least = gateway.settings.min_validity_seconds
    assert offer["maxTimeoutSeconds"] > least  # what the official clients sign for is long enough
    before = asked(upstream)
    r = pay(http, body, required, offer, authorize(payer, offer, validBefore=int(time.time()) + 8))
    assert r.status_code == 402 and error_code(r) == EXPIRED
    assert f"now + {least}" in unb64json(r.headers["PAYMENT-REQUIRED"])["error"]  # it states the minimum
    assert asked(upstream) == before


def test_a_cancelled_authorization_is_refused_before_the_upstream(gateway, chain, devnet, http, upstream):
    """[1][2] The payer cancels the authorization on chain after signing it."""
    payer = chain.fund()
    body = chat_body("cancelled", max_tokens=8)
    required, offer = quote(http, body)
    payload = authorize(payer, offer)
    nonce = payload["authorization"]["nonce"]
    cancel = encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "CancelAuthorization": [
                    {"name": "authorizer", "type": "address"},
                    {"name": "nonce", "type": "bytes32"},
                ],
            },
            "primaryType": "CancelAuthorization",
            "domain": {
                "name": "USD Coin",
                "version": "2",
                "chainId": devnet.chain_id,
                "verifyingContract": devnet.token,
            },
            "message": {"authorizer": payer.address, "nonce": bytes.fromhex(nonce[2:])},
        }
    )
    sig = payer.sign_message(cancel)
    data = token_call(
        chain,
        "cancelAuthorization",
        payer.address,
        bytes.fromhex(nonce[2:]),
        sig.v,
        sig.r.to_bytes(32, "big"),
        sig.s.to_bytes(32, "big"),
    )
    mined(
        chain,
        send_raw(
            chain,
            chain.owner,
            {"to": devnet.token, "data": data, "gas": 100_000, "maxFeePerGas": 50 * GWEI, "maxPriorityFeePerGas": GWEI},
        ),
    )
    before = asked(upstream)
    r = pay(http, body, required, offer, payload)
    assert r.status_code == 402 and error_code(r) == NONCE_USED
    assert asked(upstream) == before
    assert [p["state"] for p in payment_rows(gateway.store.engine, payer.address)] == ["refused"]


def test_a_frozen_payer_is_refused_before_the_upstream(gateway, chain, devnet, http, upstream):
    """[1] A blacklisted holder: every transfer of theirs reverts."""
    payer = chain.fund()
    data = token_call(chain, "blacklist", payer.address)
    mined(
        chain,
        send_raw(
            chain,
            chain.owner,
            {"to": devnet.token, "data": data, "gas": 100_000, "maxFeePerGas": 50 * GWEI, "maxPriorityFeePerGas": GWEI},
        ),
    )
    body = chat_body("frozen", max_tokens=8)
    required, offer = quote(http, body)
    before = asked(upstream)
    r = pay(http, body, required, offer, authorize(payer, offer))
    assert r.status_code == 402 and error_code(r) == "payer_blacklisted"
    assert asked(upstream) == before


def test_funds_moved_while_a_long_call_runs_release_no_answer(gateway, chain, devnet, http):
    """[1] The payer moves its money away while a non-streamed call generates: the answer is
    not released (the settlement would revert)."""
    payer = chain.fund(eth=True)
    funded = chain.balance(payer.address)
    payee_before = chain.balance(devnet.payee)
    body = chat_body("a slow answer", max_tokens=8, mock={"latency": 1.5})
    required, offer = quote(http, body)
    result: dict[str, httpx.Response] = {}
    doc = envelope(required, offer, authorize(payer, offer))
    thread = threading.Thread(target=lambda: result.update(r=http.post(CHAT, json=body, headers=payment_header(doc))))
    thread.start()
    time.sleep(0.5)
    chain.transfer(payer, Account.create().address, funded)  # mined while the upstream works
    thread.join()
    r = result["r"]
    assert r.status_code == 402 and error_code(r) == INSUFFICIENT_FUNDS, r.text
    assert "PAYMENT-RESPONSE" not in r.headers and "choices" not in r.json() and "echo:" not in r.text  # no answer
    assert [p["state"] for p in payment_rows(gateway.store.engine, payer.address)] == ["refused"]
    assert chain.balance(devnet.payee) == payee_before


async def stall_then_fail(request):
    await asyncio.sleep(1.5)
    return Response(b'{"error":{"message":"overloaded"}}', status_code=503, media_type="application/json")


@pytest.mark.parametrize("scheme", ["exact", "upto"])
def test_funds_moved_while_a_call_fails_over_release_no_answer(gateway, chain, devnet, tmp_path, scheme):
    """[1] As above, but the long part of the call is a first upstream that stalls and fails, and
    a second answers at once: the call ran long all the same. Only the last attempt's time was
    counted, and the answer went out unpaid (its settlement failed). (Adversarial review.)"""
    payer = chain.fund(permit2=True)
    funded = chain.balance(payer.address)
    with ServerThread(Starlette(routes=[Route("/chat/completions", stall_then_fail, methods=["POST"])])) as slow:
        upstreams = then_the_mock(gateway, UpstreamSettings(name="stalling", url=slow.url))
        with (
            dedicated_gateway(gateway, chain, tmp_path, upstreams=upstreams) as (url, engine),
            httpx.Client(base_url=url, timeout=30) as http,
        ):
            body = chat_body("a call that fails over", max_tokens=8)
            required, offer = quote(http, body, scheme)
            payload = sign_upto(payer, offer, devnet.chain_id) if scheme == "upto" else authorize(payer, offer)
            result: dict[str, httpx.Response] = {}
            call = threading.Thread(target=lambda: result.update(r=pay(http, body, required, offer, payload)))
            call.start()
            time.sleep(0.6)
            chain.transfer(payer, Account.create().address, funded)  # mined while the first upstream stalls
            call.join()
            states = [p["state"] for p in payment_rows(engine, payer.address)]
    r = result["r"]
    assert r.status_code == 402 and error_code(r) == INSUFFICIENT_FUNDS, r.text
    assert states == ["refused"]


def test_funds_moved_before_a_slow_upto_stream_starts_do_not_get_it_served(gateway, chain, devnet, http):
    """[1] An upto stream was checked on chain again every stream_recheck_seconds from its relay's
    start: a stream whose upstream was slow to its first byte (a reasoning model), then quick, was
    served whole and unpaid by a payer who moved the money away meanwhile. A stream that took
    longer than that to start is checked before its first byte. (Adversarial review.)"""
    payer = chain.fund(permit2=True)
    funded = chain.balance(payer.address)
    body = chat_body("a slow start, then a quick stream", max_tokens=16, stream=True, mock={"latency": 2.5})
    required, offer = quote(http, body, "upto")
    doc = envelope(required, offer, sign_upto(payer, offer, devnet.chain_id))
    mover = threading.Timer(0.6, lambda: chain.transfer(payer, Account.create().address, funded))
    mover.start()
    r = http.post(CHAT, json=body, headers=payment_header(doc))
    mover.join()
    assert chain.balance(payer.address) == 0  # (moved while the upstream had not answered)
    assert r.status_code == 402 and error_code(r) == INSUFFICIENT_FUNDS, r.text
    assert [p["state"] for p in payment_rows(gateway.store.engine, payer.address)] == ["refused"]


@pytest.mark.parametrize("scheme", ["exact", "upto"])
def test_a_slow_starting_stream_is_served_through_a_chain_rpc_outage(gateway, chain, devnet, tmp_path, scheme):
    """The check before a slow stream's first byte is no refusal when the chain's RPC is out: the
    stream is served on, as its later checks serve it on (an outage is not the payer's doing) —
    it was a 503, the upstream's work thrown away. (Review of the fix above.)"""
    payer = chain.fund(permit2=True)
    rpc = RpcSwitch(devnet.rpc_url)
    body = chat_body(f"a slow start during an outage ({scheme})", max_tokens=16, stream=True, mock={"latency": 2.5})
    with (
        ServerThread(rpc.app()) as proxy,
        dedicated_gateway(gateway, chain, tmp_path, rpc_url=proxy.url) as (url, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        required, offer = quote(http, body, scheme)
        payload = sign_upto(payer, offer, devnet.chain_id) if scheme == "upto" else authorize(payer, offer)
        outage = threading.Timer(1.5, lambda: setattr(rpc, "mode", "http-502"))
        back = threading.Timer(3.5, lambda: setattr(rpc, "mode", "up"))
        outage.start()
        back.start()
        try:
            r = pay(http, body, required, offer, payload)
        finally:
            outage.cancel()
            back.join()
    assert r.status_code == 200 and "data: [DONE]" in r.text, r.text[:300]


def test_a_stream_whose_settlement_fails_is_cut_and_its_wallet_pays_the_debt(gateway, chain, devnet, http):
    """[1][4] The stream's settlement reverts (the payer moved its money out first): the stream is
    cut with an error event; the wallet owes what it was served and must pay it off before it is
    served again; metering never breaks on the negative balance."""
    payer = chain.fund(eth=True)
    words = " ".join(f"w{i}" for i in range(40))
    body = chat_body(words, model="mock/echo-large", max_tokens=60, stream=True, mock={"chunk_delay": 0.1})
    required, offer = quote(http, body)
    doc = envelope(required, offer, sign_exact(payer, offer, int(time.time())))
    with manual_mining(chain), http.stream("POST", CHAT, json=body, headers=payment_header(doc)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        rows = payment_rows(gateway.store.engine, payer.address)
        eventually(lambda: gateway.store.transaction(rows[0]["tx_id"])["state"] == "sent", what="broadcast")
        # The payer's own transfer, with a higher tip, is mined before the settlement.
        everything = token_call(chain, "transfer", Account.create().address, chain.balance(payer.address))
        send_raw(
            chain,
            payer,
            {
                "to": devnet.token,
                "data": everything,
                "gas": 100_000,
                "maxFeePerGas": 50 * GWEI,
                "maxPriorityFeePerGas": 10 * GWEI,
            },
        )
        chain.mine(1)
        rest = list(lines)
    events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "error" and "payment failed" in events[-1]["error"]["message"]
    assert "data: [DONE]" in rest
    content = "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e.get("choices"))
    assert len(content) < len(words)  # cut, not finished
    receipt_id = r.headers["x-tollway-receipt"]
    doc = wait_receipt(gateway.url, receipt_id, state="failed")
    assert doc["status"] == "incomplete"
    account = credit_account(f"eip155:{devnet.chain_id}", devnet.token, payer.address)
    debt = -gateway.store.credit_balance(account)
    assert debt == int(doc["cost"]["atomic"]) > 0  # it owes what it was served

    # The wallet is funded again and pays a call: refused until it pays the debt as well.
    chain.w3.provider.make_request("anvil_setBalance", [payer.address, hex(10**18)])
    mint = token_call(chain, "mint", payer.address, 10**8)
    mined(
        chain,
        send_raw(
            chain,
            chain.owner,
            {"to": devnet.token, "data": mint, "gas": 100_000, "maxFeePerGas": 50 * GWEI, "maxPriorityFeePerGas": GWEI},
        ),
    )
    body = chat_body("after the debt", max_tokens=8)
    required, offer = quote(http, body)
    r = pay(http, body, required, offer, sign_exact(payer, offer, int(time.time())))
    assert r.status_code == 402 and error_code(r) == "debt_outstanding"
    required = unb64json(r.headers["PAYMENT-REQUIRED"])
    offer = next(o for o in required["accepts"] if o["scheme"] == "exact")
    assert int(offer["extra"]["debt"]) == debt and int(offer["amount"]) >= debt
    r = pay(http, body, required, offer, sign_exact(payer, offer, int(time.time())))
    assert r.status_code == 200, r.text
    wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert gateway.store.credit_balance(account) >= 0


def test_a_token_whose_domain_is_not_the_configured_one_stops_the_gateway(gateway, tmp_path):
    """[1] A wrong EIP-712 name would make every settlement revert while verification passes."""
    settings = gateway.settings.model_copy(
        update={
            "database_url": f"sqlite:///{tmp_path / 'l.sqlite3'}",
            "chain": gateway.settings.chain.model_copy(update={"token_name": "USDC"}),
        }
    )
    with pytest.raises(ValueError, match="EIP-712 domain"):
        asyncio.run(Gateway.open(settings))


# -- 2. the gateway pays the upstream for calls nobody pays ---------------------------------------------


def test_a_payer_whose_balance_covers_its_payments_exactly_is_served_while_they_wait_for_a_block(
    gateway, chain, devnet, http
):
    """[1] What a payer owes is its mined balance less its payments not mined yet (the ledger's):
    settlements waiting in the mempool are not counted twice, so a balance that covers every
    payment exactly pays them all — and one more payment is refused."""
    body = chat_body("exactly enough", max_tokens=8)
    required, offer = quote(http, body)
    payer = chain.fund(amount=2 * int(offer["amount"]))
    with manual_mining(chain):
        for waiting in (1, 2):
            r = pay(http, body, required, offer, authorize(payer, offer))
            assert r.status_code == 200, r.text[:300]
            deadline = time.monotonic() + 10
            while int(chain.w3.provider.make_request("txpool_status", [])["result"]["pending"], 16) < waiting:
                assert time.monotonic() < deadline, "the settlement was not broadcast"
                time.sleep(0.02)
        r = pay(http, body, required, offer, authorize(payer, offer))
        assert r.status_code == 402 and error_code(r) == "insufficient_funds"
    deadline = time.monotonic() + 30
    while chain.balance(payer.address) != 0:
        assert time.monotonic() < deadline, "the two settlements were not mined"
        time.sleep(0.1)


def test_a_payer_without_funds_costs_no_upstream_call(gateway, http, upstream):
    """[2] One signature from a zero-balance key, sent five times: no upstream request at all."""
    pauper = Account.create()
    body = chat_body("five times for free?", max_tokens=8)
    required, offer = quote(http, body)
    doc = envelope(required, offer, authorize(pauper, offer))
    before = asked(upstream)
    codes = [error_code(http.post(CHAT, json=body, headers=payment_header(doc))) for _ in range(5)]
    assert codes == [INSUFFICIENT_FUNDS] + [NONCE_USED] * 4  # checked on chain once, then by the lock
    assert asked(upstream) == before


# -- 3. the quote bounds what is forwarded ---------------------------------------------------------------


def test_every_output_cap_reaches_the_upstream_lowered_to_the_priced_one(gateway, chain, devnet):
    """[3] max_tokens 1 with max_completion_tokens 100,000: priced for one token, so one token."""
    payer = wallet(chain.fund(), devnet)
    body = chat_body("one two three four five six seven", max_tokens=1, max_completion_tokens=100_000)
    with paying(gateway.url, payer) as client:
        r = client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo"
    assert receipt(gateway.url, r.headers["x-tollway-receipt"])["usage"]["completion_tokens"] == 1


def test_usage_over_the_quote_is_capped_logged_and_counted(gateway, chain, devnet, caplog):
    """[3] An upstream that reports a hundred times its usage: the payer pays the quote at most;
    the operator sees a stable log event and a counter."""
    payer = wallet(chain.fund(), devnet)
    events_before = httpx.get(f"{gateway.url}/healthz", headers=ADMIN).json()["events"].get("cost_over_quote", 0)
    with caplog.at_level(logging.WARNING, logger="tollway.pipeline"), paying(gateway.url, payer) as client:
        r = client.post(CHAT, json=chat_body("over-report", max_tokens=8, mock={"usage_factor": 100}))
    assert r.status_code == 200, r.text
    doc = receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert int(doc["cost"]["atomic"]) == int(doc["quote"]["atomic"])
    assert any(rec.message.startswith("cost_over_quote") for rec in caplog.records)
    events = httpx.get(f"{gateway.url}/healthz", headers=ADMIN).json()["events"]
    assert events["cost_over_quote"] == events_before + 1


def test_duplicate_keys_never_reach_the_upstream(gateway, http, upstream):
    """[17] The price is computed from one parse; the upstream may read another."""
    before = asked(upstream)
    raw = b'{"model":"mock/echo","messages":[{"role":"user","content":"x"}],"max_tokens":1,"max_tokens":9999}'
    r = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_key"
    assert asked(upstream) == before


# -- 4. a negative balance never breaks metering or start-up ------------------------------------------------


def test_start_up_meters_an_abandoned_stream_of_a_wallet_in_debt(gateway, tmp_path):
    """[4] A crashed process left a stream open for a wallet that has since gone into debt: the
    next start meters it instead of failing."""
    settings = gateway.settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'l.sqlite3'}"})
    store = Store(settings.database_url)
    payer = "0x" + uuid.uuid4().hex[:40]
    row = {
        "lock_key": uuid.uuid4().hex,
        "scheme": "exact",
        "network": "eip155:31337",
        "asset": settings.chain.token.lower(),
        "payer": payer,
        "payee": "0xp",
        "amount": 100,
        "proof": "{}",
        "request_digest": "d",
    }
    payment_id = store.reserve(row)
    assert store.mark_prepaid(payment_id)  # its money moved as the stream began (as an exact payment's does)
    account = credit_account("eip155:31337", settings.chain.token, payer)
    store.settle_call_credit(account, deposit=0, held=0, cost=500, call_id="earlier", payment_id=None)
    assert store.credit_balance(account) == -500
    store.insert_call(
        {
            "id": "lost",
            "payment_id": payment_id,
            "model": "mock/echo",
            "upstream_model": "mock/echo",
            "stream": True,
            "status": "streaming",
            "quote": 100,
            "paid": 100,
            "from_credit": 0,
            "created_at": time.time() - 7200,
        }
    )
    with ServerThread(create_app(settings)):
        pass
    assert store.credit_balance(account) == -500  # deposit 100, charged its quote of 100
    assert receipt_row(store, "lost")["status"] == "incomplete"
    store.close()


class AheadClock:
    """The ``time`` module as a replica whose clock runs ``skew`` seconds ahead sees it."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.skew


@pytest.mark.parametrize(
    "mock",
    [
        {"chunk_delay": 0.25},  # ~15 s of events, its limit 20 s
        {"pause": 13},  # a model thinking after its first token: no event for 13 s, sweeps every 2 s
    ],
    ids=["moving", "paused"],
)
def test_a_live_stream_is_not_swept_as_abandoned_by_a_replica_whose_clock_is_ahead(
    gateway, chain, tmp_path, monkeypatch, mock
):
    """Within the skew allowed between replicas (``CLOCK_SKEW_SECONDS``), a stream another replica
    is serving looks past its limit: while its events move, or its process says it is alive, it is
    left alone (it was metered by the crash estimate, its usage dropped as "already metered", and
    charged its whole quote)."""
    import tollway.gateway as gateway_module
    from tollway.config import CLOCK_SKEW_SECONDS

    monkeypatch.setattr(gateway_module, "time", AheadClock(CLOCK_SKEW_SECONDS - 10))  # (the sweeps' clock)
    if "pause" in mock:  # (sweeps that would find it twice as they left it, were it not said alive)
        monkeypatch.setattr(gateway_module, "HOUSEKEEPING_SECONDS", 2)
        monkeypatch.setattr(gateway_module, "ALIVE_SECONDS", 0.5)
    words = " ".join(f"w{i}" for i in range(200))
    body = chat_body(words, stream=True, max_tokens=60, mock=mock)
    with dedicated_gateway(gateway, chain, tmp_path, max_call_seconds=20) as (url, engine):
        with httpx.Client(base_url=url, timeout=60) as http:
            headers = payment_header(exact_payment(chain.fund(), payment_required(http.post(CHAT, json=body))))
            with http.stream("POST", CHAT, json=body, headers=headers) as r:
                assert r.status_code == 200
                text = "".join(r.iter_text())
        with engine.connect() as c:
            row = c.execute(select(CALLS).where(CALLS.c.id == r.headers["x-tollway-receipt"])).mappings().one()
    assert "[DONE]" in text and (row["status"], row["error"]) == ("served", None), dict(row)


def receipt_row(store: Store, call_id: str) -> dict[str, Any]:
    row = store.receipt(call_id)
    assert row is not None
    return row


# -- 7. streams without usage ----------------------------------------------------------------------------------


def test_a_stream_without_usage_is_charged_by_the_documented_rule(gateway, chain, devnet):
    """[7] No usage chunk: the prompt at its bound and each relayed event at the model's most
    tokens per event, never more than the quote."""
    payer = wallet(chain.fund(), devnet)
    body = chat_body("one two three", max_tokens=500, stream=True, mock={"omit_usage": True})
    with paying(gateway.url, payer) as client, client.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        relayed = [line for line in r.iter_lines() if line.startswith("data:")]
    doc = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    per_event = gateway.settings.models["mock/echo"].max_tokens_per_event
    usage = doc["usage"]
    assert usage["dialect"] == "estimated"
    assert usage["completion_tokens"] == per_event * len(relayed)  # content events, the final one, [DONE]
    prices = gateway.settings.models["mock/echo"]
    usd = usage["prompt_tokens"] * Fraction(prices.prompt) + usage["completion_tokens"] * Fraction(prices.completion)
    assert int(doc["cost"]["atomic"]) == min(to_atomic(usd, 6), int(doc["quote"]["atomic"]))


def left_open(gw: Gateway, call_id: str, scheme: str = "credit", **call: Any) -> None:
    """A stream of mock/echo a crash left open long ago, paid by ``scheme`` (its payment reserved)."""
    payment_id = gw.store.reserve(
        {
            "lock_key": uuid.uuid4().hex,
            "scheme": scheme,
            "network": "eip155:31337",
            "asset": gw.settings.chain.token.lower(),
            "payer": "0x" + uuid.uuid4().hex[:40],
            "payee": "0xp",
            "amount": 0,
            "proof": "{}",
            "request_digest": "d",
        }
    )
    stream = {"model": "mock/echo", "upstream_model": "mock/echo", "stream": True, "status": "streaming"}
    gw.store.insert_call({"id": call_id, "payment_id": payment_id, **stream, "created_at": 0, **call})


async def test_a_stream_waiting_for_its_usage_after_the_fact_is_not_swept_as_abandoned(gateway, tmp_path):
    """A stream that carried no usage waits for its upstream's record (up to a quarter of the settlement
    margin past the call's limit): the sweeps of streams a crash left open, which meter by the
    estimate, must leave it alone until then — every replica's (it is marked in the ledger: another
    replica's sweep metered it by its estimate while its own process waited for the real figure)."""
    settings = gateway.settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'l.sqlite3'}"})
    gw = await Gateway.open(settings)
    try:
        past_the_limit = time.time() - settings.max_call_seconds - 10  # (a stream: swept by now)
        for call_id, began in (
            ("waiting", past_the_limit),
            ("waited", past_the_limit - settings.settle_margin_seconds),
        ):
            left_open(gw, call_id, quote=100, paid=0, from_credit=100, created_at=began)
            gw.store.metering_later(call_id, 0)  # (by any replica)
        gw.close_abandoned_streams()
        assert receipt_row(gw.store, "waiting")["status"] == "metering"  # (its usage is still coming)
        assert receipt_row(gw.store, "waited")["status"] == "incomplete"  # (its wait is over: it never came)
    finally:
        await gw.close()


async def test_a_byok_stream_a_crash_left_open_is_metered_at_the_byok_fee_not_the_list_price(gateway, tmp_path):
    """A call with the payer's own provider key is quoted at the BYOK fee's prices: the sweep of
    streams a crash left open meters it at those too (it charged its whole quote, at list prices)."""
    from tollway.pricing import Usage

    settings = gateway.settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'l.sqlite3'}"})
    gw = await Gateway.open(settings)
    try:
        per_event = settings.models["mock/echo"].max_tokens_per_event
        delivered = Usage(200, 3 * per_event, dialect="estimated")
        at_fee, listed = gw.byok_prices["mock/echo"].cost(delivered), gw.prices["mock/echo"].cost(delivered)
        assert 0 < at_fee < listed
        quote = listed  # (above what either would meter)
        for call_id, byok in (("byok", True), ("own-key-less", False)):
            left_open(gw, call_id, quote=quote, paid=0, from_credit=quote, prompt_bound=200, events=3, byok=byok)
        gw.close_abandoned_streams()
        assert receipt_row(gw.store, "byok")["cost"] == at_fee
        assert receipt_row(gw.store, "own-key-less")["cost"] == listed
    finally:
        await gw.close()


async def test_a_free_stream_a_crash_left_open_is_metered_and_one_of_a_scheme_not_enabled_is_left_alone(
    gateway, tmp_path, caplog
):
    """The free tier's scheme is no payment scheme of the gateway's: its open streams raised on
    every pass of the sweep, never metered; so did one whose scheme is no longer enabled (logged
    now, once, and left for a process that has it)."""
    settings = gateway.settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'l.sqlite3'}"})
    gw = await Gateway.open(settings)
    try:
        left_open(gw, "free", scheme="free", quote=0, paid=0, from_credit=0, prompt_bound=20, events=2)
        left_open(gw, "gone", scheme="no-longer-enabled", quote=100, paid=0, from_credit=0)
        with caplog.at_level(logging.ERROR, logger="tollway"):
            gw.close_abandoned_streams()
            gw.close_abandoned_streams()
        assert receipt_row(gw.store, "free")["status"] == "incomplete" and receipt_row(gw.store, "free")["cost"] == 0
        assert receipt_row(gw.store, "gone")["status"] == "streaming"
        assert [r.getMessage() for r in caplog.records] == [
            "the stream gone a crash left open was paid by no-longer-enabled, not enabled here"
        ]
    finally:
        await gw.close()


def test_a_stream_without_usage_is_metered_from_the_upstreams_record_when_it_keeps_one(
    gateway, chain, devnet, tmp_path, upstream
):
    """[7] An OpenRouter upstream keeps each generation's usage (``/generation?id=``): a stream
    that carried none is metered from it, after the fact, at its real cost."""
    from tollway.config import UpstreamSettings

    router_like = UpstreamSettings(name="openrouter-like", url=upstream.url + "/v1", usage_lookup="openrouter")
    payer = wallet(chain.fund(), devnet)
    body = chat_body("one two three", max_tokens=500, stream=True, mock={"omit_usage": True})
    with dedicated_gateway(gateway, chain, tmp_path, upstreams=[router_like]) as (url, _):
        with paying(url, payer) as client, client.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            summary = next(line for line in r.iter_lines() if line.startswith(": tollway "))
        assert json.loads(summary[len(": tollway ") :])["cost"] is None  # known only after the stream
        wait_receipt(url, r.headers["x-tollway-receipt"])
        eventually(lambda: receipt(url, r.headers["x-tollway-receipt"])["status"] not in ("streaming", "metering"))
        doc = receipt(url, r.headers["x-tollway-receipt"])
    usage = doc["usage"]
    assert usage["dialect"] == "openrouter-generation" and usage["completion_tokens"] == 5  # echo : one two three
    prices = gateway.settings.models["mock/echo"]
    usd = usage["prompt_tokens"] * Fraction(prices.prompt) + usage["completion_tokens"] * Fraction(prices.completion)
    cached = (usage["cached_tokens"] or 0) * (Fraction(prices.cache_read) - Fraction(prices.prompt))
    assert int(doc["cost"]["atomic"]) == to_atomic(usd + cached, 6)


def metered_by_its_record(gateway, chain, devnet, tmp_path, upstream, body: dict[str, Any]) -> dict[str, Any]:
    """A paid stream, read to its end, through an upstream that keeps OpenRouter's generation
    records (``usage_lookup``); its receipt once it is metered, with the gateway's health ``events``."""
    from tollway.config import UpstreamSettings

    router_like = UpstreamSettings(name="openrouter-like", url=upstream.url + "/v1", usage_lookup="openrouter")
    with dedicated_gateway(gateway, chain, tmp_path, upstreams=[router_like]) as (url, _):
        with paying(url, wallet(chain.fund(), devnet)) as client, client.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            r.read()
        wait_receipt(url, r.headers["x-tollway-receipt"])
        eventually(lambda: receipt(url, r.headers["x-tollway-receipt"])["status"] not in ("streaming", "metering"))
        events = httpx.get(f"{url}/healthz", headers=ADMIN).json()["events"]
        return {**receipt(url, r.headers["x-tollway-receipt"]), "events": events}


def test_an_upstream_bill_above_the_quote_is_capped_and_counted(gateway, chain, devnet, tmp_path, upstream):
    """The generation record's ``total_cost`` far above the quote: the payer pays the quote, and the
    operator is told (it was counted only when the tokens' cost was above it). (Adversarial review.)"""
    mock = {"omit_usage": True, "dialect": "openrouter", "cost_prices": {"prompt": 1.0, "completion": 1.0}}
    doc = metered_by_its_record(
        gateway, chain, devnet, tmp_path, upstream, chat_body("a fortune", max_tokens=50, stream=True, mock=mock)
    )
    billed = to_atomic(Fraction(doc["usage"]["upstream_cost_usd"]), 6)
    assert billed > int(doc["quote"]["atomic"]) == int(doc["cost"]["atomic"]), doc
    assert doc["events"].get("cost_over_quote") == 1, doc["events"]


def test_a_stream_metered_from_the_upstreams_record_is_charged_no_less_than_it_billed(
    gateway, chain, devnet, tmp_path, upstream
):
    """OpenRouter's generation record names no cache writes, which bill above the prompt price: a
    payer who hung up before the usage chunk was charged its prompt at the plain price (an Opus
    prompt written to the one-hour cache: half of what the upstream billed). The record's
    ``total_cost`` is what the call is charged at least, within the quote. (Adversarial review.)"""
    prices = gateway.settings.models["mock/echo"]
    dearer = {"prompt": float(prices.prompt) * 2, "completion": float(prices.completion)}  # (as its writes bill)
    mock = {"omit_usage": True, "dialect": "openrouter", "cost_prices": dearer}
    body = chat_body("one two three " * 50, max_tokens=500, stream=True, mock=mock)
    doc = metered_by_its_record(gateway, chain, devnet, tmp_path, upstream, body)
    usage = doc["usage"]
    assert usage["dialect"] == "openrouter-generation" and usage["upstream_cost_usd"] is not None, usage
    listed = usage["prompt_tokens"] * Fraction(prices.prompt) + usage["completion_tokens"] * Fraction(prices.completion)
    billed = to_atomic(Fraction(usage["upstream_cost_usd"]), 6)
    assert billed > to_atomic(listed, 6) and int(doc["cost"]["atomic"]) == billed


def test_attack_an_upstream_record_billing_a_fortune_charges_no_more_than_the_quote(
    gateway, chain, devnet, tmp_path, upstream
):
    """The floor of a generation record's ``total_cost`` is no way past the quote: a hostile (or
    wrong) record of a fortune charges the quote, and the payer is asked for nothing more."""
    mock = {"omit_usage": True, "dialect": "openrouter", "cost_prices": {"prompt": 1000.0, "completion": 1000.0}}
    body = chat_body("a fortune", max_tokens=50, stream=True, mock=mock)
    doc = metered_by_its_record(gateway, chain, devnet, tmp_path, upstream, body)
    assert doc["usage"]["dialect"] == "openrouter-generation"
    assert (
        int(doc["cost"]["atomic"])
        == int(doc["quote"]["atomic"])
        <= int(doc["paid"]["atomic"]) + int(doc["from_credit"]["atomic"])
    )


# -- 9. gas drain -----------------------------------------------------------------------------------------------


def test_exact_offers_cover_the_settlements_gas(gateway, chain, tmp_path):
    """[9] A settlement costs gas: with gas at 1 gwei and its token at $4,000, no exact payment
    below the gas of a settlement (70,000 gas → $0.28) is asked."""
    with (
        dedicated_gateway(
            gateway, chain, tmp_path, chain_settings={"native_usd": Decimal(4000), "fee_ceiling_gwei": Decimal(1)}
        ) as (url, _),
        httpx.Client(base_url=url) as client,
    ):
        _, offer = quote(client, chat_body("tiny", max_tokens=1))
    assert int(offer["amount"]) >= 280_000


# -- 10. cross-deployment replay ---------------------------------------------------------------------------------


def test_messages_signed_for_another_gateway_are_refused(gateway, chain, devnet, http):
    """[10] A hostile server collects CreditPayments and spends them at a real tollway."""
    payer = wallet(chain.fund(), devnet)
    with paying(gateway.url, payer) as client:  # leaves credit: the smallest payment exceeds the cost
        assert client.post(CHAT, json=chat_body("fund credit", max_tokens=8)).status_code == 200
    wait_receipt(gateway.url, payer.history[0].receipt_id)
    body = chat_body("spend credit", max_tokens=8)
    required = payment_required(http.post(CHAT, json=body, headers=payer.wallet_header(gateway.url)))
    offer = next(o for o in required["accepts"] if o["scheme"] == "credit")
    stolen = sign_credit(payer.account, offer, int(time.time()), "https://evil.example")
    r = pay(http, body, required, offer, stolen)
    assert r.status_code == 402 and error_code(r) == "wrong_origin"
    foreign = payer.wallet_header("https://evil.example")  # a wallet proof made for another gateway
    again = http.post(CHAT, json=body, headers=foreign)
    assert again.status_code == 400 and error_code(again) == "invalid_wallet_proof"
    # The client signs only for the origin it talks to, whatever the 402 it is handed says.
    with pytest.raises(PaymentRefused, match="not signing"):
        payer.prepare(
            {"PAYMENT-REQUIRED": b64json({**required, "resource": {"url": "https://real.example/v1/chat"}})},
            "https://evil.example",
        )


# -- 11. transfer claims ------------------------------------------------------------------------------------------


def test_confirmations_default_by_chain():
    """[11] 0 on the devnet; reorg-safe depths elsewhere."""
    from tollway.config import Settings, resolve_chain

    assert resolve_chain(Settings(), 31337).chain.confirmations == 0
    assert resolve_chain(Settings(), 8453).chain.confirmations == 10
    assert resolve_chain(Settings(), 1).chain.confirmations == 12
    assert resolve_chain(Settings(), 999_999).chain.confirmations == 12


def test_a_bogus_transfer_claim_costs_one_rpc_call(gateway, chain, devnet, tmp_path):
    """[11] A claim is free to sign; repeating a refused one must not cost the chain RPC again."""
    from support import RpcSwitch
    from tollway.client import claim_transfer

    rpc = RpcSwitch(devnet.rpc_url)
    with ServerThread(rpc.app()) as proxy, dedicated_gateway(gateway, chain, tmp_path, rpc_url=proxy.url) as (url, _):
        account = chain.fund(eth=True)
        elsewhere = chain.transfer(account, Account.create().address, 1000)  # pays someone else
        with httpx.Client(base_url=url, timeout=30) as client:
            body = {"model": "mock/echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}
            required, offer = quote(client, body, "transfer")
            rpc.calls.clear()
            for _ in range(5):
                r = pay(client, body, required, offer, claim_transfer(account, offer, elsewhere, url))
                assert error_code(r) == "transfer_mismatch"
    assert rpc.calls.count("eth_getTransactionReceipt") == 1


def test_attack_forged_sign_ins_cost_the_chain_one_round_trip_an_address_a_minute(gateway, chain, devnet, tmp_path):
    """[11] A sign-in not signed by its address is free to send, and finding out that the address is
    no contract wallet costs a chain round trip: sent again and again (to exhaust a rate-limited
    RPC, which every payment then needs), it costs one, not one each. Its code and its EIP-1271
    answer are asked in the same round trip."""
    from support import RpcSwitch
    from tollway import siwe
    from tollway.payments.x402 import b64json

    rpc = RpcSwitch(devnet.rpc_url)
    with ServerThread(rpc.app()) as proxy, dedicated_gateway(gateway, chain, tmp_path, rpc_url=proxy.url) as (url, _):
        victim = Account.create().address
        with httpx.Client(base_url=url, timeout=30) as client:
            rpc.calls.clear()
            for _ in range(5):
                asked = client.get("/v1/credit")
                info = asked.json()["extensions"]["sign-in-with-x"]["info"]
                forged = siwe.sign(Account.create(), info, f"eip155:{devnet.chain_id}") | {"address": victim}
                r = client.get("/v1/credit", headers={"SIGN-IN-WITH-X": b64json(forged)})
                assert r.status_code == 401 and error_code(r) == "invalid_siwx_signature", r.text
    assert rpc.calls.count("eth_getCode") == 1 and rpc.calls.count("eth_call") == 1, rpc.calls


# -- 12. the quote secret -----------------------------------------------------------------------------------------


def test_replicas_without_a_quote_secret_agree(gateway, chain, devnet, tmp_path):
    """[12] Two replicas sharing a ledger and no configured secret: a quote from one pays the other."""
    db = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    settings = gateway.settings.model_copy(update={"database_url": db, "quote_secret": None})
    payer = chain.fund()
    with ServerThread(create_app(settings)) as a, ServerThread(create_app(settings)) as b:
        body = chat_body("quoted by a, paid at b", max_tokens=8)
        with httpx.Client(base_url=a.url) as ca, httpx.Client(base_url=b.url) as cb:
            required, offer = quote(ca, body)
            r = pay(cb, body, required, offer, sign_exact(payer, offer, int(time.time())))
    assert r.status_code == 200, r.text


# -- 13. amounts beyond the ledger's integers ----------------------------------------------------------------------


def test_amounts_past_the_ledgers_integers_get_400(gateway, chain, devnet, http):
    """[13] 64-bit columns: an amount of 2**63 is refused with a 400, never a 500."""
    payer = wallet(chain.fund(), devnet)
    huge = payer.withdrawal(2**63, gateway.url)
    r = http.post("/v1/credit/withdrawals", json=huge)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_amount"
    body = chat_body("huge accepted amount", max_tokens=8)
    required, offer = quote(http, body)
    inflated = {**offer, "amount": str(2**64)}
    r = pay(http, body, required, inflated, authorize(payer.account, inflated))
    assert r.status_code == 400 and r.json()["error"]["code"] == "amount_too_large"


def test_an_asset_configuration_that_can_overflow_is_refused_at_start(gateway, tmp_path):
    """[13] 18 decimals, a 4 MB body and an expensive model: a quote could pass 2**63."""
    from tollway.doctor import amounts_fit
    from tollway.pricing import Prices

    settings = gateway.settings.model_copy(
        update={"models": {"big": ModelPrice(prompt=Decimal("0.0001"), completion=Decimal("0.0001"))}}
    )
    [failure] = amounts_fit(settings, {"big": Prices.of(settings.models["big"], 18)})
    assert failure.level == "fail" and "2**63" in failure.detail
    assert amounts_fit(settings, {"big": Prices.of(settings.models["big"], 6)}) == []


def test_an_asset_whose_decimals_leave_the_ledger_no_room_for_a_balance_is_refused_at_start(gateway):
    """[13] At 18 decimals the ledger's 64-bit integers hold 9.2 tokens: a wallet's credit or a
    channel's deposits could pass that (on PostgreSQL: an error in the middle of the money's moves)."""
    from tollway.doctor import required

    def findings(decimals: int) -> list[str]:
        chain = gateway.settings.chain.model_copy(update={"decimals": decimals})
        return [f.what for f in required(gateway.settings.model_copy(update={"chain": chain}))]

    assert "chain.decimals" in findings(18) and "chain.decimals" in findings(13)
    assert "chain.decimals" not in findings(12) and "chain.decimals" not in findings(6)


# -- 14. information exposure ------------------------------------------------------------------------------------


def test_private_details_need_the_admin_token_and_receipts_their_payer(gateway, chain, devnet, http, upstream):
    """[14] Health and stats in public are aggregates; payments, errors and upstreams are the
    operator's; a receipt shows its payer's wallet and credit, so only its payer reads it."""
    public = http.get("/healthz").json()
    assert set(public) == {"ok", "version"}
    private = http.get("/healthz", headers=ADMIN).json()
    assert {"payments", "settlement_error", "events", "networks"} <= set(private)
    assert all("upstream" not in row for row in http.get("/v1/stats/cache").json()["windows"]["24h"])

    payer = wallet(chain.fund(), devnet)
    with paying(gateway.url, payer) as client:
        r = client.post(CHAT, json=chat_body("whose receipt", max_tokens=8))
    receipt_id = r.headers["x-tollway-receipt"]
    assert http.get(f"/v1/receipts/{receipt_id}").status_code == 401
    stranger = wallet(Account.create(), devnet)
    assert http.get(f"/v1/receipts/{receipt_id}", headers=stranger.wallet_header(gateway.url)).status_code == 403
    mine = http.get(f"/v1/receipts/{receipt_id}", headers=payer.wallet_header(gateway.url))
    assert mine.status_code == 200 and mine.json()["payment"]["payer"] == payer.account.address.lower()

    failing = chat_body("fail", max_tokens=8, mock={"fail": 500})  # the mock explains its failure...
    required, offer = quote(http, failing)
    r = pay(http, failing, required, offer, authorize(payer.account, offer))
    assert r.status_code == 502 and "injected failure" not in r.text  # ...which stays in the operator's log


# -- 15. a chained upstream ---------------------------------------------------------------------------------------


def test_a_chained_upstream_is_never_paid_more_than_our_quote(gateway, chain, devnet, tmp_path, upstream):
    """[15] The upstream is another tollway, dearer than our own price: we refuse to pay it more
    than we were paid, and our payer is not charged."""
    dear = {m: p.model_copy(update={"completion": p.completion * 100}) for m, p in gateway.settings.models.items()}
    hop_wallet = chain.fund()
    with dedicated_gateway(gateway, chain, tmp_path, models=dear) as (inner, _):
        upstreams = [paying_upstream("inner", inner + "/v1", hop_wallet, devnet)]
        with dedicated_gateway(gateway, chain, tmp_path, upstreams=upstreams) as (outer, engine):
            payer = wallet(chain.fund(), devnet)
            with paying(outer, payer) as client:
                r = client.post(CHAT, json=chat_body("chained", max_tokens=200))
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_payment_refused"
            states = [p["state"] for p in payment_rows(engine, payer.account.address)]
            assert [s for s in states if s != "refused"] == ["released"]  # (upto refused: Permit2 not approved)
    assert chain.balance(hop_wallet.address) == 100_000_000


# -- 16. errors after the lock ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["hold", "insert_call", "finish_call"])
def test_an_internal_error_after_the_lock_leaves_no_payment_reserved_or_settling(
    gateway, chain, devnet, tmp_path, where
):
    """[16] A failing ledger write after the payment was locked: the payment is released (and
    nothing settles), never left reserved or settling."""
    settings = with_own_settler(gateway.settings).model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'l.sqlite3'}"}
    )
    app = create_app(settings)
    payer = wallet(chain.fund(), devnet)
    with ServerThread(app) as server:
        gw = app.state.gateway
        where = "_post" if where == "hold" else where  # (a hold is posted in the lock's transaction)
        real = getattr(gw.store, where)

        def broken(*args: Any, **kw: Any) -> Any:
            holding = where == "_post" and any(kind == "hold" for kind, _ in args[2])
            if holding or kw.get("settle") is not None:
                raise RuntimeError("disk full")
            return real(*args, **kw)

        setattr(gw.store, where, broken)
        body = chat_body("internal error", max_tokens=8, stream=where == "insert_call")
        if where == "_post":  # a wallet with credit, so that part of the quote is held
            setattr(gw.store, where, real)
            with paying(server.url, payer) as client:
                client.post(CHAT, json=chat_body("fund", max_tokens=8))
            wait_receipt(server.url, payer.history[0].receipt_id)
            setattr(gw.store, where, broken)
        with paying(server.url, payer) as client:
            r = client.post(CHAT, json=body)
        assert r.status_code == 500
        states = [p["state"] for p in payment_rows(gw.store.engine, payer.account.address)]
        assert "reserved" not in states and "settling" not in states, states
        if where != "_post":  # (the hold's failure rolls its reservation back with it)
            assert states[-1] == "released", states


# -- 18. unbounded upstream answers -------------------------------------------------------------------------------


def test_an_endless_upstream_error_body_is_not_read_to_its_end(gateway, chain, devnet, tmp_path):
    """[18] An upstream answers 500 with a body that never ends: the gateway reads a bounded
    part of it and answers."""
    closed = threading.Event()

    async def endless(request):
        async def body():
            try:
                while True:
                    yield b'{"error": "' + b"x" * 65536
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

        return StreamingResponse(body(), status_code=500, media_type="application/json")

    r = paid_through(gateway, chain, devnet, tmp_path, endless, chat_body("endless", max_tokens=8))
    assert r.status_code == 502 and len(r.content) < 2000
    assert closed.wait(5)


def paid_through(gateway, chain, devnet, tmp_path, answer: Any, body: dict[str, Any]) -> httpx.Response:
    """A paid chat call through a gateway of its own whose upstream answers with ``answer``."""
    app = Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])
    payer = wallet(chain.fund(), devnet)
    with (
        ServerThread(app) as upstream,
        dedicated_gateway(gateway, chain, tmp_path, upstream_url=upstream.url + "/v1") as (url, _),
        paying(url, payer) as client,
    ):
        return client.post(CHAT, json=body, timeout=20)


def test_an_upstream_content_type_that_is_no_header_value_here_is_not_a_500_after_the_charge(
    gateway, chain, devnet, tmp_path
):
    """[18] An answer whose Content-Type carries UTF-8 (no latin-1 header value) was charged, then
    answered 500: the payment spent, no answer. It goes back as JSON."""
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "mock/echo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }

    async def odd(request):
        from starlette.responses import Response

        r = Response(json.dumps(answer).encode(), media_type=None)
        r.raw_headers.append((b"content-type", "application/json; profile=€".encode()))
        return r

    r = paid_through(gateway, chain, devnet, tmp_path, odd, chat_body("an odd content type", max_tokens=8))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["choices"][0]["message"]["content"] == "hi"
    assert int(r.headers["x-tollway-cost"]) > 0


def test_an_answer_the_upstream_labels_html_goes_back_as_json_never_as_a_page(gateway, chain, devnet, tmp_path):
    """A hostile (or misconfigured) upstream's text/html went back as is: a page of the gateway's
    origin, with the script a model was made to write. (Adversarial review.) A body that is not
    JSON is no answer at all (``test_upstream_failures``)."""
    script = "<script>alert(document.domain)</script>"
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "mock/echo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": script}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }

    async def html(request):
        from starlette.responses import Response

        return Response(json.dumps(answer), media_type="text/html")

    r = paid_through(gateway, chain, devnet, tmp_path, html, chat_body("a page", max_tokens=8))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-content-type-options"] == "nosniff" and script in r.text


def test_deeply_nested_upstream_json_is_not_a_500(gateway, chain, devnet):
    """[18] A hostile upstream answers with JSON nested far deeper than a parser's stack: no answer
    it can read, so none served (502, nothing charged; it was served and charged its quote)."""
    payer = wallet(chain.fund(), devnet)
    with paying(gateway.url, payer) as client:
        r = client.post(CHAT, json=chat_body("deep", max_tokens=8, mock={"nest": 20_000}))
    assert r.status_code == 502 and error_code(r) == "upstream_error", r.text
    assert "x-tollway-receipt" not in r.headers


# -- 19. reflected input and header sizes ------------------------------------------------------------------------


def header_bytes(headers: Any) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.items())


def test_reflected_input_is_bounded_and_headers_stay_small(gateway, chain, devnet, http):
    """[19] A 10,000-character scheme drew a 14.5 KB PAYMENT-REQUIRED; every 402 — the one with
    the most offers included — stays well under 8 KB of headers, and aiohttp (whose limit is a
    header line of 8,190 bytes) reads it."""
    payer = wallet(chain.fund(), devnet)
    body = chat_body("reflect me", max_tokens=8)
    required, offer = quote(http, body)
    hostile = envelope(required, {**offer, "scheme": "x" * 10_000}, authorize(payer.account, offer))
    r = http.post(CHAT, json=body, headers={"PAYMENT-SIGNATURE": b64json(hostile)})
    assert r.status_code == 402 and header_bytes(r.headers) < 8192 and len(r.text) < 8192
    # the largest 402: every offer (credit too: a wallet with final credit) and every extension
    with paying(gateway.url, payer) as client:
        funded = client.post(CHAT, json=chat_body("fund credit", max_tokens=4000))
    wait_receipt(gateway.url, funded.headers["x-tollway-receipt"])
    big = chat_body("x" * 1000, max_tokens=8)
    r = http.post(CHAT, json=big, headers=payer.wallet_header(gateway.url))
    doc = unb64json(r.headers["PAYMENT-REQUIRED"])
    assert {o["scheme"] for o in doc["accepts"]} == {"credit", "upto", "exact", "transfer", "batch-settlement"}
    assert set(doc["extensions"]) == {"eip2612GasSponsoring", "sign-in-with-x", "payment-identifier", "bazaar"}
    assert r.headers["www-authenticate"].startswith("Payment ")  # and MPP's challenge
    assert r.status_code == 402 and header_bytes(r.headers) < 8192

    async def read_with_aiohttp() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{gateway.url}{CHAT}", json=body, headers={"PAYMENT-SIGNATURE": b64json(hostile)}) as resp,
        ):
            return resp.status

    assert asyncio.run(read_with_aiohttp()) == 402


def test_origin_of_is_what_messages_name():
    from tollway.payments import signed

    assert signed.origin_of("HTTPS://LLM.Example.com:8443/v1/chat?x=1") == "https://llm.example.com:8443"


def test_urls_are_printed_without_their_secrets():
    """[14] RPC and upstream URLs often carry an API key: the banner shows their host only."""
    from tollway.cli import redacted

    assert (
        redacted("https://user:key@base-mainnet.g.alchemy.com/v2/SECRET?apikey=1")
        == "https://base-mainnet.g.alchemy.com"
    )
    assert redacted("http://127.0.0.1:8545") == "http://127.0.0.1:8545"
