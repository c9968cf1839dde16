"""Paying with an ordinary on-chain transfer, presented by its hash (the `transfer` scheme)."""

from __future__ import annotations

import time

import httpx
import pytest
from eth_account import Account

from conftest import gateway_settings
from support import ServerThread, credit, run_concurrently, send_raw, signed_authorization, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, claim_transfer
from tollway.payments.eip3009 import transfer_calldata
from tollway.payments.exact import decode_authorization
from tollway.payments.x402 import b64json, unb64json

# An output cap large enough that the quote is above the smallest on-chain payment
BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "paid by transfer"}], "max_tokens": 2000}


def transfer_offer(url: str) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", json=BODY)
    assert r.status_code == 402
    return next(o for o in unb64json(r.headers["PAYMENT-REQUIRED"])["accepts"] if o["scheme"] == "transfer")


def pay(url: str, offer: dict, payload: dict) -> httpx.Response:
    doc = {"x402Version": 2, "accepted": offer, "payload": payload}
    return httpx.post(f"{url}/v1/chat/completions", json=BODY, headers={"PAYMENT-SIGNATURE": b64json(doc)})


def reason(r: httpx.Response) -> str:
    return unb64json(r.headers["PAYMENT-REQUIRED"])["error"].split(":")[0]


def credit_of(url: str, account, devnet) -> int:
    return credit(url, Payer(account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)]))


def test_a_transfer_pays_once_and_its_surplus_is_credit(gateway, chain, devnet):
    account = chain.fund(eth=True)
    offer = transfer_offer(gateway.url)
    quote = int(offer["amount"])
    tx = chain.transfer(account, devnet.payee, quote + 5000)
    r = pay(gateway.url, offer, claim_transfer(account, offer, tx, gateway.url))
    assert r.status_code == 200, r.text
    assert unb64json(r.headers["PAYMENT-RESPONSE"])["transaction"] == tx
    receipt = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert receipt["payment"]["scheme"] == "transfer"
    assert credit_of(gateway.url, account, devnet) == quote + 5000 - int(receipt["cost"]["atomic"])

    again = pay(gateway.url, offer, claim_transfer(account, offer, tx, gateway.url))
    assert again.status_code == 402 and reason(again) == "invalid_exact_evm_nonce_already_used"


def test_refusals(gateway, chain, devnet):
    account, stranger = chain.fund(eth=True), chain.fund(eth=True)
    offer = transfer_offer(gateway.url)
    quote = int(offer["amount"])

    failed = chain.transfer(account, devnet.payee, 10**15, gas=100_000)  # more than it holds: reverts
    assert pay(gateway.url, offer, claim_transfer(account, offer, failed, gateway.url)).status_code == 402
    assert reason(pay(gateway.url, offer, claim_transfer(account, offer, failed, gateway.url))) == "transfer_failed"

    elsewhere = chain.transfer(account, Account.create().address, quote)
    claim = claim_transfer(account, offer, elsewhere, gateway.url)
    assert reason(pay(gateway.url, offer, claim)) == "transfer_mismatch"

    theirs = chain.transfer(stranger, devnet.payee, quote)  # someone else's transfer, claimed by account
    assert reason(pay(gateway.url, offer, claim_transfer(account, offer, theirs, gateway.url))) == "transfer_mismatch"
    forged = claim_transfer(account, offer, theirs, gateway.url) | {"wallet": stranger.address}
    assert reason(pay(gateway.url, offer, forged)) == "invalid_transfer_claim"
    # The refusal of account's claim is remembered for account alone: the stranger's own claim pays.
    assert pay(gateway.url, offer, claim_transfer(stranger, offer, theirs, gateway.url)).status_code == 200

    unknown = "0x" + "ab" * 32
    assert reason(pay(gateway.url, offer, claim_transfer(account, offer, unknown, gateway.url))) == "transfer_not_found"
    assert pay(gateway.url, offer, {"transaction": "0x12", "wallet": account.address}).status_code == 400


def test_too_small_a_transfer_is_refused_but_kept_as_credit(gateway, chain, devnet):
    account = chain.fund(eth=True)
    offer = transfer_offer(gateway.url)
    small = int(offer["amount"]) // 2
    tx = chain.transfer(account, devnet.payee, small)
    r = pay(gateway.url, offer, claim_transfer(account, offer, tx, gateway.url))
    assert r.status_code == 402 and reason(r) == "amount_insufficient"
    assert credit_of(gateway.url, account, devnet) == small  # not lost: it pays the next call
    again = pay(gateway.url, offer, claim_transfer(account, offer, tx, gateway.url))
    assert reason(again) == "invalid_exact_evm_nonce_already_used"


@pytest.fixture(scope="module")
def confirming_gateway(devnet, upstream, tmp_path_factory):
    settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path_factory.mktemp("conf") / "l.sqlite3")
    settings = settings.model_copy(update={"chain": settings.chain.model_copy(update={"confirmations": 3})})
    with ServerThread(create_app(settings)) as server:
        yield server


def test_too_few_confirmations(confirming_gateway, chain, devnet):
    account = chain.fund(eth=True)
    offer = transfer_offer(confirming_gateway.url)
    assert offer["extra"]["confirmations"] == 3
    tx = chain.transfer(account, devnet.payee, int(offer["amount"]))
    r = pay(confirming_gateway.url, offer, claim_transfer(account, offer, tx, confirming_gateway.url))
    assert r.status_code == 402 and reason(r) == "transfer_unconfirmed"
    chain.mine(3)
    time.sleep(1.1)  # an unconfirmed transfer is not looked up again for a second
    claim = claim_transfer(account, offer, tx, confirming_gateway.url)
    assert pay(confirming_gateway.url, offer, claim).status_code == 200


def test_the_gateways_own_settlement_cannot_be_claimed_as_a_transfer(gateway, chain, devnet):
    """An exact payment's settlement transaction moves the payer's tokens to the payee, but it was
    sent by the gateway: claiming it as a transfer would count the same money twice."""
    from tollway.client import SyncPayingTransport

    account = chain.fund()
    payer = Payer(account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url) as http:
        assert http.post("/v1/chat/completions", json=BODY).status_code == 200
    settlement = wait_receipt(gateway.url, payer.history[0].receipt_id)["payment"]["transaction"]
    offer = transfer_offer(gateway.url)
    r = pay(gateway.url, offer, claim_transfer(account, offer, settlement, gateway.url))
    assert r.status_code == 402 and reason(r) == "transfer_mismatch"


def test_an_authorization_the_payer_carried_out_themselves_cannot_be_claimed_as_a_transfer(gateway, chain, devnet):
    """An exact payment's EIP-3009 authorization may be sent on chain by anyone, its payer too,
    before the gateway's settlement: the gateway then finds it paid (``settled_elsewhere``). Its
    transaction, sent by the payer, moves the payer's tokens to the payee, so claimed as a transfer
    (or an MPP ``hash``) it would count the same money twice."""
    account = chain.fund(eth=True)
    offer = transfer_offer(gateway.url)
    auth, signature = decode_authorization(signed_authorization(devnet, account, int(offer["amount"]) + 5000))
    fees = {"gas": 200_000, "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 10**9}
    tx = send_raw(chain, account, {"to": devnet.token, "data": transfer_calldata(auth, signature), **fees})
    assert chain.w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
    r = pay(gateway.url, offer, claim_transfer(account, offer, tx, gateway.url))
    assert r.status_code == 402 and reason(r) == "transfer_mismatch"
    assert credit_of(gateway.url, account, devnet) == 0


def test_one_transfer_claimed_six_times_at_once_pays_one_call_and_credits_once(gateway, chain, devnet, upstream):
    """A payer who wants something free sends the same transfer's claim six times at once: one
    call is served, the rest refused before the upstream is asked, and the money counts once."""
    account = chain.fund(eth=True)
    offer = transfer_offer(gateway.url)
    quote = int(offer["amount"])
    tx = chain.transfer(account, devnet.payee, quote + 5000)
    claim = claim_transfer(account, offer, tx, gateway.url)
    asked = httpx.get(f"{upstream.url}/mock/stats").json()["requests"]
    answers: list[httpx.Response] = []
    run_concurrently(lambda _: answers.append(pay(gateway.url, offer, claim)), range(6))
    assert sorted(r.status_code for r in answers) == [200, 402, 402, 402, 402, 402]
    assert httpx.get(f"{upstream.url}/mock/stats").json()["requests"] == asked + 1
    served = next(r for r in answers if r.status_code == 200)
    cost = int(wait_receipt(gateway.url, served.headers["x-tollway-receipt"])["cost"]["atomic"])
    assert credit_of(gateway.url, account, devnet) == quote + 5000 - cost
