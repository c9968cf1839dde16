"""The adversarial checks again, black-box: against `tollway serve` as a user starts it (its own
anvil, test token and mock upstream), over HTTP and the chain only — no access to its ledger.

Each attack must be refused with a specific reason, cost no upstream call, and move no money.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from eth_account import Account
from web3 import Web3

from support import (
    BAD_SIGNATURE,
    CHAT,
    EXPIRED,
    INSUFFICIENT_FUNDS,
    NONCE_USED,
    RECIPIENT_MISMATCH,
    VALUE_MISMATCH,
    authorize,
    chat_body,
    envelope,
    error_code,
    payment_header,
    payment_required,
)
from tollway.devnet.deploy import token_contract
from tollway.payments.x402 import b64json


class Target:
    """The served gateway, its mock upstream, and its chain."""

    def __init__(self, served: Any) -> None:
        self.http = httpx.Client(base_url=served.url, timeout=30)
        self.mock_url = served.mock_url
        devnet = json.loads((served.cwd / "var" / "devnet.json").read_text())
        self.w3 = Web3(Web3.HTTPProvider(devnet["rpc_url"]))
        self.token = token_contract(self.w3, devnet["token"])
        self.owner = Account.from_key(devnet["deployer_key"])

    def asked(self) -> int:
        return int(httpx.get(f"{self.mock_url}/mock/stats").json()["requests"])

    def balance(self, who: str) -> int:
        return int(self.token.functions.balanceOf(Web3.to_checksum_address(who)).call())

    def fund(self, amount: int = 10_000_000) -> Any:
        account = Account.create()
        tx = self.token.functions.mint(account.address, amount).build_transaction(
            {"from": self.owner.address, "nonce": self.w3.eth.get_transaction_count(self.owner.address, "pending")}
        )
        self.w3.eth.wait_for_transaction_receipt(
            self.w3.eth.send_raw_transaction(self.owner.sign_transaction(tx).raw_transaction), poll_latency=0.01
        )
        return account

    def offer(self, body: dict[str, Any]) -> tuple[dict, dict]:
        required = payment_required(self.http.post(CHAT, json=body))
        return required, next(o for o in required["accepts"] if o["scheme"] == "exact")

    def send(self, body: dict[str, Any], doc: Any) -> httpx.Response:
        return self.http.post(CHAT, json=body, headers=payment_header(doc))


@pytest.fixture(scope="module")
def target(served) -> Target:
    return Target(served)


def refused_for_free(target: Target, attack: Any, status: int, code: str, payer: Any, funded: int) -> None:
    before = target.asked()
    r = attack()
    assert r.status_code == status and error_code(r) == code, r.text[:300]
    assert "PAYMENT-RESPONSE" not in r.headers
    assert target.asked() == before  # the upstream was not asked
    time.sleep(0.3)
    assert target.balance(payer.address) == funded  # no money moved


def test_tampered_payments_are_refused_before_the_upstream(target):
    payer = target.fund()
    body = chat_body("black box", max_tokens=8)
    required, offer = target.offer(body)
    stranger = Account.create()
    cases = [
        (authorize(payer, offer, value=int(offer["amount"]) - 1), VALUE_MISMATCH),
        (authorize(payer, offer, to=stranger.address), RECIPIENT_MISMATCH),
        (authorize(payer, offer, signer=stranger), BAD_SIGNATURE),
        (authorize(payer, offer, validBefore=int(time.time()) + 8), EXPIRED),
    ]
    for payload, code in cases:
        doc = envelope(required, offer, payload)
        refused_for_free(target, lambda doc=doc: target.send(body, doc), 402, code, payer, 10_000_000)


def test_a_payment_pays_once(target):
    payer = target.fund()
    body = chat_body("only once", max_tokens=8)
    required, offer = target.offer(body)
    doc = envelope(required, offer, authorize(payer, offer))
    assert target.send(body, doc).status_code == 200
    time.sleep(0.5)
    paid = 10_000_000 - int(offer["amount"])
    refused_for_free(target, lambda: target.send(body, doc), 402, NONCE_USED, payer, paid)


def test_a_payer_without_funds_costs_no_upstream_call(target):
    pauper = Account.create()
    body = chat_body("free?", max_tokens=8)
    required, offer = target.offer(body)
    doc = envelope(required, offer, authorize(pauper, offer))
    refused_for_free(target, lambda: target.send(body, doc), 402, INSUFFICIENT_FUNDS, pauper, 0)
    for _ in range(4):
        refused_for_free(target, lambda: target.send(body, doc), 402, NONCE_USED, pauper, 0)


def test_malformed_input_gets_a_small_4xx(target):
    payer = target.fund()
    body = chat_body("malformed", max_tokens=8)
    required, offer = target.offer(body)
    duplicate = b'{"model":"mock/echo","messages":[{"role":"user","content":"x"}],"max_tokens":1,"max_tokens":9}'
    r = target.http.post(CHAT, content=duplicate, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_key"
    r = target.http.post(CHAT, json=body, headers={"PAYMENT-SIGNATURE": "not base64 json"})
    assert r.status_code == 400
    hostile = envelope(required, {**offer, "scheme": "x" * 10_000}, authorize(payer, offer))
    r = target.http.post(CHAT, json=body, headers={"PAYMENT-SIGNATURE": b64json(hostile)})
    assert r.status_code == 402 and sum(len(k) + len(v) + 4 for k, v in r.headers.items()) < 8192
    assert target.balance(payer.address) == 10_000_000
