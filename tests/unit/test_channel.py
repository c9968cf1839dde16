"""tollway.payments.channel (x402 batch-settlement) against independent references: the official x402
SDK's own batch-settlement EIP-712 code and client, eth-account's generic EIP-712 encoder fed the SDK's
types, and web3's ABI encoder fed the SDK's escrow ABI."""

from __future__ import annotations

import copy
import secrets
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from web3 import Web3
from x402.mechanisms.evm.batch_settlement import constants as bs
from x402.mechanisms.evm.batch_settlement.abi import BATCH_SETTLEMENT_ABI
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementEvmScheme,
    create_batch_settlement_eip3009_deposit_payload,
    create_batch_settlement_permit2_deposit_payload,
    sign_voucher,
)
from x402.mechanisms.evm.batch_settlement.encoding import (
    build_eip2612_permit_data,
    build_erc3009_collector_data,
    build_erc3009_deposit_nonce,
    build_permit2_collector_data,
)
from x402.mechanisms.evm.batch_settlement.facilitator.claim import build_voucher_claim_args
from x402.mechanisms.evm.batch_settlement.facilitator.utils import to_contract_channel_config
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as SdkConfig
from x402.mechanisms.evm.batch_settlement.types import VoucherClaim
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id, get_batch_settlement_eip712_domain
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequirements

from support import high_s_twin
from tollway.errors import PaymentMalformed
from tollway.payments import channel, permit2

CHAIN = 31337
NETWORK = f"eip155:{CHAIN}"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
RECEIVER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
cs = Web3.to_checksum_address
ESCROW = Web3().eth.contract(address=channel.BATCH_SETTLEMENT_ADDRESS, abi=BATCH_SETTLEMENT_ABI)

DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def test_constants_are_the_sdks() -> None:
    assert channel.BATCH_SETTLEMENT_ADDRESS == bs.BATCH_SETTLEMENT_ADDRESS
    assert channel.ERC3009_DEPOSIT_COLLECTOR_ADDRESS == bs.ERC3009_DEPOSIT_COLLECTOR_ADDRESS
    assert channel.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS == bs.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS
    assert (channel.MIN_WITHDRAW_DELAY, channel.MAX_WITHDRAW_DELAY) == (bs.MIN_WITHDRAW_DELAY, bs.MAX_WITHDRAW_DELAY)
    assert (channel.DOMAIN_NAME, channel.DOMAIN_VERSION) == (
        bs.BATCH_SETTLEMENT_DOMAIN_NAME,
        bs.BATCH_SETTLEMENT_DOMAIN_VERSION,
    )
    assert channel.CHANNEL_CONFIG_TYPEHASH == bs.CHANNEL_CONFIG_TYPEHASH


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def payer() -> Any:
    return Account.create()


@pytest.fixture
def authorizer() -> Any:
    return Account.create()


def make_config(payer: str, receiver_authorizer: str, **over: Any) -> channel.ChannelConfig:
    fields: dict[str, Any] = {
        "payer": payer.lower(),
        "payer_authorizer": payer.lower(),
        "receiver": RECEIVER.lower(),
        "receiver_authorizer": receiver_authorizer.lower(),
        "token": TOKEN.lower(),
        "withdraw_delay": 900,
        "salt": secrets.token_bytes(32),
    }
    return channel.ChannelConfig(**{**fields, **over})


def sdk_config(c: channel.ChannelConfig) -> SdkConfig:
    return SdkConfig(
        payer=cs(c.payer),
        payer_authorizer=cs(c.payer_authorizer),
        receiver=cs(c.receiver),
        receiver_authorizer=cs(c.receiver_authorizer),
        token=cs(c.token),
        withdraw_delay=c.withdraw_delay,
        salt="0x" + c.salt.hex(),
    )


def generic_digest(primary: str, types: dict[str, list[dict[str, str]]], message: dict[str, Any]) -> bytes:
    """eth-account's generic EIP-712 encoder (full-message form), on the SDK's types and domain."""
    signable = encode_typed_data(
        full_message={
            "types": {"EIP712Domain": DOMAIN_TYPE, **types},
            "primaryType": primary,
            "domain": get_batch_settlement_eip712_domain(CHAIN),
            "message": message,
        }
    )
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def requirements(authorizer: str, method: str | None = None, amount: int = 1_000) -> PaymentRequirements:
    extra: dict[str, Any] = {"receiverAuthorizer": authorizer, "withdrawDelay": 900, "name": "USD Coin", "version": "2"}
    if method:
        extra["assetTransferMethod"] = method
    return PaymentRequirements(
        scheme="batch-settlement",
        network=NETWORK,
        asset=TOKEN,
        amount=str(amount),
        pay_to=RECEIVER,
        max_timeout_seconds=300,
        extra=extra,
    )


# -- channel id and digests ---------------------------------------------------------------------------


def test_channel_id_is_the_sdks(payer: Any, authorizer: Any) -> None:
    for over in ({}, {"payer_authorizer": channel.ZERO_ADDRESS}, {"withdraw_delay": 2_592_000}):
        config = make_config(payer.address, authorizer.address, **over)
        cid = channel.channel_id(config, CHAIN)
        assert "0x" + cid.hex() == compute_channel_id(sdk_config(config), NETWORK)
        assert "0x" + cid.hex() == compute_channel_id(sdk_config(config), CHAIN) and len(cid) == 32
        message = {
            "payer": cs(config.payer),
            "payerAuthorizer": cs(config.payer_authorizer),
            "receiver": cs(config.receiver),
            "receiverAuthorizer": cs(config.receiver_authorizer),
            "token": cs(config.token),
            "withdrawDelay": config.withdraw_delay,
            "salt": config.salt,
        }
        assert cid == generic_digest("ChannelConfig", bs.CHANNEL_CONFIG_TYPES, message)
    # The id binds the chain, the escrow and every field.
    config = make_config(payer.address, authorizer.address)
    assert channel.channel_id(config, CHAIN) != channel.channel_id(config, 8453)
    assert channel.domain_separator(CHAIN) != channel.domain_separator(CHAIN, RECEIVER)
    for field, value in (("salt", bytes(32)), ("withdraw_delay", 901), ("receiver", authorizer.address.lower())):
        other = channel.ChannelConfig(**{**config.__dict__, field: value})
        assert channel.channel_id(other, CHAIN) != channel.channel_id(config, CHAIN)


def test_voucher_digest_and_signer_are_the_sdks(payer: Any, authorizer: Any) -> None:
    config = make_config(payer.address, authorizer.address)
    cid = channel.channel_id(config, CHAIN)
    sdk_voucher = sign_voucher(EthAccountSigner(payer), "0x" + cid.hex(), 123_456, NETWORK)
    voucher = channel.Voucher(cid, 123_456, bytes.fromhex(sdk_voucher.signature[2:]))
    assert channel.voucher_signer(voucher, CHAIN) == payer.address.lower()
    digest = channel.voucher_digest(cid, 123_456, CHAIN)
    assert digest == generic_digest("Voucher", bs.VOUCHER_TYPES, {"channelId": cid, "maxClaimableAmount": 123_456})
    # Another amount, channel or chain recovers to someone else; a malleable twin is refused.
    assert channel.voucher_signer(channel.Voucher(cid, 123_457, voucher.signature), CHAIN) != payer.address.lower()
    assert channel.voucher_signer(voucher, 1) != payer.address.lower()
    with pytest.raises(channel.SignatureError):
        channel.voucher_signer(channel.Voucher(cid, 123_456, high_s_twin(voucher.signature)), CHAIN)


def test_refund_and_claim_batch_digests_are_the_sdks(payer: Any, authorizer: Any) -> None:
    auth_signer = LocalAuthorizerSigner(authorizer)
    config = make_config(payer.address, authorizer.address)
    cid = channel.channel_id(config, CHAIN)

    sig = sign_refund(auth_signer, "0x" + cid.hex(), "700", "3", NETWORK)
    digest = channel.refund_digest(cid, 3, 700, CHAIN)
    assert channel.recover(digest, bytes.fromhex(sig[2:])) == authorizer.address.lower()
    assert digest == generic_digest("Refund", bs.REFUND_TYPES, {"channelId": cid, "nonce": 3, "amount": 700})

    configs = [config, make_config(Account.create().address, authorizer.address), config]
    claims = [channel.Claim(c, 5_000 + i, secrets.token_bytes(65), 4_000 + i) for i, c in enumerate(configs)]
    sdk_claims = [
        VoucherClaim(sdk_config(c.config), str(c.max_claimable), "0x" + c.signature.hex(), str(c.total_claimed))
        for c in claims
    ]
    sig = sign_claim_batch(auth_signer, sdk_claims, NETWORK)
    digest = channel.claim_batch_digest(claims, CHAIN)
    assert channel.recover(digest, bytes.fromhex(sig[2:])) == authorizer.address.lower()
    entries = [
        {
            "channelId": channel.channel_id(c.config, CHAIN),
            "maxClaimableAmount": c.max_claimable,
            "totalClaimed": c.total_claimed,
        }
        for c in claims
    ]
    assert digest == generic_digest("ClaimBatch", bs.CLAIM_BATCH_TYPES, {"claims": entries})
    # The order of the rows and each number are signed.
    assert channel.claim_batch_digest(claims[::-1], CHAIN) != digest
    bumped = [*claims[:2], channel.Claim(configs[2], 5_002, claims[2].signature, 4_003)]
    assert channel.claim_batch_digest(bumped, CHAIN) != digest
    # The three kinds of messages can never be confused: distinct type hashes.
    assert len({channel.VOUCHER_TYPEHASH, channel.REFUND_TYPEHASH, channel.CLAIM_BATCH_TYPEHASH}) == 3


def test_deposit_digests_are_what_the_sdk_client_signs(payer: Any, authorizer: Any) -> None:
    config = make_config(payer.address, authorizer.address)
    cid = channel.channel_id(config, CHAIN)
    signer = EthAccountSigner(payer)
    sdk_erc = create_batch_settlement_eip3009_deposit_payload(
        signer, requirements(authorizer.address), sdk_config(config), 50_000, 1_000
    ).to_dict()
    p = channel.decode_payload(sdk_erc)
    assert p.deposit is not None and isinstance(p.deposit.authorization, channel.Erc3009Deposit)
    auth = p.deposit.authorization
    assert "0x" + channel.deposit_nonce(cid, auth.salt).hex() == build_erc3009_deposit_nonce(
        "0x" + cid.hex(), sdk_erc["deposit"]["authorization"]["erc3009Authorization"]["salt"]
    )
    digest = channel.erc3009_deposit_digest(p.config, p.deposit, CHAIN, "USD Coin", "2")
    assert channel.recover(digest, auth.signature) == payer.address.lower()
    assert channel.recover(channel.erc3009_deposit_digest(p.config, p.deposit, CHAIN, "USDC", "2"), auth.signature) != (
        payer.address.lower()
    )

    sdk_p2 = create_batch_settlement_permit2_deposit_payload(
        signer, requirements(authorizer.address, "permit2"), sdk_config(config), 50_000, 1_000
    ).to_dict()
    p = channel.decode_payload(sdk_p2)
    assert p.deposit is not None and isinstance(p.deposit.authorization, channel.Permit2Deposit)
    p2 = p.deposit.authorization
    assert p2.spender == channel.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS.lower() and p2.channel_id == cid
    assert channel.recover(channel.permit2_deposit_digest(p2, CHAIN), p2.signature) == payer.address.lower()
    rebound = channel.Permit2Deposit(**{**p2.__dict__, "channel_id": bytes(32)})
    assert channel.recover(channel.permit2_deposit_digest(rebound, CHAIN), p2.signature) != payer.address.lower()


# -- calldata -----------------------------------------------------------------------------------------


def encoded(fn: str, *args: Any) -> bytes:
    return bytes.fromhex(ESCROW.encode_abi(fn, args=list(args))[2:])


def sdk_claim(c: channel.Claim) -> VoucherClaim:
    return VoucherClaim(sdk_config(c.config), str(c.max_claimable), "0x" + c.signature.hex(), str(c.total_claimed))


def test_claim_settle_refund_calldata_are_the_sdk_abis(payer: Any, authorizer: Any) -> None:
    config = make_config(payer.address, authorizer.address)
    others = [make_config(Account.create().address, authorizer.address) for _ in range(2)]
    claims = [
        channel.Claim(config, 10_000, secrets.token_bytes(65), 7_000),
        channel.Claim(others[0], 3, secrets.token_bytes(65), 3),
        channel.Claim(others[1], 99, secrets.token_bytes(130), 0),  # a longer (EIP-1271) signature, a zero row
    ]
    auth_sig = secrets.token_bytes(65)
    args = build_voucher_claim_args([sdk_claim(c) for c in claims])
    assert channel.claim_with_signature_calldata(claims, auth_sig) == encoded("claimWithSignature", args, auth_sig)
    assert channel.claim_calldata(claims) == encoded("claim", args)
    assert channel.claim_calldata(claims[:1]) == encoded("claim", args[:1])
    assert channel.settle_calldata(RECEIVER.lower(), TOKEN) == encoded("settle", RECEIVER, cs(TOKEN))

    contract_config = to_contract_channel_config(sdk_config(config))
    assert channel.refund_calldata(config, 1_500) == encoded("refund", contract_config, 1_500)
    refund = channel.refund_with_signature_calldata(config, 1_500, 7, auth_sig)
    assert refund == encoded("refundWithSignature", contract_config, 1_500, 7, auth_sig)
    claim = channel.claim_with_signature_calldata(claims[:1], auth_sig)
    assert channel.multicall_calldata([claim, refund]) == encoded("multicall", [claim, refund])
    assert channel.multicall_calldata([]) == encoded("multicall", [])

    with pytest.raises(ValueError):
        channel.claim_calldata([])
    with pytest.raises(ValueError):  # a claim above the voucher
        channel.claim_calldata([channel.Claim(config, 10, b"\x01" * 65, 11)])
    with pytest.raises(ValueError):
        channel.refund_calldata(config, 0)
    with pytest.raises(ValueError):
        channel.refund_with_signature_calldata(config, 2**128, 0, auth_sig)


def test_deposit_calldata_is_the_sdk_abi(payer: Any, authorizer: Any) -> None:
    config = make_config(payer.address, authorizer.address)
    contract_config = to_contract_channel_config(sdk_config(config))
    signer = EthAccountSigner(payer)
    sdk_erc = create_batch_settlement_eip3009_deposit_payload(
        signer, requirements(authorizer.address), sdk_config(config), 50_000, 1_000
    ).to_dict()
    p = channel.decode_payload(sdk_erc)
    assert p.deposit is not None
    a = sdk_erc["deposit"]["authorization"]["erc3009Authorization"]
    data = build_erc3009_collector_data(a["validAfter"], a["validBefore"], a["salt"], a["signature"])
    assert channel.deposit_calldata(p.config, p.deposit) == encoded(
        "deposit", contract_config, 50_000, cs(channel.ERC3009_DEPOSIT_COLLECTOR_ADDRESS), data
    )

    sdk_p2 = create_batch_settlement_permit2_deposit_payload(
        signer, requirements(authorizer.address, "permit2"), sdk_config(config), 50_000, 1_000
    ).to_dict()
    p = channel.decode_payload(sdk_p2)
    assert p.deposit is not None
    a = sdk_p2["deposit"]["authorization"]["permit2Authorization"]
    data = build_permit2_collector_data(a["nonce"], a["deadline"], a["signature"])
    collector = cs(channel.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS)
    assert channel.deposit_calldata(p.config, p.deposit) == encoded("deposit", contract_config, 50_000, collector, data)
    # With an EIP-2612 permit (the eip2612GasSponsoring extension) riding along.
    permit_sig = Account.sign_message(encode_typed_data(full_message=_permit_message()), payer.key).signature
    p2612 = permit2.Eip2612Permit(payer.address.lower(), TOKEN.lower(), 50_000, 1_900_000_000, bytes(permit_sig))
    seg = build_eip2612_permit_data(
        "50000", "1900000000", permit_sig[64], "0x" + permit_sig[:32].hex(), "0x" + permit_sig[32:64].hex()
    )
    data = build_permit2_collector_data(a["nonce"], a["deadline"], a["signature"], seg)
    assert channel.deposit_calldata(p.config, p.deposit, p2612) == encoded(
        "deposit", contract_config, 50_000, collector, data
    )


def test_a_deposit_calls_channel_and_amount_are_read_back_from_its_sdk_encoded_calldata(
    payer: Any, authorizer: Any
) -> None:
    """The settlement worker counts a mined deposit from its calldata alone."""
    config = make_config(payer.address, authorizer.address)
    payload = create_batch_settlement_eip3009_deposit_payload(
        EthAccountSigner(payer), requirements(authorizer.address), sdk_config(config), 123_456, 1_000
    ).to_dict()
    a = payload["deposit"]["authorization"]["erc3009Authorization"]
    data = build_erc3009_collector_data(a["validAfter"], a["validBefore"], a["salt"], a["signature"])
    contract_config = to_contract_channel_config(sdk_config(config))
    calldata = encoded("deposit", contract_config, 123_456, cs(channel.ERC3009_DEPOSIT_COLLECTOR_ADDRESS), data)
    assert channel.deposit_of(calldata, CHAIN) == (compute_channel_id(sdk_config(config), NETWORK), 123_456)
    for other in (channel.refund_calldata(config, 5) + bytes(64), calldata[:200], b""):
        with pytest.raises(ValueError):
            channel.deposit_of(other, CHAIN)


def _permit_message() -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": DOMAIN_TYPE,
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ],
        },
        "primaryType": "Permit",
        "domain": {"name": "USD Coin", "version": "2", "chainId": CHAIN, "verifyingContract": TOKEN},
        "message": {"owner": RECEIVER, "spender": permit2.PERMIT2_ADDRESS, "value": 1, "nonce": 0, "deadline": 1},
    }


# -- decoding the SDK client's payloads ---------------------------------------------------------------


def sdk_payloads(payer: Any, authorizer: Any) -> dict[str, dict[str, Any]]:
    """One payload of each kind, as the SDK's batch-settlement client makes them."""
    scheme = BatchSettlementEvmScheme(payer)
    req = requirements(authorizer.address)
    deposit = scheme.create_payment_payload(req)
    config = scheme.build_channel_config(req)
    cid = compute_channel_id(config, NETWORK)
    voucher = sign_voucher(EthAccountSigner(payer), cid, 3_000, NETWORK).to_dict()
    base = {"channelConfig": config.to_dict(), "voucher": voucher}
    return {
        "deposit": deposit,
        "permit2": BatchSettlementEvmScheme(payer).create_payment_payload(requirements(authorizer.address, "permit2")),
        "voucher": {"type": "voucher", **base},
        "refund": {"type": "refund", **base},
        "partial": {"type": "refund", **base, "amount": "1500"},
    }


def test_decodes_the_sdk_client_payloads(payer: Any, authorizer: Any) -> None:
    docs = sdk_payloads(payer, authorizer)
    deposit = docs["deposit"]
    # The exact shapes.
    assert set(deposit) == {"type", "channelConfig", "voucher", "deposit"} and deposit["type"] == "deposit"
    assert set(deposit["channelConfig"]) == {
        "payer",
        "payerAuthorizer",
        "receiver",
        "receiverAuthorizer",
        "token",
        "withdrawDelay",
        "salt",
    }
    assert deposit["channelConfig"]["withdrawDelay"] == 900 and deposit["channelConfig"]["salt"] == "0x" + "00" * 32
    assert set(deposit["voucher"]) == {"channelId", "maxClaimableAmount", "signature"}
    assert deposit["voucher"]["maxClaimableAmount"] == "1000"  # charged 0 + this request's 1000
    assert set(deposit["deposit"]) == {"amount", "authorization"} and deposit["deposit"]["amount"] == "5000"
    assert set(deposit["deposit"]["authorization"]) == {"erc3009Authorization"}
    assert set(deposit["deposit"]["authorization"]["erc3009Authorization"]) == {
        "validAfter",
        "validBefore",
        "salt",
        "signature",
    }
    assert set(docs["permit2"]["deposit"]["authorization"]) == {"permit2Authorization"}

    p = channel.decode_payload(deposit)
    assert p.type == "deposit" and p.deposit is not None and p.deposit.amount == 5_000
    assert p.config.payer == p.config.payer_authorizer == payer.address.lower()
    assert p.config.receiver == RECEIVER.lower() and p.config.receiver_authorizer == authorizer.address.lower()
    assert p.config.withdraw_delay == 900 and p.config.salt == bytes(32)
    assert p.voucher.channel_id == channel.channel_id(p.config, CHAIN)
    assert p.voucher.max_claimable == 1_000 and channel.voucher_signer(p.voucher, CHAIN) == payer.address.lower()
    assert isinstance(p.deposit.authorization, channel.Erc3009Deposit)

    p = channel.decode_payload(docs["permit2"])
    assert p.deposit is not None and isinstance(p.deposit.authorization, channel.Permit2Deposit)
    assert p.deposit.authorization.amount == p.deposit.amount == 5_000

    p = channel.decode_payload(docs["voucher"])
    assert (p.type, p.deposit, p.refund_amount, p.voucher.max_claimable) == ("voucher", None, None, 3_000)
    p = channel.decode_payload(docs["refund"])
    assert (p.type, p.refund_amount) == ("refund", None)
    assert channel.decode_payload(docs["partial"]).refund_amount == 1_500


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("voucher", "type", "claim"),
        ("voucher", "type", None),
        ("voucher", "channelConfig", _DELETE),
        ("voucher", "channelConfig", "0x"),
        ("voucher", "channelConfig.payer", "0x1234"),
        ("voucher", "channelConfig.receiverAuthorizer", _DELETE),
        ("voucher", "channelConfig.withdrawDelay", True),
        ("voucher", "channelConfig.withdrawDelay", -1),
        ("voucher", "channelConfig.withdrawDelay", 2**40),
        ("voucher", "channelConfig.withdrawDelay", 900.5),
        ("voucher", "channelConfig.salt", "0x00"),
        ("voucher", "channelConfig.salt", 0),
        ("voucher", "voucher", _DELETE),
        ("voucher", "voucher.channelId", "0x" + "ab" * 31),
        ("voucher", "voucher.maxClaimableAmount", 3000),
        ("voucher", "voucher.maxClaimableAmount", "-1"),
        ("voucher", "voucher.maxClaimableAmount", "1e3"),
        ("voucher", "voucher.maxClaimableAmount", str(2**128)),
        ("voucher", "voucher.maxClaimableAmount", "١٢"),  # non-ASCII digits
        ("voucher", "voucher.signature", "0x"),
        ("voucher", "voucher.signature", "0xabc"),
        ("voucher", "voucher.signature", None),
        ("refund", "amount", "0"),
        ("refund", "amount", 5),
        ("refund", "amount", "12.5"),
        ("deposit", "deposit", _DELETE),
        ("deposit", "deposit.amount", "0"),
        ("deposit", "deposit.amount", str(2**128)),
        ("deposit", "deposit.authorization", {}),
        ("deposit", "deposit.authorization.erc3009Authorization", "yes"),
        ("deposit", "deposit.authorization.permit2Authorization", {"from": "0x"}),
        ("deposit", "deposit.authorization.erc3009Authorization.validBefore", 123),
        ("deposit", "deposit.authorization.erc3009Authorization.salt", "salt"),
        ("deposit", "deposit.authorization.erc3009Authorization.signature", _DELETE),
        ("permit2", "deposit.authorization.permit2Authorization.witness", _DELETE),
        ("permit2", "deposit.authorization.permit2Authorization.witness.channelId", "0x01"),
        ("permit2", "deposit.authorization.permit2Authorization.permitted.amount", "-5"),
        ("permit2", "deposit.authorization.permit2Authorization.spender", None),
    ],
)
def test_malformed_payloads_are_refused(payer: Any, authorizer: Any, kind: str, path: str, value: Any) -> None:
    docs = sdk_payloads(payer, authorizer)
    channel.decode_payload(docs[kind])  # the genuine one decodes
    with pytest.raises(PaymentMalformed):
        channel.decode_payload(_set(docs[kind], path, value))


def test_not_an_object_is_refused() -> None:
    for doc in (None, [], "deposit", 5):
        with pytest.raises(PaymentMalformed):
            channel.decode_payload(doc)


def test_lenient_where_the_sdk_is(payer: Any, authorizer: Any) -> None:
    """What other SDKs may send and the Python SDK accepts too: a decimal-string withdrawDelay, a hex
    Permit2 nonce, a decimal ERC-3009 salt; unknown keys are ignored; an explicit null refund amount
    is a full refund."""
    docs = sdk_payloads(payer, authorizer)
    assert (
        channel.decode_payload(_set(docs["voucher"], "channelConfig.withdrawDelay", "900")).config.withdraw_delay == 900
    )
    p = channel.decode_payload(_set(docs["permit2"], "deposit.authorization.permit2Authorization.nonce", "0xff"))
    assert p.deposit is not None and isinstance(p.deposit.authorization, channel.Permit2Deposit)
    assert p.deposit.authorization.nonce == 255
    p = channel.decode_payload(_set(docs["deposit"], "deposit.authorization.erc3009Authorization.salt", "42"))
    assert p.deposit is not None and isinstance(p.deposit.authorization, channel.Erc3009Deposit)
    assert p.deposit.authorization.salt == 42
    assert channel.decode_payload({**docs["deposit"], "__extensions": {}, "x": 1}).type == "deposit"
    assert channel.decode_payload({**docs["refund"], "amount": None}).refund_amount is None
