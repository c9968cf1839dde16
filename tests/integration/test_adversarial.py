"""Attacks on the payment check, each built from a genuine 402 and then tampered with.

Every attack must be refused with a 400 (malformed) or a 402 (does not pay for this call)
carrying a *specific* reason, and must leave the payer's money where it was: no payment row
in ``settling``/``settled`` for the payer, and an unchanged on-chain balance after a short
wait (the settlement worker is asynchronous). Signatures for tampered authorizations are made
with eth-account's generic EIP-712 encoder, independently of the gateway's own hashing.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from support import (
    ASSET_MISMATCH,
    BAD_SIGNATURE,
    CHAT,
    EXPIRED,
    INSUFFICIENT_FUNDS,
    INVALID_NETWORK,
    INVALID_PAYLOAD,
    INVALID_VERSION,
    NONCE_USED,
    NOT_YET_VALID,
    QUOTE_MISMATCH,
    RECIPIENT_MISMATCH,
    SETTLE_WAIT,
    UNSUPPORTED_SCHEME,
    VALUE_MISMATCH,
    authorize,
    chat_body,
    envelope,
    error_code,
    eventually,
    exact_offer,
    exact_payment,
    free_port,
    high_s_twin,
    payment_header,
    payment_required,
    payment_rows,
    wait_receipt,
)
from tollway.client import AllowedAsset, Payer
from tollway.client.payer import sign_exact
from tollway.config import Settings
from tollway.payments.x402 import b64json, unb64json

# -- wire helpers ---------------------------------------------------------------------------------


# -- per-test context -------------------------------------------------------------------------------


@dataclass
class Attack:
    gateway: Any
    chain: Any
    client: httpx.Client
    payer: Any
    funded: int

    def required(self, body: dict[str, Any]) -> dict[str, Any]:
        """The decoded PAYMENT-REQUIRED of an unpaid POST of ``body``."""
        doc = payment_required(self.client.post(CHAT, json=body))
        assert doc["x402Version"] == 2 and doc["accepts"], doc
        return doc

    def offer(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        required = self.required(body)
        return required, dict(exact_offer(required))

    def send(self, body: dict[str, Any], doc: Any, header: str = "PAYMENT-SIGNATURE") -> httpx.Response:
        value = doc if isinstance(doc, str | bytes) else b64json(doc)
        return self.client.post(CHAT, json=body, headers={header: value})

    def rows(self, payer: str | None = None) -> list[dict[str, Any]]:
        return payment_rows(self.gateway.store.engine, payer or self.payer.address)

    def refused(self, r: httpx.Response, status: int | set[int], *codes: str) -> None:
        """``r`` is a refusal with one of ``codes`` and nothing was (or will be) settled."""
        statuses = {status} if isinstance(status, int) else status
        problems = []
        if r.status_code not in statuses:
            problems.append(f"expected {statuses} {codes}, got {r.status_code}: {r.text[:300]}")
        elif error_code(r) not in codes:
            problems.append(f"expected a reason in {codes}, got {error_code(r)!r}")
        elif "PAYMENT-RESPONSE" in r.headers:
            problems.append(f"a refusal carries a PAYMENT-RESPONSE: {unb64json(r.headers['PAYMENT-RESPONSE'])}")
        elif r.status_code == 402 and not unb64json(r.headers["PAYMENT-REQUIRED"])["accepts"]:
            problems.append("a 402 without a fresh offer")
        moved = self.money_moved()
        if moved:
            problems.append(moved)
        assert not problems, "; ".join(problems)

    def money_moved(self, payer: Any = None, funded: int | None = None) -> str | None:
        """What went wrong with the payer's money, if anything (ledger first, then the chain)."""
        who = payer or self.payer
        rows = self.rows(who.address)
        bad = [(row["state"], row["tx_hash"]) for row in rows if row["state"] in ("settling", "settled", "failed")]
        if bad:
            return f"MONEY: payment(s) went to settlement: {bad}"
        # The worker is asynchronous: give it time to act on any row before reading the chain.
        time.sleep(SETTLE_WAIT if rows else 0.05)
        expected = self.funded if funded is None else funded
        balance = self.chain.balance(who.address)
        return None if balance == expected else f"MONEY: balance {balance} != {expected}"

    def nothing_moved(self, payer: Any = None, funded: int | None = None) -> None:
        moved = self.money_moved(payer, funded)
        assert moved is None, moved


@pytest.fixture
def attack(gateway, chain) -> Iterator[Attack]:
    funded = 100_000_000
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield Attack(gateway, chain, client, chain.fund(funded), funded)


# -- controls: the untampered payments these attacks start from are good -------------------------


@pytest.mark.parametrize("signer", ["sign_exact", "eip712-reference"])
def test_control_untampered_payment_is_served(attack, signer):
    body = chat_body(f"control, untampered, {signer}")
    required, offer = attack.offer(body)
    if signer == "sign_exact":
        payload = sign_exact(attack.payer, offer, int(time.time()))
    else:
        payload = authorize(attack.payer, offer)
    r = attack.send(body, envelope(required, offer, payload))
    assert r.status_code == 200, r.text
    wait_receipt(attack.gateway.url, r.headers["x-tollway-receipt"])
    assert attack.chain.balance(attack.payer.address) == attack.funded - int(offer["amount"])


# -- amount, recipient, asset, chain ------------------------------------------------------------------


def test_underpaid_resigned(attack):
    body = chat_body("underpay me")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer, value=int(offer["amount"]) - 1)
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, VALUE_MISMATCH)


def test_underpaid_with_accepted_amount_lowered_to_match(attack):
    body = chat_body("underpay me, and lie about the quote")
    required, offer = attack.offer(body)
    cheaper = str(int(offer["amount"]) - 1)
    payload = authorize(attack.payer, offer, value=cheaper)
    attack.refused(attack.send(body, envelope(required, {**offer, "amount": cheaper}, payload)), 402, QUOTE_MISMATCH)


def test_underpaid_with_quote_stripped_from_accepted(attack):
    body = chat_body("underpay me, and drop the quote")
    required, offer = attack.offer(body)
    cheaper = str(int(offer["amount"]) - 1)
    accepted = {**offer, "amount": cheaper, "extra": {k: v for k, v in offer["extra"].items() if k != "quote"}}
    payload = authorize(attack.payer, offer, value=cheaper)
    attack.refused(attack.send(body, envelope(required, accepted, payload)), 402, VALUE_MISMATCH)


def test_overpaid_resigned(attack):
    body = chat_body("overpay me")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer, value=int(offer["amount"]) + 1)
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, VALUE_MISMATCH)


def test_wrong_recipient_resigned(attack):
    body = chat_body("pay someone else")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer, to=Account.create().address)
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, RECIPIENT_MISMATCH)


def test_wrong_recipient_in_accepted_too(attack):
    body = chat_body("pay someone else, consistently")
    required, offer = attack.offer(body)
    other = Account.create().address
    payload = authorize(attack.payer, offer, to=other)
    attack.refused(attack.send(body, envelope(required, {**offer, "payTo": other}, payload)), 402, RECIPIENT_MISMATCH)


def test_wrong_token_in_accepted(attack):
    body = chat_body("pay in another token")
    required, offer = attack.offer(body)
    other_token = Account.create().address
    payload = authorize(attack.payer, offer, token=other_token)
    accepted = {**offer, "asset": other_token}
    attack.refused(attack.send(body, envelope(required, accepted, payload)), 402, ASSET_MISMATCH)


def test_signature_over_another_tokens_domain(attack):
    body = chat_body("sign for another token")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer, token=Account.create().address)
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, BAD_SIGNATURE)


def test_wrong_chain_in_accepted(attack):
    body = chat_body("pay on mainnet")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer, chain_id=1)
    attack.refused(
        attack.send(body, envelope(required, {**offer, "network": "eip155:1"}, payload)), 402, INVALID_NETWORK
    )


def test_signature_over_chain_id_1(attack):
    body = chat_body("sign for mainnet")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer, chain_id=1)
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, BAD_SIGNATURE)


# -- validity window --------------------------------------------------------------------------------


def test_expired_authorization_resigned(attack):
    body = chat_body("too late")
    required, offer = attack.offer(body)
    now = int(time.time())
    payload = authorize(attack.payer, offer, validAfter=now - 600, validBefore=now - 10)
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, EXPIRED)


def test_authorization_expiring_within_the_safety_margin(attack):
    body = chat_body("almost too late")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer, validBefore=int(time.time()) + 2)
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, EXPIRED)


def test_not_yet_valid_authorization_resigned(attack):
    body = chat_body("too early")
    required, offer = attack.offer(body)
    now = int(time.time())
    payload = authorize(attack.payer, offer, validAfter=now + 3600, validBefore=now + 7200)
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, NOT_YET_VALID)


# -- forged signatures --------------------------------------------------------------------------------


def test_signed_by_another_key(attack):
    body = chat_body("forged by a stranger")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer, signer=Account.create())
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, BAD_SIGNATURE)


@pytest.mark.parametrize("v", [None, 27, 28], ids=["random-v", "v27", "v28"])
def test_random_65_byte_signature(attack, v):
    body = chat_body(f"random signature {v}")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer)
    raw = bytearray(secrets.token_bytes(65))
    if v is not None:
        raw[64] = v
    payload["signature"] = "0x" + raw.hex()
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, BAD_SIGNATURE)


def test_high_s_twin_of_a_valid_signature(attack):
    body = chat_body("malleated signature")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer)
    payload["signature"] = "0x" + high_s_twin(bytes.fromhex(payload["signature"][2:])).hex()
    attack.refused(attack.send(body, envelope(required, offer, payload)), 402, BAD_SIGNATURE)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda sig: sig[:-2],  # 64 bytes
        lambda sig: sig + "00",  # 66 bytes
        lambda sig: "0x",  # empty
        lambda sig: sig[:-1],  # odd number of hex digits
        lambda sig: sig + "0",
    ],
    ids=["64-bytes", "66-bytes", "empty", "odd-hex-short", "odd-hex-long"],
)
def test_signature_of_wrong_length(attack, mangle):
    body = chat_body("signature of the wrong length")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer)
    payload["signature"] = mangle(payload["signature"])
    attack.refused(attack.send(body, envelope(required, offer, payload)), {400, 402}, BAD_SIGNATURE, INVALID_PAYLOAD)


# -- replay of a settled nonce -------------------------------------------------------------------------


def test_nonce_already_settled_resigned_for_a_new_request(attack):
    first = chat_body("the first call")
    required, offer = attack.offer(first)
    payload = authorize(attack.payer, offer)
    r = attack.send(first, envelope(required, offer, payload))
    assert r.status_code == 200, r.text
    wait_receipt(attack.gateway.url, r.headers["x-tollway-receipt"])
    after_first = attack.funded - int(offer["amount"])

    second = chat_body("a second, different call")
    required2, offer2 = attack.offer(second)
    replay = authorize(attack.payer, offer2, nonce=payload["authorization"]["nonce"])
    r2 = attack.send(second, envelope(required2, offer2, replay))
    assert r2.status_code == 402, r2.text
    assert error_code(r2) == NONCE_USED
    rows = attack.rows()
    assert [row["state"] for row in rows] == ["settled"], rows
    time.sleep(SETTLE_WAIT)
    assert attack.chain.balance(attack.payer.address) == after_first


# -- malformed headers ------------------------------------------------------------------------------


def _valid_doc(attack: Attack, body: dict[str, Any]) -> dict[str, Any]:
    """A genuine payment (the gateway's own client signer), to be tampered with."""
    required, offer = attack.offer(body)
    return exact_payment(attack.payer, required, offer)


@pytest.mark.parametrize(
    "value",
    ["!!!not base64!!!", "eyJ4NDAy", "%%%", "e30=e30="],
    ids=["punctuation", "truncated", "percent", "padding-inside"],
)
def test_malformed_base64(attack, value):
    body = chat_body("malformed base64")
    attack.refused(attack.send(body, value), 400, INVALID_PAYLOAD)


@pytest.mark.parametrize(
    "raw", [b"hello world", b"{not json", b"\xff\xfe\x00garbage"], ids=["text", "broken", "binary"]
)
def test_base64_of_non_json(attack, raw):
    body = chat_body("base64 of non-JSON")
    attack.refused(attack.send(body, base64.b64encode(raw).decode()), 400, INVALID_PAYLOAD)


@pytest.mark.parametrize("doc", [[1, 2], "x402", 2, None, True], ids=["array", "string", "number", "null", "bool"])
def test_json_that_is_not_an_object(attack, doc):
    body = chat_body("JSON that is not an object")
    attack.refused(attack.send(body, b64json(doc)), 400, INVALID_PAYLOAD)


MISSING = {
    "accepted": lambda d: d.pop("accepted"),
    "payload": lambda d: d.pop("payload"),
    "accepted.scheme": lambda d: d["accepted"].pop("scheme"),
    "accepted.network": lambda d: d["accepted"].pop("network"),
    "accepted.amount": lambda d: d["accepted"].pop("amount"),
    "payload.signature": lambda d: d["payload"].pop("signature"),
    "payload.authorization": lambda d: d["payload"].pop("authorization"),
    "authorization.from": lambda d: d["payload"]["authorization"].pop("from"),
    "authorization.to": lambda d: d["payload"]["authorization"].pop("to"),
    "authorization.value": lambda d: d["payload"]["authorization"].pop("value"),
    "authorization.validAfter": lambda d: d["payload"]["authorization"].pop("validAfter"),
    "authorization.validBefore": lambda d: d["payload"]["authorization"].pop("validBefore"),
    "authorization.nonce": lambda d: d["payload"]["authorization"].pop("nonce"),
}


@pytest.mark.parametrize("field", list(MISSING))
def test_missing_field(attack, field):
    body = chat_body(f"missing {field}")
    doc = _valid_doc(attack, body)
    MISSING[field](doc)
    attack.refused(attack.send(body, doc), 400, INVALID_PAYLOAD)


def test_missing_accepted_asset(attack):
    body = chat_body("missing accepted.asset")
    doc = _valid_doc(attack, body)
    del doc["accepted"]["asset"]
    attack.refused(attack.send(body, doc), {400, 402}, INVALID_PAYLOAD, ASSET_MISMATCH)


WRONG_TYPES = {
    "value-float": lambda d: d["payload"]["authorization"].update(value=float(d["accepted"]["amount"])),
    "value-negative": lambda d: d["payload"]["authorization"].update(value="-" + d["accepted"]["amount"]),
    "value-hex": lambda d: d["payload"]["authorization"].update(value=hex(int(d["accepted"]["amount"]))),
    "value-bool": lambda d: d["payload"]["authorization"].update(value=True),
    "value-too-big": lambda d: d["payload"]["authorization"].update(value=str(2**256)),
    "validBefore-float": lambda d: d["payload"]["authorization"].update(validBefore=1e12),
    # (integers past what orjson reads as integers: read as json.loads reads them, and refused as numbers)
    "validBefore-int-below-int64": lambda d: d["payload"]["authorization"].update(validBefore=-(2**63) - 1),
    "validAfter-unicode-digits": lambda d: d["payload"]["authorization"].update(validAfter="١٢٣"),
    "nonce-too-short": lambda d: d["payload"]["authorization"].update(nonce="0x" + "ab" * 31),
    "nonce-not-hex": lambda d: d["payload"]["authorization"].update(nonce="0x" + "zz" * 32),
    "nonce-int": lambda d: d["payload"]["authorization"].update(nonce=12345),
    "from-not-hex": lambda d: d["payload"]["authorization"].update(**{"from": "x"}),
    "from-no-0x": lambda d: d["payload"]["authorization"].update(**{"from": d["payload"]["authorization"]["from"][2:]}),
    "from-not-hex-digits": lambda d: d["payload"]["authorization"].update(**{"from": "0x" + "g" * 40}),
    "to-short": lambda d: d["payload"]["authorization"].update(to=d["payload"]["authorization"]["to"][:-2]),
    "signature-int": lambda d: d["payload"].update(signature=123),
    "signature-not-hex": lambda d: d["payload"].update(signature="0x" + "zz" * 65),
    "authorization-list": lambda d: d["payload"].update(authorization=[]),
    "payload-string": lambda d: d.update(payload="payload"),
    "accepted-list": lambda d: d.update(accepted=[d["accepted"]]),
    "accepted-amount-int": lambda d: d["accepted"].update(amount=int(d["accepted"]["amount"])),
    "accepted-amount-float": lambda d: d["accepted"].update(amount=float(d["accepted"]["amount"])),
    "scheme-int": lambda d: d["accepted"].update(scheme=1),
    "network-null": lambda d: d["accepted"].update(network=None),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_types(attack, case):
    body = chat_body(f"wrong type {case}")
    doc = _valid_doc(attack, body)
    WRONG_TYPES[case](doc)
    attack.refused(attack.send(body, doc), 400, INVALID_PAYLOAD)


def test_an_authorization_value_beyond_64_bits_is_not_the_quote(attack):
    """Read exactly (not as the float 1.8e19 near it), it is refused as what it is: another amount."""
    body = chat_body("value beyond 64 bits")
    doc = _valid_doc(attack, body)
    doc["payload"]["authorization"]["value"] = 2**64
    attack.refused(attack.send(body, doc), 402, "invalid_exact_evm_payload_authorization_value_mismatch")


@pytest.mark.parametrize("version", [3, 1, "2", None], ids=["3", "1", "string-2", "null"])
def test_x402_version_other_than_2(attack, version):
    body = chat_body(f"x402Version {version}")
    doc = _valid_doc(attack, body)
    doc["x402Version"] = version
    attack.refused(attack.send(body, doc), 400, INVALID_VERSION)


def test_unknown_scheme(attack):
    body = chat_body("unknown scheme")
    doc = _valid_doc(attack, body)
    doc["accepted"]["scheme"] = "deferred"
    attack.refused(attack.send(body, doc), 402, UNSUPPORTED_SCHEME)


@pytest.mark.parametrize("network", ["eip155:31337", "base-sepolia", "anvil"])
def test_x_payment_v1_header_on_a_chain_without_a_v1_name(attack, network):
    """Chain 31337 has no x402 v1 name, so nothing may be paid through X-PAYMENT here."""
    body = chat_body(f"v1 payment as {network}")
    _required, offer = attack.offer(body)
    doc = {"x402Version": 1, "scheme": "exact", "network": network, "payload": authorize(attack.payer, offer)}
    attack.refused(attack.send(body, doc, header="X-PAYMENT"), {400, 402}, INVALID_NETWORK, INVALID_PAYLOAD)


# -- quotes --------------------------------------------------------------------------------------------


def test_proof_for_a_cheaper_request(attack):
    cheap = chat_body("hi")
    required, offer = attack.offer(cheap)
    payload = authorize(attack.payer, offer)
    dear = chat_body("hi " + "and a much longer prompt " * 40)
    assert int(attack.offer(dear)[1]["amount"]) > int(offer["amount"])
    attack.refused(attack.send(dear, envelope(required, offer, payload)), 402, QUOTE_MISMATCH)


@pytest.mark.parametrize("shift", [-10_000, +10_000], ids=["expiry-in-the-past", "expiry-extended"])
def test_quote_with_tampered_expiry(attack, shift):
    body = chat_body(f"tampered quote expiry {shift}")
    required, offer = attack.offer(body)
    expires, mac = offer["extra"]["quote"].split(".", 1)
    accepted = {**offer, "extra": {**offer["extra"], "quote": f"{int(expires) + shift}.{mac}"}}
    payload = authorize(attack.payer, offer)
    attack.refused(attack.send(body, envelope(required, accepted, payload)), 402, QUOTE_MISMATCH)


@pytest.mark.parametrize(
    "token", ["", "garbage", "123.", ".abc", 42], ids=["empty", "no-dot", "no-mac", "no-exp", "int"]
)
def test_quote_token_garbage(attack, token):
    body = chat_body(f"garbage quote {token!r}")
    required, offer = attack.offer(body)
    accepted = {**offer, "extra": {**offer["extra"], "quote": token}}
    payload = authorize(attack.payer, offer)
    attack.refused(attack.send(body, envelope(required, accepted, payload)), 402, QUOTE_MISMATCH, "invalid_quote")


# -- funds ------------------------------------------------------------------------------------------


def test_payer_without_balance(attack):
    body = chat_body("I have no money")
    required, offer = attack.offer(body)
    pauper = Account.create()
    r = attack.send(body, envelope(required, offer, authorize(pauper, offer)))
    assert r.status_code == 402, r.text
    assert error_code(r) == INSUFFICIENT_FUNDS
    assert [row["state"] for row in attack.rows(pauper.address)] == ["refused"]  # never tried again
    attack.nothing_moved(pauper, 0)


def test_payer_one_unit_short(attack):
    body = chat_body("I am one unit short")
    required, offer = attack.offer(body)
    short = attack.chain.fund(int(offer["amount"]) - 1)
    r = attack.send(body, envelope(required, offer, authorize(short, offer)))
    assert r.status_code == 402, r.text
    assert error_code(r) == INSUFFICIENT_FUNDS
    attack.nothing_moved(short, int(offer["amount"]) - 1)


def test_balance_spent_by_a_settled_call_is_not_spent_again(attack):
    """A payer holding 1.5 quotes pays one call; a second call right after must be refused.

    The second check has to see the balance as it is after the first settlement (or count the
    first payment as unsettled): a served call whose settlement then reverts is a free call.
    """
    body = chat_body("spend it twice")
    _required, offer = attack.offer(body)
    quote = int(offer["amount"])
    funded = quote + quote // 2
    payer = attack.chain.fund(funded)
    required, offer = attack.offer(body)
    r1 = attack.send(body, envelope(required, offer, authorize(payer, offer)))
    assert r1.status_code == 200, r1.text
    wait_receipt(attack.gateway.url, r1.headers["x-tollway-receipt"])
    required, offer = attack.offer(body)
    r2 = attack.send(body, envelope(required, offer, authorize(payer, offer)))
    assert r2.status_code == 402, f"second call served on spent funds: {r2.status_code} {r2.text[:300]}"
    assert error_code(r2) == INSUFFICIENT_FUNDS
    time.sleep(SETTLE_WAIT)
    states = sorted(row["state"] for row in attack.rows(payer.address))
    assert states == ["refused", "settled"], states
    assert attack.chain.balance(payer.address) == funded - quote


# -- fuzz ---------------------------------------------------------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _body_cases() -> list[tuple[str, bytes, int | None]]:
    """(description, raw body, expected status or None for "anything but 5xx")."""
    msgs = [{"role": "user", "content": "fuzz"}]

    def j(doc: Any) -> bytes:
        return json.dumps(doc).encode()

    cases: list[tuple[str, bytes, int | None]] = [
        ("empty body", b"", 400),
        ("body not JSON", b"hello", 400),
        ("body truncated JSON", b'{"model": "mock/echo", "messages": [', 400),
        ("body JSON array", b"[]", 400),
        ("body JSON null", b"null", 400),
        ("body JSON string", b'"x"', 400),
        ("body JSON number", b"12", 400),
        ("body {}", b"{}", 400),
        ("body invalid UTF-8", b'{"model":"mock/echo","messages":[{"role":"user","content":"\xff\xfe"}]}', 400),
        ("messages missing", j({"model": "mock/echo"}), 400),
        ("messages empty", j({"model": "mock/echo", "messages": []}), 400),
        ("messages string", j({"model": "mock/echo", "messages": "hi"}), 400),
        ("messages numbers", j({"model": "mock/echo", "messages": [1, 2]}), None),
        ("messages without content", j({"model": "mock/echo", "messages": [{"role": "user"}]}), None),
        ("model missing", j({"messages": msgs}), 400),
        ("model empty", j({"model": "", "messages": msgs}), 400),
        ("model int", j({"model": 5, "messages": msgs}), 400),
        ("model unknown", j({"model": "nope/none", "messages": msgs}), 404),
        ("model unicode unknown", j({"model": "模型/💥", "messages": msgs}), 404),
        ("stream string", j({"model": "mock/echo", "messages": msgs, "stream": "yes"}), 400),
        ("stream int", j({"model": "mock/echo", "messages": msgs, "stream": 1}), 400),
        ("emoji content", j({"model": "mock/echo", "messages": [{"role": "user", "content": "💥🔥" * 50}]}), 402),
        ("RTL + NUL content", j({"model": "mock/echo", "messages": [{"role": "user", "content": "שלום\u0000"}]}), 402),
        (
            "lone surrogate content",
            b'{"model":"mock/echo","messages":[{"role":"user","content":"\\ud800"}]}',
            None,
        ),
        (
            "lone low surrogate in model",
            b'{"model":"mock/echo\\udfff","messages":[{"role":"user","content":"x"}]}',
            None,
        ),
        ("nested messages 100", j({"model": "mock/echo", "messages": [{"role": "user", "content": [[[]]] * 3}]}), None),
        (
            "deeply nested field",
            b'{"model":"mock/echo","messages":[{"role":"user","content":"x"}],"extra":' + _nested(5000).encode() + b"}",
            None,
        ),
        ("big prompt 1MB", j({"model": "mock/echo", "messages": [{"role": "user", "content": "a " * 500_000}]}), 402),
        ("body over the limit", b'{"model":"mock/echo","pad":"' + b"a" * (4 * 1024 * 1024 + 10) + b'"}', 413),
        ("NaN max_tokens", b'{"model":"mock/echo","messages":[{"role":"user","content":"x"}],"max_tokens":NaN}', 400),
        (
            "Infinity max_tokens",
            b'{"model":"mock/echo","messages":[{"role":"user","content":"x"}],"max_tokens":Infinity}',
            400,
        ),
        (
            "max_tokens 4299 digits",
            b'{"model":"mock/echo-large","messages":[{"role":"user","content":"x"}],"max_tokens":' + b"9" * 4299 + b"}",
            None,
        ),
    ]
    for value, expected in [
        (-1, 400),
        (0, 400),
        (1, 402),
        (2**63, None),
        (10**30, None),
        ("10", 400),
        (1.5, 400),
        (True, 400),
        (None, 402),
        ([], 400),
        ({}, 400),
    ]:
        for field in ("max_tokens", "max_completion_tokens"):
            cases.append((f"{field}={value!r}", j({"model": "mock/echo", "messages": msgs, field: value}), expected))
    return cases


POOL: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    1.5,
    10**80,
    "",
    "0x",
    "0x" + "g" * 64,
    "💥" * 10,
    "\ud800",
    [],
    {},
    [[[[]]]],
    "A" * 3000,
    "0x" + "ff" * 65,
    "eip155:31337",
    "exact",
]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, rng: random.Random) -> Any:
    doc = json.loads(json.dumps(doc))
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            return copy.deepcopy(rng.choice(POOL))
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(POOL))
    return doc


def test_fuzz_never_5xx_and_gateway_stays_healthy(attack):
    rng = random.Random(402)
    client = attack.client
    failures: list[str] = []

    def check(what: str, r: httpx.Response, expected: int | None = None) -> None:
        if r.status_code >= 500 or (expected is not None and r.status_code != expected):
            failures.append(f"{what}: {r.status_code} (expected {expected or '<500'}) {r.text[:160]!r}")

    def post(what: str, content: bytes, headers: dict[str, Any] | None = None, expected: int | None = None) -> None:
        try:
            # a fresh connection per case, so that one fault is not blamed on the next case
            r = client.post(
                CHAT,
                content=content,
                headers={"content-type": "application/json", "connection": "close", **(headers or {})},
            )
        except httpx.HTTPError as exc:  # the gateway must answer, not drop the connection
            failures.append(f"{what}: no answer ({type(exc).__name__}: {exc})")
            return
        check(what, r, expected)

    # 1. bodies, unpaid
    for what, raw, expected in _body_cases():
        post(what, raw, expected=expected)

    # 2. payment headers on a valid body
    body = chat_body("fuzz the payment header")
    raw_body = json.dumps(body).encode()
    headers: list[tuple[str, dict[str, Any]]] = [
        ("empty header", {"PAYMENT-SIGNATURE": ""}),
        ("equals only", {"PAYMENT-SIGNATURE": "===="}),
        ("latin-1 bytes", {"PAYMENT-SIGNATURE": bytes(range(0x80, 0x100))}),
        ("header 17 KB", {"PAYMENT-SIGNATURE": "A" * 17_000}),
        ("header 60 KB", {"PAYMENT-SIGNATURE": "A" * 60_000}),
        ("nested JSON list header", {"PAYMENT-SIGNATURE": b64json_raw(_nested(5000))}),
        ("nested JSON dict header", {"PAYMENT-SIGNATURE": b64json_raw('{"a":' * 3000 + "1" + "}" * 3000)}),
        ("x402Version 2 only", {"PAYMENT-SIGNATURE": b64json({"x402Version": 2})}),
        ("x402Version huge", {"PAYMENT-SIGNATURE": b64json({"x402Version": 10**100})}),
        ("x402Version 2.0", {"PAYMENT-SIGNATURE": b64json({"x402Version": 2.0, "accepted": {}, "payload": {}})}),
        (
            "unicode fields",
            {"PAYMENT-SIGNATURE": b64json({"x402Version": 2, "accepted": {"scheme": "💥", "network": "é"}})},
        ),
        ("surrogate fields", {"PAYMENT-SIGNATURE": b64json_raw('{"x402Version":2,"accepted":{"scheme":"\\ud800"}}')}),
        ("X-PAYMENT junk", {"X-PAYMENT": "junk"}),
        ("X-PAYMENT nested", {"X-PAYMENT": b64json_raw(_nested(5000))}),
        ("X-PAYMENT v1 empty", {"X-PAYMENT": b64json({"x402Version": 1})}),
        ("both headers", {"PAYMENT-SIGNATURE": "junk", "X-PAYMENT": "junk"}),
    ]
    for _ in range(20):
        n = rng.randint(1, 400)
        headers.append(("random ascii", {"PAYMENT-SIGNATURE": "".join(chr(rng.randint(33, 126)) for _ in range(n))}))
        headers.append(("random b64 bytes", {"PAYMENT-SIGNATURE": base64.b64encode(rng.randbytes(n)).decode()}))
    for what, h in headers:
        post(what, raw_body, h)

    # 3. mutated genuine payments (some stay valid and are served: fine; none may fault)
    required, offer = attack.offer(body)
    for i in range(60):
        doc = _mutate(envelope(required, offer, authorize(attack.payer, offer)), rng)
        post(f"mutated payment #{i}: {json.dumps(doc)[:120]}", raw_body, payment_header(doc))

    # 4. mutated request bodies, with and without a payment for the original
    for i in range(40):
        doc = _mutate(body, rng)
        h = payment_header(envelope(required, offer, authorize(attack.payer, offer))) if i % 2 else {}
        post(f"mutated body #{i}: {json.dumps(doc)[:120]}", json.dumps(doc).encode(), h)

    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["ok"], health.text
    assert client.post(CHAT, json=chat_body("still alive?")).status_code == 402
    assert not failures, f"{len(failures)} fuzz case(s) failed:\n" + "\n".join(failures)


def b64json_raw(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()


@contextmanager
def gateway_process(settings: Settings, workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The gateway in a process of its own, for inputs that might take a whole process down."""
    port = free_port()
    config = workdir / "settings.json"
    config.write_text(settings.model_dump_json())
    script = (
        "import sys, uvicorn\n"
        "from tollway.app import create_app\n"
        "from tollway.config import Settings\n"
        "settings = Settings.model_validate_json(open(sys.argv[1]).read())\n"
        "uvicorn.run(create_app(settings), host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')\n"
    )
    log = (workdir / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", script, str(config), str(port)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (workdir / "gateway.log").read_text()
            assert time.monotonic() < deadline, "gateway process did not start"
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def test_deeply_nested_json_body_does_not_crash_the_gateway(gateway, tmp_path):
    """A small body of nested brackets must be a 400, not a crash of the gateway's process.

    Run against a gateway in its own process: if it dies, the test run must not die with it.
    """
    settings = gateway.settings.model_copy(
        update={
            "database_url": f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
            "chain": gateway.settings.chain.model_copy(update={"settler_key": "0x" + secrets.token_hex(32)}),
        }
    )
    failures: list[str] = []
    with gateway_process(settings, tmp_path) as (url, proc):
        for depth in (1_000, 100_000, 1_000_000):
            for shape, raw, expected in [
                ("array", "[" * depth + "]" * depth, {400}),
                ("object", '{"a":' * depth + "1" + "}" * depth, {400}),
                # messages that are a (deep) list of lists: refused (400) or priced (402)
                ("in a field", '{"model":"mock/echo","messages":' + "[" * depth + "]" * depth + "}", {400, 402}),
            ]:
                if len(raw) > settings.max_body_bytes:
                    continue
                what = f"{shape} nested {depth} deep ({len(raw)} bytes)"
                try:
                    r = httpx.post(url + CHAT, content=raw, headers={"content-type": "application/json"}, timeout=30)
                    if r.status_code not in expected:
                        failures.append(f"{what}: {r.status_code} {r.text[:160]!r}")
                except httpx.HTTPError as exc:
                    with suppress(subprocess.TimeoutExpired):
                        proc.wait(2)
                    failures.append(f"{what}: no answer ({type(exc).__name__})")
                if proc.poll() is not None:
                    failures.append(f"the gateway process died (exit code {proc.returncode}) on: {what}")
                    break
            if proc.poll() is not None:
                break
        else:
            assert httpx.get(url + "/healthz").status_code == 200
    assert not failures, "\n".join(failures)


# -- non-ASCII digits where numbers go ("²".isdigit() is True in Python) ---------------------------


@pytest.mark.parametrize("field", ["amount", "quote-expiry", "quote-mac"])
def test_unicode_digits_in_the_accepted_offer(attack, field):
    body = chat_body("unicode digits")
    required, offer = attack.offer(body)
    payload = authorize(attack.payer, offer)
    expires, mac = offer["extra"]["quote"].split(".", 1)
    accepted = {
        "amount": {**offer, "amount": "²"},
        "quote-expiry": {**offer, "extra": {**offer["extra"], "quote": f"²{expires[1:]}.{mac}"}},
        "quote-mac": {**offer, "extra": {**offer["extra"], "quote": f"{expires}.é{mac[1:]}"}},
    }[field]
    attack.refused(
        attack.send(body, envelope(required, accepted, payload)), {400, 402}, INVALID_PAYLOAD, QUOTE_MISMATCH
    )


def test_unicode_digits_in_a_wallet_proof(attack):
    proof = b64json({"wallet": attack.payer.address, "validBefore": "²", "signature": "0x" + "11" * 65})
    r = attack.client.post(CHAT, json=chat_body("wallet proof with a superscript"), headers={"X-Tollway-Wallet": proof})
    assert r.status_code == 400 and error_code(r) == INVALID_PAYLOAD
    r = attack.client.get("/v1/credit", headers={"X-Tollway-Wallet": proof})
    assert r.status_code == 401 and error_code(r) == INVALID_PAYLOAD


def test_a_wallet_proof_valid_for_a_century_is_no_bearer_credential(attack, devnet):
    """A deprecated ``X-Tollway-Wallet`` proof shows the wallet's credit and receipts to whoever
    holds it: one valid far ahead would be a key for ever. At most two hours."""
    origin = attack.client.base_url
    payer = Payer(attack.payer, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    for ahead, status in ((100 * 365 * 86400, 401), (3 * 3600, 401), (3600, 200)):
        header = payer.wallet_header(str(origin), now=int(time.time()) + ahead - 3600)
        r = attack.client.get("/v1/credit", headers=header)
        assert r.status_code == status, (ahead, r.text)
        payer._proofs.clear()


def test_a_client_hanging_up_mid_body_is_no_internal_error(gateway, caplog):
    """A paid API's request whose client hangs up before its declared body is in: nothing to answer,
    and no fault of ours — the call is logged as 499, not a 500 with a traceback (one tiny connection
    each would fill the operator's error log and 5xx alerting)."""
    caplog.set_level(logging.INFO)
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model":'
        )
        time.sleep(0.2)
    eventually(lambda: any("status=499" in r.getMessage() for r in caplog.records), what="the call logged")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if "status=500" in r.getMessage()]
