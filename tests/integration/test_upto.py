"""x402 ``upto``: the unmodified official client authorises a maximum, the gateway settles what
the call cost — exactly, in every usage dialect, streamed or not — and nothing when it cost nothing.
Hostile payloads are refused before anything moves."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from x402.extensions.eip2612_gas_sponsoring.client import sign_eip2612_permit
from x402.http.clients import x402HttpxClient
from x402.http.clients.httpx import x402AsyncTransport
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

from support import (
    CHAT,
    SETTLE_WAIT,
    chat_body,
    dedicated_gateway,
    envelope,
    error_code,
    payment_header,
    payment_required,
    payment_rows,
    receipt,
    run_concurrently,
    upto_client,
    wait_receipt,
)
from support import credit as read_credit
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.config import ModelPrice
from tollway.keccak import keccak
from tollway.payments import permit2

DIALECTS = ["openai", "openrouter", "deepseek", "anthropic", "llamacpp", "none"]


async def official_call(url: str, account: Any, devnet, body: dict[str, Any]) -> tuple[httpx.Response, str]:
    """One call paid by the official client; returns the response and, for a stream, its text."""
    async with x402HttpxClient(upto_client(account, devnet)) as http:
        if not body.get("stream"):
            return await http.post(f"{url}{CHAT}", json=body), ""
        async with http.stream("POST", f"{url}{CHAT}", json=body) as r:
            text = "".join([chunk async for chunk in r.aiter_text()])
        return r, text


def upto_offer(required: dict[str, Any]) -> dict[str, Any]:
    return next(o for o in required["accepts"] if o["scheme"] == "upto")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_the_official_client_pays_exactly_the_metered_cost(gateway, chain, devnet, dialect, stream):
    payer = chain.fund(permit2=True)
    before = chain.balance(payer.address)
    body = chat_body(f"metered {dialect}", max_tokens=None, stream=stream, mock={"dialect": dialect})
    del body["max_tokens"]  # no cap: the worst case an exact client would pay
    r, text = await official_call(gateway.url, payer, devnet, body)
    assert r.status_code == 200
    if stream:
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    doc = await asyncio.to_thread(wait_receipt, gateway.url, r.headers["x-tollway-receipt"])
    cost = int(doc["cost"]["atomic"])
    assert doc["payment"]["scheme"] == "upto" and int(doc["payment"]["amount"]["atomic"]) == cost
    assert chain.balance(payer.address) == before - cost  # the debit is the metered cost, not the maximum
    assert cost < int(doc["quote"]["atomic"]) // 100  # (the maximum was the metered cap's bound)
    response = json.loads(__import__("base64").b64decode(r.headers["PAYMENT-RESPONSE"]))
    assert response["success"] and response["payer"].lower() == payer.address.lower()
    if stream:  # headers left before the cost was known: the settlement is in the stream's end and the receipt
        assert response["transaction"] == ""
        summary = json.loads(next(line for line in text.splitlines() if line.startswith(": tollway "))[10:])
        assert summary["settlement"]["amount"] == str(cost)
        assert summary["settlement"]["transaction"] == doc["payment"]["transaction"]
    else:
        assert response["amount"] == str(cost) and response["transaction"] == doc["payment"]["transaction"]


async def test_a_call_that_cost_nothing_sends_nothing(gateway, chain, devnet, tmp_path):
    free = {"mock/echo": ModelPrice(prompt=Decimal(0), completion=Decimal(0))}
    payer = chain.fund(permit2=True)
    with dedicated_gateway(gateway, chain, tmp_path, models=free) as (url, engine):
        r, _ = await official_call(url, payer, devnet, chat_body("free of charge"))
        assert r.status_code == 200
        await asyncio.sleep(SETTLE_WAIT)
        [row] = payment_rows(engine, payer.address)
    assert row["state"] == "settled" and row["amount"] == 0 and row["tx_id"] is None
    assert chain.balance(payer.address) == 100_000_000


async def test_an_upstream_failure_settles_nothing(gateway, chain, devnet):
    payer = chain.fund(permit2=True)
    r, _ = await official_call(gateway.url, payer, devnet, chat_body("fail first", mock={"fail": 500}))
    assert r.status_code == 502
    await asyncio.sleep(SETTLE_WAIT)
    assert [p["state"] for p in payment_rows(gateway.store.engine, payer.address)] == ["released"]
    assert chain.balance(payer.address) == 100_000_000


# -- hostile payloads -------------------------------------------------------------------------------------


def sign_upto(account: Any, offer: dict[str, Any], network: int, **changes: Any) -> dict[str, Any]:
    """An upto payload for ``offer`` — fields overridden by ``changes`` — signed through eth-account's
    generic EIP-712 encoder (independently of the gateway's hashing)."""
    now = int(time.time())
    fields = {
        "token": offer["asset"],
        "amount": int(offer["amount"]),
        "spender": permit2.UPTO_PROXY_ADDRESS,
        "nonce": int.from_bytes(secrets.token_bytes(32), "big"),
        "deadline": now + int(offer["maxTimeoutSeconds"]),
        "to": offer["payTo"],
        "facilitator": offer["extra"]["facilitatorAddress"],
        "validAfter": 0,
        "signer": account,
        "chain_id": network,
    }
    fields.update(changes)
    typed = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
                {"name": "witness", "type": "Witness"},
            ],
            "TokenPermissions": [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}],
            "Witness": [
                {"name": "to", "type": "address"},
                {"name": "facilitator", "type": "address"},
                {"name": "validAfter", "type": "uint256"},
            ],
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": fields["chain_id"], "verifyingContract": permit2.PERMIT2_ADDRESS},
        "message": {
            "permitted": {"token": fields["token"], "amount": fields["amount"]},
            "spender": fields["spender"],
            "nonce": fields["nonce"],
            "deadline": fields["deadline"],
            "witness": {"to": fields["to"], "facilitator": fields["facilitator"], "validAfter": fields["validAfter"]},
        },
    }
    signed = fields["signer"].sign_message(encode_typed_data(full_message=typed))
    return {
        "permit2Authorization": {
            "from": account.address,
            "permitted": {"token": fields["token"], "amount": str(fields["amount"])},
            "spender": fields["spender"],
            "nonce": str(fields["nonce"]),
            "deadline": str(fields["deadline"]),
            "witness": {
                "to": fields["to"],
                "facilitator": fields["facilitator"],
                "validAfter": str(fields["validAfter"]),
            },
        },
        "signature": "0x" + bytes(signed.signature).hex(),
    }


@pytest.fixture
def hostile(gateway, chain, devnet):
    """A funded payer (with a Permit2 approval), a 402 and its upto offer, and a sender that checks
    a refusal moved nothing."""
    payer = chain.fund(permit2=True)
    body = chat_body("hostile upto", max_tokens=8)
    required = payment_required(httpx.post(gateway.url + CHAT, json=body))
    offer = upto_offer(required)

    def send(payload: dict[str, Any], accepted: dict | None = None, to_body: dict | None = None) -> httpx.Response:
        doc = envelope(required, accepted or offer, payload)
        return httpx.post(gateway.url + CHAT, json=to_body or body, headers=payment_header(doc))

    return payer, offer, send


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"to": Account.create().address}, "invalid_permit2_recipient_mismatch"),
        ({"facilitator": Account.create().address}, "invalid_upto_evm_payload_facilitator"),
        ({"spender": Account.create().address}, "invalid_permit2_spender"),
        ({"deadline": 1}, "permit2_deadline_expired"),
        ({"deadline": "short"}, "permit2_deadline_expired"),
        ({"validAfter": 2**40}, "permit2_not_yet_valid"),
        ({"amount": "more"}, "permit2_amount_mismatch"),
        ({"signer": Account.create()}, "invalid_permit2_signature"),
        ({"chain_id": 1}, "invalid_permit2_signature"),
        ({"token": Account.create().address}, "permit2_token_mismatch"),
    ],
)
def test_hostile_upto_payloads_are_refused(hostile, chain, devnet, change, code):
    payer, offer, send = hostile
    if change.get("deadline") == "short":
        change = {"deadline": int(time.time()) + 30}  # outlives no call
    if change.get("amount") == "more":
        change = {"amount": int(offer["amount"]) + 1}
    r = send(sign_upto(payer, offer, devnet.chain_id, **change))
    assert r.status_code == 402 and error_code(r) == code, r.text[:300]
    assert chain.balance(payer.address) == 100_000_000


def move_the_money(chain, payer, payload: dict[str, Any]) -> None:
    chain.transfer(payer, Account.create().address, chain.balance(payer.address))  # (mined at once)


def cancel_the_permit(chain, payer, payload: dict[str, Any]) -> None:
    """Permit2's ``invalidateUnorderedNonces`` for the payment's nonce, sent by the payer."""
    nonce = int(payload["permit2Authorization"]["nonce"])
    selector = keccak(b"invalidateUnorderedNonces(uint256,uint256)")[:4]
    data = selector + (nonce >> 8).to_bytes(32, "big") + (1 << (nonce & 0xFF)).to_bytes(32, "big")
    tx = {
        "from": payer.address,
        "to": permit2.PERMIT2_ADDRESS,
        "data": "0x" + data.hex(),
        "gas": 100_000,
        "nonce": chain.w3.eth.get_transaction_count(payer.address),
        "maxFeePerGas": 10**10,
        "maxPriorityFeePerGas": 10**9,
        "chainId": chain.devnet.chain_id,
        "type": 2,
    }
    sent = chain.w3.eth.send_raw_transaction(payer.sign_transaction(tx).raw_transaction)
    assert chain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1


@pytest.mark.parametrize("undo", [move_the_money, cancel_the_permit])
def test_an_upto_stream_whose_payer_moves_the_money_away_is_cut(gateway, chain, devnet, undo):
    """An upto stream settles only as it ends: a payer who empties the wallet — or cancels the
    permit's nonce — once it has started would be served the whole stream, unpaid (attack: a stream
    for free). It is checked on chain again as it runs, and cut."""
    payer = chain.fund(permit2=True)
    words = " ".join(f"w{i}" for i in range(60))
    body = chat_body(words, model="mock/echo-large", max_tokens=80, stream=True, mock={"chunk_delay": 0.1})
    required = payment_required(httpx.post(gateway.url + CHAT, json=body))
    offer = upto_offer(required)
    payload = sign_upto(payer, offer, devnet.chain_id)
    doc = envelope(required, offer, payload)
    recheck = gateway.settings.stream_recheck_seconds
    with httpx.stream("POST", gateway.url + CHAT, json=body, headers=payment_header(doc), timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        undo(chain, payer, payload)
        started = time.monotonic()
        rest = list(lines)
    assert time.monotonic() - started < recheck + 2.0
    events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "error", events[-1]
    assert "no longer covers" in events[-1]["error"]["message"]
    content = "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e.get("choices"))
    assert len(content) < len(words)  # cut, not finished


def test_an_upto_stream_is_not_cut_for_what_the_payers_later_calls_cannot_pay(gateway, chain, devnet):
    """A stream checked again answers for its own payment only: a later call of the payer refused
    for want of funds (the balance covers the stream, not both) must not cut the stream."""
    payer = chain.fund(permit2=True)
    body = chat_body(" ".join(f"v{i}" for i in range(30)), max_tokens=40, stream=True, mock={"chunk_delay": 0.1})
    required = payment_required(httpx.post(gateway.url + CHAT, json=body))
    offer = upto_offer(required)
    most = int(offer["amount"])
    chain.transfer(payer, Account.create().address, chain.balance(payer.address) - most * 3 // 2)
    doc = envelope(required, offer, sign_upto(payer, offer, devnet.chain_id))
    with httpx.stream("POST", gateway.url + CHAT, json=body, headers=payment_header(doc), timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        later = {**body, "stream": False, "messages": [{"role": "user", "content": "one more"}]}
        later.pop("stream_options", None)
        required2 = payment_required(httpx.post(gateway.url + CHAT, json=later))
        offer2 = upto_offer(required2)
        assert int(offer2["amount"]) > most // 2  # (the balance covers the stream, not both)
        refused = httpx.post(
            gateway.url + CHAT,
            json=later,
            headers=payment_header(envelope(required2, offer2, sign_upto(payer, offer2, devnet.chain_id))),
        )
        assert refused.status_code == 402 and error_code(refused) == "insufficient_funds", refused.text[:300]
        rest = list(lines)
    events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert all(c.get("finish_reason") != "error" for e in events for c in e.get("choices", [])), events[-1]
    assert "data: [DONE]" in rest


def test_a_permit2_allowance_that_covers_one_payment_does_not_pay_two_at_once(gateway, chain, devnet):
    """Approved for one payment's maximum, a payer with the balance for ten would be served ten at
    once and the later settlements would revert (attack: calls for free, the balance kept)."""
    payer = chain.fund(eth=True)
    long = chat_body(" ".join(f"w{i}" for i in range(30)), max_tokens=40, stream=True, mock={"chunk_delay": 0.1})
    required = payment_required(httpx.post(gateway.url + CHAT, json=long))
    offer = upto_offer(required)
    approve = chain.token.functions.approve(permit2.PERMIT2_ADDRESS, int(offer["amount"]))
    tx = approve.build_transaction({"from": payer.address, "nonce": chain.w3.eth.get_transaction_count(payer.address)})
    chain.w3.eth.wait_for_transaction_receipt(
        chain.w3.eth.send_raw_transaction(payer.sign_transaction(tx).raw_transaction)
    )
    doc = envelope(required, offer, sign_upto(payer, offer, devnet.chain_id))
    with httpx.stream("POST", gateway.url + CHAT, json=long, headers=payment_header(doc), timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # (its payment in flight)
        short = chat_body("and another at once", max_tokens=8)
        required2 = payment_required(httpx.post(gateway.url + CHAT, json=short))
        offer2 = upto_offer(required2)
        assert int(offer2["amount"]) <= int(offer["amount"])  # (the allowance covers either alone)
        second = httpx.post(
            gateway.url + CHAT,
            json=short,
            headers=payment_header(envelope(required2, offer2, sign_upto(payer, offer2, devnet.chain_id))),
        )
        assert second.status_code == 412 and error_code(second) == "permit2_allowance_required", second.text[:300]
        assert "data: [DONE]" in list(lines)  # (the first is served whole)


def sponsored(payer, offer: dict[str, Any], devnet, value: int) -> dict[str, Any]:
    """An ``eip2612GasSponsoring`` permit of ``value`` for Permit2, signed by the official SDK."""
    signer = EthAccountSignerWithRPC(payer, rpc_url=devnet.rpc_url)
    extra = offer["extra"]
    deadline = str(int(time.time()) + 3600)
    permit = sign_eip2612_permit(
        signer, offer["asset"], extra["name"], extra["version"], devnet.chain_id, deadline, str(value)
    )
    return {"eip2612GasSponsoring": {"info": permit.to_dict()}}


def test_attack_one_eip2612_permit_does_not_pay_two_upto_calls_at_once(gateway, chain, devnet):
    """A permit *sets* Permit2's allowance to its value as its settlement runs: a payer with no
    approval and no gas sending one payment's permit with several payments at once would be served
    them all, and every settlement but the first would revert (the balance kept). And a small permit
    sent while an approved payment is in flight would cut that one's allowance from under it."""
    payer = chain.fund()
    long = chat_body(" ".join(f"w{i}" for i in range(30)), max_tokens=40, stream=True, mock={"chunk_delay": 0.1})
    required = payment_required(httpx.post(gateway.url + CHAT, json=long))
    offer = upto_offer(required)
    permit = sponsored(payer, offer, devnet, int(offer["amount"]))
    doc = {**envelope(required, offer, sign_upto(payer, offer, devnet.chain_id)), "extensions": permit}
    short = chat_body("and another at once", max_tokens=8)
    required2 = payment_required(httpx.post(gateway.url + CHAT, json=short))
    offer2 = upto_offer(required2)
    with httpx.stream("POST", gateway.url + CHAT, json=long, headers=payment_header(doc), timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # (its payment in flight)
        for extensions in (permit, sponsored(payer, offer2, devnet, int(offer2["amount"]))):
            doc2 = {**envelope(required2, offer2, sign_upto(payer, offer2, devnet.chain_id)), "extensions": extensions}
            second = httpx.post(gateway.url + CHAT, json=short, headers=payment_header(doc2))
            assert second.status_code == 412 and error_code(second) == "permit2_allowance_required", second.text[:300]
            assert "the permit sets the payer's Permit2 allowance" in second.json()["error"]["message"]
        assert "data: [DONE]" in list(lines)  # (the first is served whole)


def test_an_upto_payment_refused_for_its_allowance_costs_no_upstream_call_and_no_gas(gateway, chain, devnet, upstream):
    """Who pays for a refusal: nothing is asked of the upstream and no transaction is queued before
    the allowance is known to cover the payment."""
    fresh = chain.fund()  # never approved Permit2
    body = chat_body("refused for its allowance", max_tokens=8)
    required = payment_required(httpx.post(gateway.url + CHAT, json=body))
    offer = upto_offer(required)
    asked = httpx.get(f"{upstream.url}/mock/stats").json()["requests"]
    doc = envelope(required, offer, sign_upto(fresh, offer, devnet.chain_id))
    r = httpx.post(gateway.url + CHAT, json=body, headers=payment_header(doc))
    assert r.status_code == 412 and error_code(r) == "permit2_allowance_required"
    assert httpx.get(f"{upstream.url}/mock/stats").json()["requests"] == asked
    rows = payment_rows(gateway.store.engine, fresh.address)
    assert [(row["state"], row["tx_id"]) for row in rows] == [("refused", None)]


def test_a_missing_permit2_allowance_is_the_specs_412(gateway, chain, devnet):
    fresh = chain.fund()  # never approved Permit2
    body = chat_body("no allowance", max_tokens=8)
    required = payment_required(httpx.post(gateway.url + CHAT, json=body))
    offer = upto_offer(required)
    doc = envelope(required, offer, sign_upto(fresh, offer, devnet.chain_id))
    r = httpx.post(gateway.url + CHAT, json=body, headers=payment_header(doc))
    assert r.status_code == 412 and error_code(r) == "permit2_allowance_required"
    assert "PAYMENT-REQUIRED" in r.headers


def test_a_reused_permit2_nonce_and_a_cheaper_requests_proof_are_refused(hostile, chain, devnet, gateway):
    payer, offer, send = hostile
    payload = sign_upto(payer, offer, devnet.chain_id)
    assert send(payload).status_code == 200
    again = send(payload)
    assert again.status_code == 402 and error_code(again) == "invalid_exact_evm_nonce_already_used"
    fresh = sign_upto(payer, offer, devnet.chain_id)
    dearer = chat_body("a dearer request", max_tokens=900)
    cheap = send(fresh, to_body=dearer)  # a proof made for another request
    assert cheap.status_code == 402 and error_code(cheap) == "quote_mismatch"
    tampered = {**offer, "extra": {**offer["extra"], "maxTokens": 16_000}}
    r = send(fresh, accepted=tampered)
    assert r.status_code == 402 and error_code(r) == "quote_mismatch"


def test_one_upto_payload_sent_twenty_times_at_once_is_served_once(hostile, chain, devnet, gateway, upstream):
    payer, offer, send = hostile
    payload = sign_upto(payer, offer, devnet.chain_id)
    before = httpx.get(f"{upstream.url}/mock/stats").json()["requests"]
    with ThreadPoolExecutor(20) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: send(payload), range(20))]
    assert statuses.count(200) == 1 and statuses.count(402) == 19
    assert httpx.get(f"{upstream.url}/mock/stats").json()["requests"] == before + 1
    paid = [row for row in payment_rows(gateway.store.engine, payer.address) if row["state"] != "refused"]
    assert len(paid) == 1


def test_the_receipt_of_an_upto_call(gateway, chain, devnet):
    payer = chain.fund(permit2=True)
    r, _ = asyncio.run(official_call(gateway.url, payer, devnet, chat_body("receipt please", max_tokens=8)))
    doc = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert doc["payment"]["state"] == "settled"
    assert receipt(gateway.url, doc["id"])["cost"] == doc["payment"]["amount"]


async def test_a_wallet_with_no_approval_and_no_gas_pays_through_eip2612_gas_sponsoring(gateway, chain, devnet):
    fresh = chain.fund()  # no Permit2 approval, no ETH
    assert chain.w3.eth.get_balance(fresh.address) == 0
    signer = EthAccountSignerWithRPC(fresh, rpc_url=devnet.rpc_url)  # reads the allowance, signs a permit
    r, _ = await official_call(gateway.url, signer, devnet, chat_body("sponsored", max_tokens=8))
    assert r.status_code == 200, r.text[:300]
    doc = await asyncio.to_thread(wait_receipt, gateway.url, r.headers["x-tollway-receipt"])
    cost = int(doc["cost"]["atomic"])
    assert doc["payment"]["state"] == "settled" and chain.balance(fresh.address) == 100_000_000 - cost
    assert chain.token.functions.allowance(fresh.address, permit2.PERMIT2_ADDRESS).call() > 0  # the permit landed
    assert chain.w3.eth.get_balance(fresh.address) == 0  # and the payer spent no gas


class ShortPermit(httpx.AsyncBaseTransport):
    """Sends every payment with its EIP-2612 permit signed anew, to end ``lasts`` seconds from now
    (``signature``: then with these signature bytes instead)."""

    def __init__(
        self, signer: EthAccountSignerWithRPC, chain_id: int, lasts: int = 5, signature: str | None = None
    ) -> None:
        self.inner, self.signer, self.chain_id = httpx.AsyncHTTPTransport(), signer, chain_id
        self.lasts, self.signature = lasts, signature

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if "payment-signature" in request.headers:
            doc = json.loads(base64.b64decode(request.headers["payment-signature"]))
            offer = doc["accepted"]
            info = sign_eip2612_permit(
                self.signer,
                offer["asset"],
                offer["extra"]["name"],
                offer["extra"]["version"],
                self.chain_id,
                str(int(time.time()) + self.lasts),
                offer["amount"],
            )
            doc["extensions"]["eip2612GasSponsoring"]["info"] = info.to_dict()
            if self.signature is not None:
                doc["extensions"]["eip2612GasSponsoring"]["info"]["signature"] = self.signature
            request.headers["payment-signature"] = base64.b64encode(json.dumps(doc).encode()).decode()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_eip2612_permit_that_ends_before_the_call_could_settle_is_refused(gateway, chain, devnet, upstream):
    """Permit2 is approved by the permit only as the payment settles: a permit that has lapsed by
    then would leave the call served and unpaid (and the payer in a debt their next short permit
    would not pay either)."""
    fresh = chain.fund()  # no Permit2 approval: the permit is what the settlement needs
    signer = EthAccountSignerWithRPC(fresh, rpc_url=devnet.rpc_url)
    before = httpx.get(f"{upstream.url}/mock/stats").json()["requests"]
    paying = x402AsyncTransport(upto_client(signer, devnet), ShortPermit(signer, devnet.chain_id))
    async with httpx.AsyncClient(transport=paying) as http:
        r = await http.post(f"{gateway.url}{CHAT}", json=chat_body("a permit about to lapse", max_tokens=8))
    assert r.status_code == 402 and error_code(r) == "invalid_eip2612_permit", r.text[:300]
    assert httpx.get(f"{upstream.url}/mock/stats").json()["requests"] == before  # nothing was served
    assert [row["state"] for row in payment_rows(gateway.store.engine, fresh.address)] in ([], ["refused"])


@pytest.mark.parametrize("signature", ["0x" + "00" * 64 + "05", "0x" + "00" * 64 + "1b", "0x" + "ff" * 64 + "1c"])
async def test_an_eip2612_permit_with_a_signature_that_cannot_be_split_is_refused_not_a_500(
    gateway, chain, devnet, signature
):
    """v outside 0/1/27/28, r = 0, a high s: the settlement's calldata could not be built from it."""
    signer = EthAccountSignerWithRPC(chain.fund(), rpc_url=devnet.rpc_url)
    paying = x402AsyncTransport(upto_client(signer, devnet), ShortPermit(signer, devnet.chain_id, 3600, signature))
    async with httpx.AsyncClient(transport=paying) as http:
        r = await http.post(f"{gateway.url}{CHAT}", json=chat_body("a permit signed with nonsense", max_tokens=8))
    assert r.status_code == 402 and error_code(r) == "invalid_eip2612_permit", r.text[:300]


@pytest.mark.parametrize("scheme", ["upto", "exact"])
def test_a_request_asking_more_output_than_the_default_caps_can_be_paid(gateway, chain, devnet, scheme):
    """The cap a request sets itself (above both default caps) is the one quoted, and paid."""
    payer = Payer(
        chain.fund(permit2=True), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=(scheme,)
    )
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url, timeout=30) as http:
        r = http.post(CHAT, json=chat_body("a long answer, if need be", max_tokens=32768))
    assert r.status_code == 200, r.text[:300]
    doc = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert doc["payment"]["scheme"] == scheme


@contextmanager
def an_upto_offer_of_nothing(gateway, chain, devnet, tmp_path) -> Iterator[tuple[str, Any, Payer, dict, dict, dict]]:
    """A gateway whose on-chain payments have no least amount (min_chain_payment_usd = 0), and a
    signed-in wallet whose credit covers a call's quote: it is offered upto at "0". Yields the
    gateway's URL, the wallet's account and payer, the call's body, its 402 and that offer."""
    account = chain.fund(permit2=True)
    payer = Payer(account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
    with dedicated_gateway(gateway, chain, tmp_path, min_chain_payment_usd=Decimal(0)) as (url, _):
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=url, timeout=30) as http:
            funding = http.post(CHAT, json=chat_body("fund my credit", max_tokens=600))
            assert funding.status_code == 200, funding.text
        wait_receipt(url, funding.headers["x-tollway-receipt"])
        body = chat_body("a tiny call", max_tokens=1)
        required = payment_required(httpx.post(url + CHAT, headers=payer.wallet_header(url), json=body))
        offer = upto_offer(required)
        assert offer["amount"] == "0" and int(offer["extra"]["credit"]) > 0, offer
        yield url, account, payer, body, required, offer


def test_an_upto_offer_the_credit_reduced_to_nothing_is_paid_from_the_credit(gateway, chain, devnet, tmp_path):
    """A permit of 0 pulls nothing: the call is paid from the credit, and nothing is sent on chain —
    it was a 500 (the simulation of a settlement of 0). (Adversarial review.)"""
    with an_upto_offer_of_nothing(gateway, chain, devnet, tmp_path) as (url, account, payer, body, required, offer):
        doc = envelope(required, offer, sign_upto(account, offer, devnet.chain_id))
        r = httpx.post(url + CHAT, json=body, headers={**payment_header(doc), **payer.wallet_header(url)}, timeout=30)
        assert r.status_code == 200, r.text
        paid = wait_receipt(url, r.headers["x-tollway-receipt"])
    assert paid["payment"]["amount"]["atomic"] == "0" and not paid["payment"].get("transaction"), paid["payment"]
    assert int(paid["cost"]["atomic"]) > 0  # (taken from the credit)


def test_attack_a_permit_of_nothing_pays_nothing_without_the_credit_and_once_with_it(
    gateway, chain, devnet, tmp_path, upstream
):
    """A wallet with no credit pays the offer of "0" another's credit earned (its quote binds no
    wallet) with a permit of 0: refused, before the upstream is asked. The wallet whose credit
    covers it sends its permit of 0 twice at once: served once, charged once."""
    with an_upto_offer_of_nothing(gateway, chain, devnet, tmp_path) as (url, account, payer, body, required, offer):
        asked = httpx.get(f"{upstream.url}/mock/stats").json()["requests"]
        stranger = chain.fund(permit2=True)
        free = envelope(required, offer, sign_upto(stranger, offer, devnet.chain_id))
        r = httpx.post(url + CHAT, json=body, headers=payment_header(free), timeout=30)
        assert r.status_code == 402 and error_code(r) == "amount_insufficient", r.text
        assert httpx.get(f"{upstream.url}/mock/stats").json()["requests"] == asked  # (nothing spent on it)
        credit = read_credit(url, payer)
        twice = {**payment_header(envelope(required, offer, sign_upto(account, offer, devnet.chain_id)))}
        answers: list[httpx.Response] = []
        run_concurrently(
            lambda _: answers.append(
                httpx.post(url + CHAT, json=body, headers={**twice, **payer.wallet_header(url)}, timeout=30)
            ),
            range(2),
        )
        assert sorted(a.status_code for a in answers) == [200, 402], [a.text[:200] for a in answers]
        cost = int(
            wait_receipt(url, next(a for a in answers if a.status_code == 200).headers["x-tollway-receipt"])["cost"][
                "atomic"
            ]
        )
        assert read_credit(url, payer) == credit - cost
