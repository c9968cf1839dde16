"""Sign-in recovery (EIP-191 over the EIP-4361 text) on hostile signatures."""

from __future__ import annotations

from eth_account import Account

from tollway import siwe
from tollway.payments.eip3009 import SECP256K1_N

INFO = {
    "domain": "gateway.example",
    "uri": "https://gateway.example/v1/chat/completions",
    "version": "1",
    "nonce": "n0nce",
    "issuedAt": "2026-11-30T00:00:00.000Z",
    "statement": "Sign in",
}


def test_a_sign_in_recovers_its_signer_and_nothing_else():
    account = Account.create()
    signed = siwe.sign(account, INFO, "eip155:31337")
    assert siwe.recover(signed) == account.address.lower()

    sig = bytes.fromhex(signed["signature"][2:])
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    high_s = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # the same key's malleable twin
    hostile = ["0x" + high_s.hex(), signed["signature"][:-2], "0xzz" + signed["signature"][4:], "", "0x" + "00" * 65]
    assert [siwe.recover({**signed, "signature": h}) for h in hostile] == [None] * len(hostile)
    assert siwe.recover({**signed, "nonce": "another"}) != account.address.lower()  # a changed field
