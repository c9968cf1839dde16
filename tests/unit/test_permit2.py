"""tollway.payments.permit2 (x402 upto over Permit2) against independent references: eth-account's
generic EIP-712 encoder fed the SDK's own types, the SDK's upto client, and web3's ABI encoder fed
the SDK's proxy ABIs."""

from __future__ import annotations

import copy
import secrets

import pytest
from eth_account import Account
from eth_account._utils.encode_typed_data.encoding_and_hashing import encode_type
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from web3 import Web3
from x402.mechanisms.evm.constants import (
    PERMIT2_ADDRESS,
    UPTO_PERMIT2_WITNESS_TYPES,
    X402_UPTO_PERMIT2_PROXY_ABI,
    X402_UPTO_PERMIT2_PROXY_ADDRESS,
    X402_UPTO_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI,
)
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequirements

from support import high_s_twin
from tollway.errors import PaymentMalformed
from tollway.payments import permit2

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAYEE = "0x70997970C51812dc3A010C7d01b50e0d17dC79C8"
FACILITATOR = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
cs = Web3.to_checksum_address


def make_auth(owner: str, max_amount: int = 5_000_000, **over) -> permit2.UptoAuthorization:
    fields = {
        "owner": owner.lower(),
        "token": TOKEN.lower(),
        "max_amount": max_amount,
        "spender": permit2.UPTO_PROXY_ADDRESS.lower(),
        "nonce": secrets.randbits(256),
        "deadline": 1_900_000_000,
        "to": PAYEE.lower(),
        "facilitator": FACILITATOR.lower(),
        "valid_after": 0,
    }
    return permit2.UptoAuthorization(**{**fields, **over})


def typed(auth: permit2.UptoAuthorization, chain_id: int) -> dict:
    """``auth`` as the SDK builds it for signing: its witness types, the Permit2 domain without version."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            **UPTO_PERMIT2_WITNESS_TYPES,
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2_ADDRESS},
        "message": {
            "permitted": {"token": cs(auth.token), "amount": auth.max_amount},
            "spender": cs(auth.spender),
            "nonce": auth.nonce,
            "deadline": auth.deadline,
            "witness": {"to": cs(auth.to), "facilitator": cs(auth.facilitator), "validAfter": auth.valid_after},
        },
    }


def test_constants_match_the_sdk() -> None:
    assert permit2.PERMIT2_ADDRESS == PERMIT2_ADDRESS
    assert permit2.UPTO_PROXY_ADDRESS == X402_UPTO_PERMIT2_PROXY_ADDRESS
    # The full type the SDK signs = Permit2's stub + the witness type string the proxy passes.
    full = encode_type("PermitWitnessTransferFrom", UPTO_PERMIT2_WITNESS_TYPES)
    stub = "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
    assert full == stub + permit2.WITNESS_TYPE_STRING
    assert keccak(full.encode()) == permit2.PERMIT_WITNESS_TYPEHASH


@pytest.mark.parametrize("chain_id", [1, 31337, 84532])
def test_digest_and_recovery_match_eth_account(chain_id: int) -> None:
    account = Account.create()
    auth = make_auth(account.address)
    signed = Account.sign_message(encode_typed_data(full_message=typed(auth, chain_id)), account.key)
    assert permit2.digest(auth, permit2.domain_separator(chain_id)) == bytes(signed.message_hash)
    assert permit2.signer(auth, bytes(signed.signature), chain_id) == account.address.lower()
    # The domain separator is Permit2's (eth-account's header is the domain separator).
    assert permit2.domain_separator(chain_id) == encode_typed_data(full_message=typed(auth, chain_id)).header


def test_every_field_is_signed() -> None:
    account = Account.create()
    auth = make_auth(account.address)
    sig = bytes(Account.sign_message(encode_typed_data(full_message=typed(auth, 31337)), account.key).signature)
    other = "0x" + "ab" * 20
    for change in (
        {"token": other},
        {"max_amount": auth.max_amount + 1},
        {"spender": other},
        {"nonce": auth.nonce ^ 1},
        {"deadline": auth.deadline + 1},
        {"to": other},
        {"facilitator": other},
        {"valid_after": 1},
    ):
        forged = permit2.UptoAuthorization(**{**auth.__dict__, **change})
        assert permit2.signer(forged, sig, 31337) != account.address.lower(), change
    assert permit2.signer(auth, sig, 1) != account.address.lower()  # another chain


def test_malleable_and_malformed_signatures_are_refused() -> None:
    account = Account.create()
    auth = make_auth(account.address)
    sig = bytes(Account.unsafe_sign_hash(permit2.digest(auth, permit2.domain_separator(31337)), account.key).signature)
    for bad in (high_s_twin(sig), sig[:64], sig + b"\0", sig[:64] + b"\x05", bytes(65)):
        with pytest.raises(permit2.SignatureError):
            permit2.signer(auth, bad, 31337)


def requirements(amount: int = 2_500_000) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="upto",
        network="eip155:31337",
        asset=TOKEN,
        amount=str(amount),
        pay_to=PAYEE,
        max_timeout_seconds=300,
        extra={"name": "USD Coin", "version": "2", "facilitatorAddress": FACILITATOR, "assetTransferMethod": "permit2"},
    )


def test_sdk_client_payload_decodes_and_recovers_its_signer() -> None:
    account = Account.create()
    payload = UptoEvmClientScheme(account).create_payment_payload(requirements())
    assert set(payload) == {"permit2Authorization", "signature"}
    auth, sig = permit2.decode_payload(payload)
    assert auth.owner == account.address.lower()
    assert (auth.token, auth.max_amount, auth.spender) == (TOKEN.lower(), 2_500_000, permit2.UPTO_PROXY_ADDRESS.lower())
    assert (auth.to, auth.facilitator, auth.valid_after) == (PAYEE.lower(), FACILITATOR.lower(), 0)
    assert auth.nonce == int(payload["permit2Authorization"]["nonce"])
    assert permit2.signer(auth, sig, 31337) == account.address.lower()


def test_calldata_matches_web3_abi_encoding() -> None:
    account = Account.create()
    payload = UptoEvmClientScheme(account).create_payment_payload(requirements())
    auth, sig = permit2.decode_payload(payload)
    w3 = Web3()
    permit = ((cs(auth.token), auth.max_amount), auth.nonce, auth.deadline)
    witness = (cs(auth.to), cs(auth.facilitator), auth.valid_after)
    for amount in (1, 1234, auth.max_amount):
        proxy = w3.eth.contract(address=X402_UPTO_PERMIT2_PROXY_ADDRESS, abi=X402_UPTO_PERMIT2_PROXY_ABI)
        expected = proxy.encode_abi("settle", args=[permit, amount, cs(auth.owner), witness, sig])
        assert "0x" + permit2.settle_calldata(auth, amount, sig).hex() == expected

    eip2612_sig = bytes(Account.unsafe_sign_hash(secrets.token_bytes(32), account.key).signature)
    p2612 = permit2.Eip2612Permit(auth.owner, auth.token, auth.max_amount, 1_900_000_000, eip2612_sig)
    proxy = w3.eth.contract(address=X402_UPTO_PERMIT2_PROXY_ADDRESS, abi=X402_UPTO_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI)
    p2612_tuple = (p2612.value, p2612.deadline, eip2612_sig[:32], eip2612_sig[32:64], eip2612_sig[64])
    expected = proxy.encode_abi("settleWithPermit", args=[p2612_tuple, permit, 77, cs(auth.owner), witness, sig])
    assert "0x" + permit2.settle_with_permit_calldata(p2612, auth, 77, sig).hex() == expected


def test_calldata_refuses_amounts_outside_the_permit() -> None:
    auth = make_auth(Account.create().address, max_amount=100)
    sig = bytes(65)
    for amount in (0, 101):
        with pytest.raises(ValueError):
            permit2.settle_calldata(auth, amount, sig)
    with pytest.raises(ValueError):
        permit2.settle_with_permit_calldata(permit2.Eip2612Permit(auth.owner, auth.token, 99, 1, sig), auth, 5, sig)


GOOD = {
    "permit2Authorization": {
        "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
        "permitted": {"token": TOKEN, "amount": "5000000"},
        "spender": X402_UPTO_PERMIT2_PROXY_ADDRESS,
        "nonce": "33247007178036348590600198031289925668252061821958005840077069883511451257277",
        "deadline": "1740672154",
        "witness": {"to": PAYEE, "facilitator": FACILITATOR, "validAfter": "0"},
    },
    "signature": "0x" + "11" * 65,
}


def test_decode_payload_accepts_the_spec_shapes() -> None:
    auth, sig = permit2.decode_payload(GOOD)
    assert auth.nonce == int(GOOD["permit2Authorization"]["nonce"]) and sig == b"\x11" * 65
    hex_nonce = copy.deepcopy(GOOD)  # the spec's example writes the nonce in hex
    hex_nonce["permit2Authorization"]["nonce"] = "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"
    assert (
        permit2.decode_payload(hex_nonce)[0].nonce == 0xF3746613C2D920B5FDABC0856F2AEB2D4F88EE6037B8CC5D04A71A4462F13480
    )


def _mutated(path: tuple[str, ...], value: object) -> dict:
    doc = copy.deepcopy(GOOD)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


A = ("permit2Authorization",)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"signature": GOOD["signature"]},
        _mutated(A, "x"),
        _mutated((*A, "from"), KeyError),
        _mutated((*A, "from"), "0x1234"),
        _mutated((*A, "permitted"), [TOKEN, "1"]),
        _mutated((*A, "permitted", "amount"), 5000000),  # numbers are strings
        _mutated((*A, "permitted", "amount"), "-1"),
        _mutated((*A, "permitted", "amount"), "1e6"),
        _mutated((*A, "permitted", "amount"), str(2**256)),
        _mutated((*A, "nonce"), "0x" + "f" * 65),
        _mutated((*A, "deadline"), "0x10"),  # hex only for the nonce
        _mutated((*A, "witness"), KeyError),
        _mutated((*A, "witness", "facilitator"), KeyError),
        _mutated((*A, "witness", "validAfter"), None),
        _mutated(("signature",), KeyError),
        _mutated(("signature",), "0x"),
        _mutated(("signature",), "0x123"),
        _mutated(("signature",), "11" * 65),
    ],
)
def test_decode_payload_is_strict(doc: object) -> None:
    with pytest.raises(PaymentMalformed):
        permit2.decode_payload(doc)


def test_decode_eip2612_permit() -> None:
    info = {
        "from": GOOD["permit2Authorization"]["from"],
        "asset": TOKEN,
        "spender": PERMIT2_ADDRESS,
        "amount": "5000000",
        "nonce": "0",
        "deadline": "1740672154",
        "signature": "0x" + "22" * 65,
        "version": "1",
    }
    got = permit2.decode_eip2612_permit({"eip2612GasSponsoring": {"info": info}})
    assert got == permit2.Eip2612Permit(info["from"].lower(), TOKEN.lower(), 5_000_000, 1740672154, b"\x22" * 65)
    assert permit2.decode_eip2612_permit(None) is None
    assert permit2.decode_eip2612_permit({}) is None
    assert permit2.decode_eip2612_permit({"eip2612GasSponsoring": {"info": {"version": "1"}}}) is None  # a declaration
    for bad in ({**info, "spender": PAYEE}, {**info, "signature": "0x22"}, {**info, "amount": 5}):
        with pytest.raises(PaymentMalformed):
            permit2.decode_eip2612_permit({"eip2612GasSponsoring": {"info": bad}})
