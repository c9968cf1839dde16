"""Our hot-path EIP-712 digest and recovery against eth-account's generic implementation."""

import secrets

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from support import high_s_twin, transfer_typed_data
from tollway.keccak import keccak
from tollway.payments import eip3009

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def typed(auth: eip3009.Authorization, chain_id: int = 31337) -> dict:
    """``auth`` as EIP-712 typed data for eth-account, the reference implementation."""
    message = {
        "from": auth.from_,
        "to": auth.to,
        "value": auth.value,
        "validAfter": auth.valid_after,
        "validBefore": auth.valid_before,
        "nonce": auth.nonce,
    }
    return transfer_typed_data(message, token=TOKEN, chain_id=chain_id)


def make_auth(account, value: int = 12345) -> eip3009.Authorization:
    return eip3009.Authorization(
        account.address.lower(), "0x70997970c51812dc3a010c7d01b50e0d17dc79c8", value, 0, 2**40, secrets.token_bytes(32)
    )


@pytest.mark.parametrize("chain_id", [1, 31337, 84532])
def test_digest_and_recovery_match_eth_account(chain_id):
    account = Account.create()
    auth = make_auth(account)
    signed = Account.sign_message(encode_typed_data(full_message=typed(auth, chain_id)), account.key)
    domain = eip3009.domain_separator("USD Coin", "2", chain_id, TOKEN)
    assert eip3009.digest(auth, domain) == bytes(signed.message_hash)
    assert eip3009.recover(eip3009.digest(auth, domain), bytes(signed.signature)) == account.address.lower()


def test_other_domain_recovers_someone_else():
    account = Account.create()
    auth = make_auth(account)
    signed = Account.sign_message(encode_typed_data(full_message=typed(auth, 1)), account.key)
    domain = eip3009.domain_separator("USD Coin", "2", 31337, TOKEN)
    assert eip3009.recover(eip3009.digest(auth, domain), bytes(signed.signature)) != account.address.lower()


def test_malleable_and_malformed_signatures_are_refused():
    account = Account.create()
    auth = make_auth(account)
    domain = eip3009.domain_separator("USD Coin", "2", 31337, TOKEN)
    sig = bytes(Account.unsafe_sign_hash(eip3009.digest(auth, domain), account.key).signature)
    for bad in (high_s_twin(sig), sig[:64], sig + b"\0", sig[:64] + b"\x05", bytes(65)):
        with pytest.raises(eip3009.SignatureError):
            eip3009.recover(eip3009.digest(auth, domain), bad)


def test_calldata_layout():
    account = Account.create()
    auth = make_auth(account, value=7)
    domain = eip3009.domain_separator("USD Coin", "2", 31337, TOKEN)
    sig = bytes(Account.unsafe_sign_hash(eip3009.digest(auth, domain), account.key).signature)
    data = eip3009.transfer_calldata(auth, sig)
    assert data[:4].hex() == "e3ee160e"  # transferWithAuthorization(address,...,uint8,bytes32,bytes32)
    assert len(data) == 4 + 9 * 32
    assert int.from_bytes(data[4 + 64 : 4 + 96], "big") == 7


@pytest.mark.parametrize("nonce", [0, 7, 2**40])
def test_settlement_signing_matches_eth_account(nonce):
    """Byte for byte, over enough keys that some signatures' r or s start with a zero byte (which
    RLP drops) and some recover with v = 0 (which RLP writes as the empty string)."""
    from coincurve import PrivateKey

    from tollway.settlement import sign_eip1559

    data = bytes(range(256)) * 2
    for i in range(300):
        account = Account.from_key(keccak(b"settlement signing %d" % i))
        tx = {
            "type": 2,
            "chainId": 31337,
            "nonce": nonce,
            "to": TOKEN,
            "value": 0,
            "data": data[: i % 3 * 200],
            "gas": 150_000,
            "maxFeePerGas": 2 * 10**9,
            "maxPriorityFeePerGas": 10**6,
        }
        reference = account.sign_transaction(tx)
        fields = [31337, nonce, 10**6, 2 * 10**9, 150_000, bytes.fromhex(TOKEN[2:]), 0, tx["data"], []]
        tx_hash, raw = sign_eip1559(PrivateKey(bytes(account.key)), fields)
        assert (tx_hash, raw) == ("0x" + bytes(reference.hash).hex(), "0x" + bytes(reference.raw_transaction).hex())
