"""Sign-In-With-X: a wallet signs in with the sign-in a 402 (or 401) declares; its credit pays a
call it covers, once per sign-in. Hostile sign-ins — another domain or URI, a replayed nonce, an
expired message, a sign-in made for another request, another key's signature — are refused and
nothing is spent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account

from conftest import gateway_settings
from support import CHAT, ServerThread, chat_body, credit, error_code, payment_required, wait_receipt
from tollway import siwe
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.payments.x402 import b64json, unb64json
from tollway.signin import iso


@pytest.fixture
def funded(gateway, chain, devnet) -> Payer:
    """A wallet with credit at the gateway: it paid one call ``exact`` (the quote), and the surplus
    is credit, final on chain."""
    return with_credit(gateway, chain, devnet)


def with_credit(gateway, chain, devnet) -> Payer:
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url, timeout=30) as http:
        r = http.post(CHAT, json=chat_body("fund my credit", max_tokens=4000))
    assert r.status_code == 200
    wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    return payer


def declared(r: httpx.Response) -> dict[str, Any]:
    """The sign-in an answer declares (its ``info``)."""
    assert r.status_code in (401, 402), r.text
    return unb64json(r.headers["PAYMENT-REQUIRED"])["extensions"]["sign-in-with-x"]["info"]


def sign_in(account: Any, info: dict[str, Any], devnet, **changes: Any) -> dict[str, str]:
    """A ``SIGN-IN-WITH-X`` header for ``info`` (with ``changes`` to the fields it signs)."""
    return {"SIGN-IN-WITH-X": b64json(siwe.sign(account, {**info, **changes}, f"eip155:{devnet.chain_id}"))}


@pytest.fixture
def http(gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


def test_a_sign_in_its_credit_covers_is_served_once_with_no_payment(gateway, chain, devnet, funded, http):
    body = chat_body("paid by credit", max_tokens=8)
    info = declared(http.post(CHAT, json=body))
    before_chain, before_credit = chain.balance(funded.account.address), credit(gateway.url, funded)
    header = sign_in(funded.account, info, devnet)
    r = http.post(CHAT, json=body, headers=header)
    assert r.status_code == 200, r.text
    doc = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert doc["payment"]["scheme"] == "credit" and doc["payment"]["transaction"] is None
    assert chain.balance(funded.account.address) == before_chain
    assert credit(gateway.url, funded) == before_credit - int(doc["cost"]["atomic"])
    again = http.post(CHAT, json=body, headers=header)  # a captured sign-in pays nothing more
    assert again.status_code == 402 and error_code(again) == "invalid_siwx_nonce_used"
    assert credit(gateway.url, funded) == before_credit - int(doc["cost"]["atomic"])


def test_a_sign_in_nonce_another_wallet_used_first_still_pays_for_its_own_wallet(gateway, chain, devnet, funded, http):
    """A sign-in's nonce is the request's (any wallet sending that body gets it): another wallet
    spending it first must not leave the first wallet's call refused as already paid."""
    body = chat_body("two wallets, one body", max_tokens=8)
    info = declared(http.post(CHAT, json=body))
    other = with_credit(gateway, chain, devnet)
    assert http.post(CHAT, json=body, headers=sign_in(other.account, info, devnet)).status_code == 200
    mine = http.post(CHAT, json=body, headers=sign_in(funded.account, info, devnet))
    assert mine.status_code == 200, mine.text
    again = http.post(CHAT, json=body, headers=sign_in(funded.account, info, devnet))  # (still once per wallet)
    assert again.status_code == 402 and error_code(again) == "invalid_siwx_nonce_used"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"domain": "evil.example"}, "invalid_siwx_domain_mismatch"),
        ({"uri": "https://evil.example/v1/chat/completions"}, "invalid_siwx_uri_mismatch"),
        ({"uri": "https://[x/v1/chat/completions"}, "invalid_siwx_uri_mismatch"),  # (urlsplit raises)
        # (times as the test runs, not as it is collected: a suite outlasts 600 s)
        (lambda: {"issuedAt": iso(time.time() - 600)}, "invalid_siwx_issued_at_too_old"),
        (lambda: {"issuedAt": iso(time.time() + 600)}, "invalid_siwx_issued_at_in_future"),
        (lambda: {"expirationTime": iso(time.time() - 1)}, "invalid_siwx_expired"),
        (lambda: {"notBefore": iso(time.time() + 600)}, "invalid_siwx_not_yet_valid"),
        ({"nonce": "deadbeef" * 5}, "invalid_siwx_nonce"),
        (lambda: {"nonce": f"{int(time.time()) + 100:x}" + "é" * 32}, "invalid_siwx_nonce"),  # (not ASCII: no MAC)
        ({"version": "2"}, "invalid_siwx_version"),
    ],
)
def test_hostile_sign_ins_are_refused_and_spend_nothing(gateway, devnet, funded, http, change, code):
    body = chat_body("hostile sign-in", max_tokens=8)
    info = declared(http.post(CHAT, json=body))
    before = credit(gateway.url, funded)
    change = change() if callable(change) else change
    r = http.post(CHAT, json=body, headers=sign_in(funded.account, info, devnet, **change))
    assert r.status_code == 402 and error_code(r) == code, r.text[:300]
    assert credit(gateway.url, funded) == before


def test_a_sign_in_made_for_another_request_is_refused(gateway, devnet, funded, http):
    cheap, dear = chat_body("a cheap call", max_tokens=8), chat_body("a dear call", max_tokens=900)
    info = declared(http.post(CHAT, json=cheap))
    before = credit(gateway.url, funded)
    r = http.post(CHAT, json=dear, headers=sign_in(funded.account, info, devnet))
    assert r.status_code == 402 and error_code(r) == "invalid_siwx_nonce"
    assert credit(gateway.url, funded) == before


def test_a_sign_in_by_another_key_or_chain_is_refused(gateway, devnet, funded, http):
    body = chat_body("whose wallet?", max_tokens=8)
    info = declared(http.post(CHAT, json=body))
    before = credit(gateway.url, funded)
    forged = siwe.sign(Account.create(), info, f"eip155:{devnet.chain_id}")  # signed by a stranger...
    forged["address"] = funded.account.address  # ...claiming the funded wallet
    r = http.post(CHAT, json=body, headers={"SIGN-IN-WITH-X": b64json(forged)})
    assert r.status_code == 402 and error_code(r) == "invalid_siwx_signature"
    other_chain = siwe.sign(funded.account, info, "eip155:1")
    r = http.post(CHAT, json=body, headers={"SIGN-IN-WITH-X": b64json(other_chain)})
    assert r.status_code == 402 and error_code(r) == "invalid_siwx_chain_id"
    assert credit(gateway.url, funded) == before


@pytest.mark.parametrize(
    "header", ["not base64!", b64json(["a list"]), b64json({"domain": "x"}), b64json({"address": 1}), "A" * 5000]
)
def test_malformed_sign_ins_are_a_400(http, header):
    r = http.post(CHAT, json=chat_body("malformed", max_tokens=8), headers={"SIGN-IN-WITH-X": header})
    assert r.status_code == 400, r.text[:300]


def test_sign_ins_no_key_signed_are_refused_never_a_500(gateway, devnet, funded, http):
    """Changed after signing: a lone surrogate (no UTF-8 text to have signed), an odd number of hex
    digits, and a "contract wallet" that is the identity precompile (its answer to
    isValidSignature echoes the question, which begins with the magic value)."""
    body = chat_body("unsigned sign-ins", max_tokens=8)
    signed = siwe.sign(funded.account, declared(http.post(CHAT, json=body)), f"eip155:{devnet.chain_id}")
    for change in ({"statement": "\ud800"}, {"signature": "0x" + "1" * 131}):
        r = http.post(CHAT, json=body, headers={"SIGN-IN-WITH-X": b64json({**signed, **change})})
        assert r.status_code == 400 and error_code(r) == "invalid_siwx_payload", r.text[:300]
    echo = {**signed, "address": "0x" + "00" * 19 + "04", "signature": "0x" + "11" * 65}
    r = http.post(CHAT, json=body, headers={"SIGN-IN-WITH-X": b64json(echo)})
    assert r.status_code == 402 and error_code(r) == "invalid_siwx_signature", r.text[:300]


def test_a_sign_in_as_an_address_whose_code_fails_is_refused_not_an_outage(devnet, funded, http, chain):
    """Precompiles that fail on the question (not a revert: "EVM error PrecompileError"), and a
    contract whose code is one invalid opcode: the address did not sign — a 402, not a 503 that tells
    the client to retry and the operator that the chain is down."""
    failing = Account.create().address
    chain.w3.provider.make_request("anvil_setCode", [failing, "0xfe"])
    body = chat_body("sign-ins as failing code", max_tokens=8)
    signed = siwe.sign(funded.account, declared(http.post(CHAT, json=body)), f"eip155:{devnet.chain_id}")
    for address in ("0x" + "00" * 19 + "05", "0x" + "00" * 19 + "08", "0x" + "00" * 19 + "0a", failing):
        doc = {**signed, "address": address, "signature": "0x" + "11" * 65}
        r = http.post(CHAT, json=body, headers={"SIGN-IN-WITH-X": b64json(doc)})
        assert r.status_code == 402 and error_code(r) == "invalid_siwx_signature", (address, r.text[:300])
    accepting = Account.create().address  # (a contract wallet that accepts any signature: EIP-1271's magic value)
    chain.w3.provider.make_request("anvil_setCode", [accepting, "0x631626ba7e60e01b60005260206000f3"])
    doc = {**signed, "address": accepting, "signature": "0x" + "11" * 65}
    r = http.post(CHAT, json=body, headers={"SIGN-IN-WITH-X": b64json(doc)})
    assert r.status_code == 402 and error_code(r) == "insufficient_credit", r.text[:300]  # (signed in: no credit)


def test_hostile_withdrawal_bodies_are_a_400(devnet, funded, http):
    r = http.post("/v1/credit/withdrawals", content=b'{"amount": "\\ud800"}')  # (a lone surrogate: no digest)
    assert r.status_code == 400 and error_code(r) == "invalid_json", r.text[:300]
    # superscript two (a digit to str.isdigit, not to int()); more digits than int() reads
    for body in ({"amount": "\u00b2"}, {"amount": "1" * 5000}):
        header = sign_in(funded.account, declared(http.post("/v1/credit/withdrawals", json=body)), devnet)
        r = http.post("/v1/credit/withdrawals", json=body, headers=header)
        assert r.status_code == 400 and error_code(r) == "invalid_amount", r.text[:300]


def test_credit_short_of_the_call_gets_quotes_reduced_by_it(gateway, devnet, funded, http):
    """The official client pays from its first 402 after a refused sign-in; tollway's own client
    pays the reduced quotes of the second."""
    balance = credit(gateway.url, funded)
    body = chat_body("more than my credit " * 400, max_tokens=16000)
    first = http.post(CHAT, json=body)
    r = http.post(CHAT, json=body, headers=sign_in(funded.account, declared(first), devnet))
    assert r.status_code == 402 and error_code(r) == "insufficient_credit"
    full = {o["scheme"]: int(o["amount"]) for o in payment_required(first)["accepts"]}
    reduced = {o["scheme"]: int(o["amount"]) for o in payment_required(r)["accepts"]}
    assert reduced["exact"] == full["exact"] - balance and reduced["upto"] == full["upto"] - balance
    assert credit(gateway.url, funded) == balance


def test_endpoints_that_need_a_wallet_answer_401_with_a_sign_in(gateway, devnet, funded, http):
    r = http.get("/v1/credit")
    assert r.status_code == 401 and error_code(r) == "sign_in_required" and "www-authenticate" in r.headers
    ok = http.get("/v1/credit", headers=sign_in(funded.account, declared(r), devnet))
    assert ok.status_code == 200 and ok.json()["wallet"] == funded.account.address.lower()
    stranger = Account.create()
    receipt_id = funded.history[0].receipt_id
    challenge = http.get(f"/v1/receipts/{receipt_id}")
    assert challenge.status_code == 401
    theirs = http.get(f"/v1/receipts/{receipt_id}", headers=sign_in(stranger, declared(challenge), devnet))
    assert theirs.status_code == 403 and error_code(theirs) == "receipt_forbidden"
    mine = http.get(f"/v1/receipts/{receipt_id}", headers=sign_in(funded.account, declared(challenge), devnet))
    assert mine.status_code == 200 and mine.json()["id"] == receipt_id


@pytest.mark.parametrize("public_url", ["https://Tollway.Example", "https://[2001:DB8::1]:8443/"])
def test_a_sign_in_the_gateway_declared_is_accepted_whatever_the_case_of_public_url(
    devnet, upstream, tmp_path, public_url
):
    """The origin a sign-in's URI must have is compared in lower case: the URI the gateway declares
    must be written so too, or it would refuse every sign-in it declares."""
    settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path / "l.sqlite3", public_url=public_url)
    with ServerThread(create_app(settings), proxy_headers=False) as gw, httpx.Client(base_url=gw.url) as client:
        info = declared(client.get("/v1/credit"))
        r = client.get("/v1/credit", headers=sign_in(Account.create(), info, devnet))
    assert r.status_code == 200, r.text
    assert info["uri"] == public_url.lower().rstrip("/") + "/v1/credit"


def test_a_withdrawal_goes_to_the_signed_in_wallet_once(gateway, chain, devnet, funded, http):
    before = chain.balance(funded.account.address)
    body = {"amount": "1000"}
    challenge = http.post("/v1/credit/withdrawals", json=body)
    assert challenge.status_code == 401
    header = sign_in(funded.account, declared(challenge), devnet)
    r = http.post("/v1/credit/withdrawals", json=body, headers=header)
    assert r.status_code == 202, r.text
    assert r.json()["wallet"] == funded.account.address.lower()
    again = http.post("/v1/credit/withdrawals", json=body, headers=header)
    assert again.status_code == 400 and error_code(again) == "withdrawal_replayed"
    other = http.post("/v1/credit/withdrawals", json={"amount": "2000"}, headers=header)  # signed for 1000
    assert other.status_code == 401 and error_code(other) == "invalid_siwx_nonce"
    deadline = time.monotonic() + 30
    while chain.balance(funded.account.address) != before + 1000:
        assert time.monotonic() < deadline, "the payout did not arrive"
        time.sleep(0.2)


def test_the_deprecated_wallet_header_still_identifies_and_says_so(gateway, funded, http):
    r = http.get("/v1/credit", headers=funded.wallet_header(gateway.url))
    assert r.status_code == 200 and r.json()["wallet"] == funded.account.address.lower()
    assert r.headers["deprecation"].startswith("@") and 'rel="deprecation"' in r.headers["link"]
    assert "deprecation" not in http.get("/v1/models").headers


def test_a_sign_in_refused_for_short_credit_locks_nothing(gateway, devnet, funded, http):
    """A payer whose credit cannot cover the quote is refused inside the lock's own transaction:
    nothing is held, nothing recorded, and the sign-in is not spent — sent again it is refused for
    the same reason, not as a replay."""
    balance = credit(gateway.url, funded)
    body = chat_body("more than my credit " * 400, max_tokens=16000)
    header = sign_in(funded.account, declared(http.post(CHAT, json=body)), devnet)
    for _ in range(2):
        r = http.post(CHAT, json=body, headers=header)
        assert r.status_code == 402 and error_code(r) == "insufficient_credit"
        assert credit(gateway.url, funded) == balance  # (a hold would show here)


def test_one_sign_in_sent_twice_at_once_pays_one_call(gateway, devnet, funded, http):
    """The same captured sign-in raced on two connections: one call is served and charged, the
    other is a replay; the credit moves once."""
    from concurrent.futures import ThreadPoolExecutor

    before = credit(gateway.url, funded)
    body = chat_body("raced sign-in", max_tokens=8)
    header = sign_in(funded.account, declared(http.post(CHAT, json=body)), devnet)

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=gateway.url, timeout=30) as c:
            return c.post(CHAT, json=body, headers=header)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, range(2)))
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 402]
    assert len(served) == 1 and len(refused) == 1 and error_code(refused[0]) == "invalid_siwx_nonce_used"
    doc = wait_receipt(gateway.url, served[0].headers["x-tollway-receipt"])
    assert credit(gateway.url, funded) == before - int(doc["cost"]["atomic"])
