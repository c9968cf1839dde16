"""tollway's own EIP-712 messages, hashed by hand for speed: the digest equals eth-account's
typed-data encoding of the same message, for every kind; a signature made by eth-account's own
signer verifies; a forged, cut or malleable (high-s) one does not."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from support import high_s_twin
from tollway.errors import PaymentInvalid, PaymentMalformed
from tollway.payments import signed

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
ORIGIN = "https://gw.example"
WALLET = Account.create()
MESSAGES = {
    "WalletProof": {"wallet": WALLET.address, "origin": ORIGIN, "validBefore": "1900000000"},
    "CreditPayment": {
        "wallet": WALLET.address,
        "origin": ORIGIN,
        "amount": "12345",
        "request": "0x" + "ab" * 32,
        "nonce": "0x" + "01" * 32,
        "validBefore": "1900000000",
    },
    "Withdrawal": {
        "wallet": WALLET.address,
        "origin": ORIGIN,
        "amount": str(2**255),
        "nonce": "0x" + "02" * 32,
        "validBefore": "1900000000",
    },
    "TransferClaim": {
        "wallet": WALLET.address,
        "origin": "https://gw.example/ünïcode",
        "transaction": "0x" + "cd" * 32,
        "request": "0x" + "ef" * 32,
    },
}
DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def reference(kind: str, chain_id: int, message: dict) -> object:
    """The message as eth-account encodes EIP-712 typed data."""
    return encode_typed_data(
        full_message={
            "types": {"EIP712Domain": DOMAIN_TYPE, kind: signed.TYPES[kind]},
            "primaryType": kind,
            "domain": {"name": "tollway", "version": "2", "chainId": chain_id, "verifyingContract": TOKEN},
            "message": signed._normalise(kind, message),
        }
    )


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@pytest.mark.parametrize("chain_id", [1, 31337, 8453])
def test_the_digest_is_eip712s_and_eth_accounts_signatures_verify(kind, chain_id):
    message = MESSAGES[kind]
    typed = reference(kind, chain_id, message)
    ours = signed.digest(kind, chain_id, TOKEN, signed._normalise(kind, message))
    assert ours == Account.sign_message(typed, WALLET.key).message_hash
    signature = "0x" + bytes(Account.sign_message(typed, WALLET.key).signature).hex()
    origin = ORIGIN if kind != "TransferClaim" else "https://gw.example/ünïcode"
    assert signed.signer(kind, chain_id, TOKEN, message, signature, origin) == WALLET.address.lower()
    assert signed.sign(kind, WALLET.key, chain_id, TOKEN, message) == signature  # (our signer: the same bytes)


def test_forged_cut_and_malleable_signatures_do_not_verify_as_the_wallet():
    message = MESSAGES["CreditPayment"]
    good = signed.sign("CreditPayment", WALLET.key, 31337, TOKEN, message)
    other = signed.sign("CreditPayment", Account.create().key, 31337, TOKEN, message)
    assert signed.signer("CreditPayment", 31337, TOKEN, message, other, ORIGIN) != WALLET.address.lower()
    assert signed.signer("CreditPayment", 1, TOKEN, message, good, ORIGIN) != WALLET.address.lower()  # other chain
    twin = "0x" + high_s_twin(bytes.fromhex(good[2:])).hex()
    for bad in (twin, good[:-2], "0x" + "00" * 65):
        with pytest.raises(PaymentMalformed):
            signed.signer("CreditPayment", 31337, TOKEN, message, bad, ORIGIN)
    with pytest.raises(PaymentInvalid):
        signed.signer("CreditPayment", 31337, TOKEN, message, good, "https://another.example")
    for huge in ("9" * 79, "9" * 4400):  # (beyond uint256; beyond what int() reads)
        with pytest.raises(PaymentMalformed):
            signed.signer("CreditPayment", 31337, TOKEN, {**message, "validBefore": huge}, good, ORIGIN)
