"""x402 ``batch-settlement`` channels: channel ids, EIP-712 digests, escrow calldata, payload decoding.

A payer deposits once into the canonical escrow (``x402BatchSettlement``, through the ERC-3009 or
the Permit2 deposit collector), then pays each request with a cumulative voucher
``Voucher(bytes32 channelId,uint128 maxClaimableAmount)``. The receiver side claims vouchers in
batches with ``claimWithSignature`` (signed by the channel's receiver authorizer over
``ClaimBatch(ClaimEntry[] claims)``), sweeps claimed money to the receiver with ``settle``, and
returns the unclaimed rest with a cooperative refund (``refundWithSignature`` on a
``Refund(bytes32 channelId,uint256 nonce,uint128 amount)`` signature).

Every EIP-712 message is under the domain {name "x402 Batch Settlement", version "1", chainId,
verifyingContract: the escrow}; the channel id is itself the EIP-712 hash of the channel's
immutable ``ChannelConfig`` under that domain, so it binds the chain and the escrow.

Pure functions, hand-rolled on keccak + coincurve like :mod:`tollway.payments.eip3009` (whose
``recover`` / ``split_signature`` this reuses); the tests check them against the official x402
SDK's own EIP-712 code, eth-account's generic encoder and the calldata the SDK's facilitator sends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from ..errors import PaymentMalformed
from ..keccak import keccak
from . import eip3009
from . import permit2 as _permit2
from .eip3009 import UINT256_MAX, SignatureError, recover, split_signature, word_address, word_uint

__all__ = [
    "BATCH_SETTLEMENT_ADDRESS",
    "ERC3009_DEPOSIT_COLLECTOR_ADDRESS",
    "MAX_WITHDRAW_DELAY",
    "MIN_WITHDRAW_DELAY",
    "PERMIT2_DEPOSIT_COLLECTOR_ADDRESS",
    "ChannelConfig",
    "ChannelPayload",
    "Claim",
    "Deposit",
    "Erc3009Deposit",
    "Permit2Deposit",
    "SignatureError",
    "Voucher",
    "channel_id",
    "claim_batch_digest",
    "claim_calldata",
    "claim_with_signature_calldata",
    "config_hash",
    "decode_payload",
    "deposit_calldata",
    "deposit_nonce",
    "domain_separator",
    "erc3009_deposit_digest",
    "multicall_calldata",
    "permit2_deposit_digest",
    "refund_calldata",
    "refund_digest",
    "refund_with_signature_calldata",
    "settle_calldata",
    "voucher_digest",
    "voucher_signer",
]

BATCH_SETTLEMENT_ADDRESS = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
"""The canonical escrow (placed on the devnet by :mod:`tollway.devnet.canonical`)."""
ERC3009_DEPOSIT_COLLECTOR_ADDRESS = "0x4020806089470a89826cB9fB1f4059150b550004"
"""The ``to`` of every ERC-3009 ``ReceiveWithAuthorization`` deposit."""
PERMIT2_DEPOSIT_COLLECTOR_ADDRESS = "0x4020425FAf3B746C082C2f942b4E5159887B0005"
"""The ``spender`` of every Permit2 deposit."""
MIN_WITHDRAW_DELAY = 900  # 15 minutes: the escrow refuses a channel outside these bounds
MAX_WITHDRAW_DELAY = 2_592_000  # 30 days

UINT40_MAX = 2**40 - 1
UINT128_MAX = 2**128 - 1
ZERO_ADDRESS = "0x" + "00" * 20

DOMAIN_NAME = "x402 Batch Settlement"
DOMAIN_VERSION = "1"
CHANNEL_CONFIG_TYPEHASH = keccak(
    b"ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
    b"address token,uint40 withdrawDelay,bytes32 salt)"
)
VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint128 maxClaimableAmount)")
REFUND_TYPEHASH = keccak(b"Refund(bytes32 channelId,uint256 nonce,uint128 amount)")
_CLAIM_ENTRY = b"ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
CLAIM_ENTRY_TYPEHASH = keccak(_CLAIM_ENTRY)
CLAIM_BATCH_TYPEHASH = keccak(b"ClaimBatch(ClaimEntry[] claims)" + _CLAIM_ENTRY)
RECEIVE_TYPEHASH = keccak(
    b"ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,"
    b"bytes32 nonce)"
)
DEPOSIT_WITNESS_TYPEHASH = keccak(b"DepositWitness(bytes32 channelId)")
PERMIT2_DEPOSIT_TYPEHASH = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
    b"DepositWitness witness)DepositWitness(bytes32 channelId)TokenPermissions(address token,uint256 amount)"
)

_CONFIG = "(address,address,address,address,address,uint40,bytes32)"
_VOUCHER_CLAIM = f"(({_CONFIG},uint128),bytes,uint128)"
DEPOSIT_SELECTOR = keccak(f"deposit({_CONFIG},uint128,address,bytes)".encode())[:4]
CLAIM_SELECTOR = keccak(f"claim({_VOUCHER_CLAIM}[])".encode())[:4]
CLAIM_WITH_SIGNATURE_SELECTOR = keccak(f"claimWithSignature({_VOUCHER_CLAIM}[],bytes)".encode())[:4]
SETTLE_SELECTOR = keccak(b"settle(address,address)")[:4]
REFUND_SELECTOR = keccak(f"refund({_CONFIG},uint128)".encode())[:4]
REFUND_WITH_SIGNATURE_SELECTOR = keccak(f"refundWithSignature({_CONFIG},uint128,uint256,bytes)".encode())[:4]
MULTICALL_SELECTOR = keccak(b"multicall(bytes[])")[:4]

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
HEX_BYTES = re.compile(r"^0x(?:[0-9a-fA-F]{2})+\Z")
HEX_UINT = re.compile(r"^0x[0-9a-fA-F]{1,64}\Z")


# -- types --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelConfig:
    """A channel's immutable identity; addresses lower-case hex, ``salt`` 32 bytes."""

    payer: str
    payer_authorizer: str  # the voucher signer, or the zero address: the payer signs (EIP-1271 possible)
    receiver: str
    receiver_authorizer: str  # signs claim batches and refunds
    token: str
    withdraw_delay: int  # seconds
    salt: bytes


@dataclass(frozen=True)
class Voucher:
    """A payer's cumulative voucher: the receiver may claim up to ``max_claimable`` in total."""

    channel_id: bytes
    max_claimable: int
    signature: bytes


@dataclass(frozen=True)
class Erc3009Deposit:
    """A ``ReceiveWithAuthorization`` (from the payer, to the ERC-3009 collector) of the deposit amount,
    with nonce ``keccak256(abi.encode(channelId, salt))`` (see :func:`deposit_nonce`)."""

    valid_after: int
    valid_before: int
    salt: int  # uint256
    signature: bytes


@dataclass(frozen=True)
class Permit2Deposit:
    """A Permit2 ``PermitWitnessTransferFrom`` of the deposit amount with the witness
    ``DepositWitness(bytes32 channelId)``; the spender must be the Permit2 collector."""

    owner: str  # "from"
    token: str
    amount: int
    spender: str
    nonce: int
    deadline: int
    channel_id: bytes  # witness.channelId
    signature: bytes


@dataclass(frozen=True)
class Deposit:
    amount: int
    authorization: Erc3009Deposit | Permit2Deposit


@dataclass(frozen=True)
class ChannelPayload:
    """A decoded x402 batch-settlement ``payload`` of a client: ``deposit`` (opens or tops up the
    channel, with the voucher for this request), ``voucher`` (this request's voucher) or ``refund``
    (a zero-charge voucher at the channel's charged total, and optionally a partial ``refund_amount``;
    ``None``: refund everything unclaimed)."""

    type: Literal["deposit", "voucher", "refund"]
    config: ChannelConfig
    voucher: Voucher
    deposit: Deposit | None = None
    refund_amount: int | None = None


@dataclass(frozen=True)
class Claim:
    """One row of a claim: the channel, its payer's voucher (``max_claimable`` + ``signature``) and the
    channel's new cumulative claimed total (``total_claimed <= max_claimable``: what was charged)."""

    config: ChannelConfig
    max_claimable: int
    signature: bytes
    total_claimed: int


# -- EIP-712 ------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def domain_separator(chain_id: int, contract: str = BATCH_SETTLEMENT_ADDRESS) -> bytes:
    return keccak(
        eip3009.DOMAIN_TYPEHASH
        + keccak(DOMAIN_NAME.encode())
        + keccak(DOMAIN_VERSION.encode())
        + word_uint(chain_id)
        + word_address(contract.lower())
    )


def _typed(struct_hash: bytes, chain_id: int) -> bytes:
    return keccak(b"\x19\x01" + domain_separator(chain_id) + struct_hash)


def _config_words(c: ChannelConfig) -> bytes:
    """The seven fields, ABI-encoded: the same words in the EIP-712 struct and in the calldata."""
    return (
        word_address(c.payer)
        + word_address(c.payer_authorizer)
        + word_address(c.receiver)
        + word_address(c.receiver_authorizer)
        + word_address(c.token)
        + word_uint(c.withdraw_delay)
        + c.salt
    )


def config_hash(config: ChannelConfig) -> bytes:
    """The EIP-712 struct hash of a ``ChannelConfig``."""
    return keccak(CHANNEL_CONFIG_TYPEHASH + _config_words(config))


def channel_id(config: ChannelConfig, chain_id: int) -> bytes:
    """The channel id: the EIP-712 digest of ``config`` under the batch-settlement domain."""
    return _typed(config_hash(config), chain_id)


def voucher_digest(channel_id_: bytes, max_claimable: int, chain_id: int) -> bytes:
    return _typed(keccak(VOUCHER_TYPEHASH + channel_id_ + word_uint(max_claimable)), chain_id)


def voucher_signer(voucher: Voucher, chain_id: int) -> str:
    """The lower-case address whose ECDSA signature ``voucher`` carries (raises ``SignatureError``).
    It must be the channel's payer authorizer, or the payer when that is zero (then a contract
    payer's EIP-1271 signature can only be checked on chain)."""
    return recover(voucher_digest(voucher.channel_id, voucher.max_claimable, chain_id), voucher.signature)


def refund_digest(channel_id_: bytes, nonce: int, amount: int, chain_id: int) -> bytes:
    """What the receiver authorizer signs for ``refundWithSignature``."""
    return _typed(keccak(REFUND_TYPEHASH + channel_id_ + word_uint(nonce) + word_uint(amount)), chain_id)


def claim_batch_digest(claims: Sequence[Claim], chain_id: int) -> bytes:
    """What the receiver authorizer signs for ``claimWithSignature(claims, …)``: one
    ``ClaimEntry(channelId, maxClaimableAmount, totalClaimed)`` per row, in order."""
    entries = b"".join(
        keccak(
            CLAIM_ENTRY_TYPEHASH
            + channel_id(c.config, chain_id)
            + word_uint(c.max_claimable)
            + word_uint(c.total_claimed)
        )
        for c in claims
    )
    return _typed(keccak(CLAIM_BATCH_TYPEHASH + keccak(entries)), chain_id)


def deposit_nonce(channel_id_: bytes, salt: int) -> bytes:
    """The EIP-3009 nonce of an ERC-3009 deposit: ``keccak256(abi.encode(channelId, salt))``."""
    return keccak(channel_id_ + word_uint(salt))


def erc3009_deposit_digest(
    config: ChannelConfig, deposit: Deposit, chain_id: int, token_name: str, token_version: str
) -> bytes:
    """The digest the payer signs for an ERC-3009 deposit: ``ReceiveWithAuthorization(from: payer, to:
    the ERC-3009 collector, value: amount, …, nonce: deposit_nonce(channel id, salt))`` under the
    token's domain ({``token_name``, ``token_version``, chainId, token})."""
    auth = deposit.authorization
    if not isinstance(auth, Erc3009Deposit):
        raise ValueError("not an ERC-3009 deposit")
    struct = keccak(
        RECEIVE_TYPEHASH
        + word_address(config.payer)
        + word_address(ERC3009_DEPOSIT_COLLECTOR_ADDRESS.lower())
        + word_uint(deposit.amount)
        + word_uint(auth.valid_after)
        + word_uint(auth.valid_before)
        + deposit_nonce(channel_id(config, chain_id), auth.salt)
    )
    domain = eip3009.domain_separator(token_name, token_version, chain_id, config.token)
    return keccak(b"\x19\x01" + domain + struct)


def permit2_deposit_digest(auth: Permit2Deposit, chain_id: int) -> bytes:
    """The digest the payer signs for a Permit2 deposit (Permit2's domain, ``DepositWitness`` witness)."""
    token_permissions = keccak(_permit2.TOKEN_PERMISSIONS_TYPEHASH + word_address(auth.token) + word_uint(auth.amount))
    witness = keccak(DEPOSIT_WITNESS_TYPEHASH + auth.channel_id)
    struct = keccak(
        PERMIT2_DEPOSIT_TYPEHASH
        + token_permissions
        + word_address(auth.spender)
        + word_uint(auth.nonce)
        + word_uint(auth.deadline)
        + witness
    )
    return keccak(b"\x19\x01" + _permit2.domain_separator(chain_id) + struct)


# -- calldata -----------------------------------------------------------------------------------------


def _bytes_tail(data: bytes) -> bytes:
    return word_uint(len(data)) + data + bytes(-len(data) % 32)


def _uint128(v: int, what: str) -> int:
    if not 0 <= v <= UINT128_MAX:
        raise ValueError(f"{what} {v} is out of the uint128 range")
    return v


def _dynamic_array(elements: Sequence[bytes]) -> bytes:
    """An ABI array of dynamic elements (already encoded): length, offsets, elements."""
    offsets, offset = [], 32 * len(elements)
    for e in elements:
        offsets.append(word_uint(offset))
        offset += len(e)
    return word_uint(len(elements)) + b"".join(offsets) + b"".join(elements)


def _voucher_claims(claims: Sequence[Claim]) -> bytes:
    if not claims:
        raise ValueError("a claim needs at least one row")
    rows = []
    for c in claims:
        if not 0 <= c.total_claimed <= c.max_claimable:
            raise ValueError(f"total claimed {c.total_claimed} must be in 0..{c.max_claimable}")
        rows.append(
            _config_words(c.config)
            + word_uint(_uint128(c.max_claimable, "max claimable"))
            + word_uint(10 * 32)  # the signature's offset: after 7 config words, max, offset, total
            + word_uint(c.total_claimed)
            + _bytes_tail(c.signature)
        )
    return _dynamic_array(rows)


def claim_with_signature_calldata(claims: Sequence[Claim], authorizer_signature: bytes) -> bytes:
    """Calldata for ``claimWithSignature(voucherClaims, authorizerSignature)``; the signature is the
    receiver authorizer's over :func:`claim_batch_digest` of the same rows."""
    rows = _voucher_claims(claims)
    return (
        CLAIM_WITH_SIGNATURE_SELECTOR
        + word_uint(64)
        + word_uint(64 + len(rows))
        + rows
        + _bytes_tail(authorizer_signature)
    )


def claim_calldata(claims: Sequence[Claim]) -> bytes:
    """Calldata for ``claim(voucherClaims)``, which only the rows' receiver or receiver authorizer may send."""
    return CLAIM_SELECTOR + word_uint(32) + _voucher_claims(claims)


def settle_calldata(receiver: str, token: str) -> bytes:
    """Calldata for ``settle(receiver, token)``: sweeps everything claimed for ``receiver`` in ``token``."""
    return SETTLE_SELECTOR + word_address(receiver.lower()) + word_address(token.lower())


def refund_calldata(config: ChannelConfig, amount: int) -> bytes:
    """Calldata for ``refund(config, amount)``, which only the receiver or the receiver authorizer may send."""
    if amount <= 0:
        raise ValueError("a refund amount must be positive")
    return REFUND_SELECTOR + _config_words(config) + word_uint(_uint128(amount, "refund amount"))


def refund_with_signature_calldata(config: ChannelConfig, amount: int, nonce: int, signature: bytes) -> bytes:
    """Calldata for ``refundWithSignature(config, amount, nonce, signature)``; ``nonce`` must be the
    channel's current ``refundNonce`` and ``signature`` the receiver authorizer's over
    :func:`refund_digest`. The escrow returns ``min(amount, balance - totalClaimed)``."""
    if amount <= 0:
        raise ValueError("a refund amount must be positive")
    return (
        REFUND_WITH_SIGNATURE_SELECTOR
        + _config_words(config)
        + word_uint(_uint128(amount, "refund amount"))
        + word_uint(nonce)
        + word_uint(10 * 32)
        + _bytes_tail(signature)
    )


def multicall_calldata(calls: Sequence[bytes]) -> bytes:
    """Calldata for the escrow's ``multicall(data)``: the calls run in order, all or nothing (the SDK
    sends a refund as ``multicall([claimWithSignature…, refundWithSignature…])``)."""
    return MULTICALL_SELECTOR + word_uint(32) + _dynamic_array([_bytes_tail(c) for c in calls])


def _collector_data(deposit: Deposit, eip2612: _permit2.Eip2612Permit | None) -> tuple[str, bytes]:
    auth = deposit.authorization
    if isinstance(auth, Erc3009Deposit):
        if eip2612 is not None:
            raise ValueError("an EIP-2612 permit goes with a Permit2 deposit only")
        head = word_uint(auth.valid_after) + word_uint(auth.valid_before) + word_uint(auth.salt)
        return ERC3009_DEPOSIT_COLLECTOR_ADDRESS, head + word_uint(4 * 32) + _bytes_tail(auth.signature)
    if auth.amount != deposit.amount:
        raise ValueError("the Permit2 authorization's amount must equal the deposit")
    permit = b""
    if eip2612 is not None:
        v, r, s = split_signature(eip2612.signature)
        permit = word_uint(eip2612.value) + word_uint(eip2612.deadline) + word_uint(v) + r + s
    sig_tail = _bytes_tail(auth.signature)
    head = word_uint(auth.nonce) + word_uint(auth.deadline) + word_uint(4 * 32) + word_uint(4 * 32 + len(sig_tail))
    return PERMIT2_DEPOSIT_COLLECTOR_ADDRESS, head + sig_tail + _bytes_tail(permit)


def deposit_calldata(config: ChannelConfig, deposit: Deposit, eip2612: _permit2.Eip2612Permit | None = None) -> bytes:
    """Calldata for ``deposit(config, amount, collector, collectorData)`` through the collector of the
    deposit's kind; a Permit2 deposit may carry the payer's EIP-2612 permit allowing Permit2 (the
    ``eip2612GasSponsoring`` extension, :func:`tollway.payments.permit2.decode_eip2612_permit`)."""
    if deposit.amount <= 0:
        raise ValueError("a deposit amount must be positive")
    collector, data = _collector_data(deposit, eip2612)
    return (
        DEPOSIT_SELECTOR
        + _config_words(config)
        + word_uint(_uint128(deposit.amount, "deposit amount"))
        + word_address(collector.lower())
        + word_uint(10 * 32)
        + _bytes_tail(data)
    )


def deposit_of(calldata: bytes, chain_id: int) -> tuple[str, int]:
    """(the channel id, the amount) of a ``deposit`` call's calldata (:func:`deposit_calldata`)."""
    if calldata[:4] != DEPOSIT_SELECTOR or len(calldata) < 4 + 8 * 32:
        raise ValueError("not a deposit call")
    config_words, amount = calldata[4 : 4 + 7 * 32], calldata[4 + 7 * 32 : 4 + 8 * 32]
    return "0x" + _typed(keccak(CHANNEL_CONFIG_TYPEHASH + config_words), chain_id).hex(), int.from_bytes(amount, "big")


# -- decoding the x402 payload ------------------------------------------------------------------------


def _obj(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise PaymentMalformed(f"{where}{key} is not an object")
    return value


def _address(doc: dict[str, Any], key: str, where: str) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or not ADDRESS.match(v):
        raise PaymentMalformed(f"{where}{key} is not an address")
    return v.lower()


def _uint(doc: dict[str, Any], key: str, where: str, *, bound: int = UINT256_MAX, hex_ok: bool = False) -> int:
    v = doc.get(key)
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 78:
        n = int(v)
    elif hex_ok and isinstance(v, str) and HEX_UINT.match(v):
        n = int(v, 16)
    else:
        raise PaymentMalformed(f"{where}{key} is not a decimal integer string")
    if n > bound:
        raise PaymentMalformed(f"{where}{key} is out of range")
    return n


def _bytes32(doc: dict[str, Any], key: str, where: str) -> bytes:
    v = doc.get(key)
    if not isinstance(v, str) or not BYTES32.match(v):
        raise PaymentMalformed(f"{where}{key} is not 32 hex bytes")
    return bytes.fromhex(v[2:])


def _hex_bytes(doc: dict[str, Any], key: str, where: str) -> bytes:
    v = doc.get(key)
    if not isinstance(v, str) or not HEX_BYTES.match(v):
        raise PaymentMalformed(f"{where}{key} is not hex bytes")
    return bytes.fromhex(v[2:])


def _config(doc: dict[str, Any]) -> ChannelConfig:
    w = "channelConfig."
    delay = doc.get("withdrawDelay")
    if isinstance(delay, str) and delay.isascii() and delay.isdigit() and len(delay) <= 13:
        delay = int(delay)
    if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= UINT40_MAX:
        raise PaymentMalformed(f"{w}withdrawDelay is not a uint40")
    return ChannelConfig(
        payer=_address(doc, "payer", w),
        payer_authorizer=_address(doc, "payerAuthorizer", w),
        receiver=_address(doc, "receiver", w),
        receiver_authorizer=_address(doc, "receiverAuthorizer", w),
        token=_address(doc, "token", w),
        withdraw_delay=delay,
        salt=_bytes32(doc, "salt", w),
    )


def decode_config(doc: Any) -> ChannelConfig:
    """A ``channelConfig`` object (as clients send it, and the ledger keeps it) → ``ChannelConfig``."""
    if not isinstance(doc, dict):
        raise PaymentMalformed("channelConfig is not an object")
    return _config(doc)


def _signature(doc: dict[str, Any], key: str, where: str) -> bytes:
    """A signature as the contracts take it: a 65-byte ECDSA one whose recovery id a signer wrote
    as 0/1 gets the 27/28 that ``ecrecover`` (the escrow's, the token's) requires. Kept as sent, it
    would pass our own check and revert on chain: a voucher we charged could never be claimed, and
    its payer would withdraw what the calls cost."""
    sig = _hex_bytes(doc, key, where)
    if len(sig) == 65 and sig[64] in (0, 1):
        return sig[:64] + bytes([sig[64] + 27])
    return sig


def _voucher(doc: dict[str, Any]) -> Voucher:
    w = "voucher."
    return Voucher(
        channel_id=_bytes32(doc, "channelId", w),
        max_claimable=_uint(doc, "maxClaimableAmount", w, bound=UINT128_MAX),
        signature=_signature(doc, "signature", w),
    )


def _deposit(doc: dict[str, Any]) -> Deposit:
    amount = _uint(doc, "amount", "deposit.", bound=UINT128_MAX)
    if amount == 0:
        raise PaymentMalformed("deposit.amount must be positive")
    auth = _obj(doc, "authorization", "deposit.")
    erc3009, permit2 = auth.get("erc3009Authorization"), auth.get("permit2Authorization")
    if (erc3009 is None) == (permit2 is None):
        raise PaymentMalformed("deposit.authorization needs exactly one of erc3009Authorization, permit2Authorization")
    if erc3009 is not None:
        w = "erc3009Authorization."
        if not isinstance(erc3009, dict):
            raise PaymentMalformed(f"deposit.authorization.{w[:-1]} is not an object")
        return Deposit(
            amount,
            Erc3009Deposit(
                valid_after=_uint(erc3009, "validAfter", w),
                valid_before=_uint(erc3009, "validBefore", w),
                salt=_uint(erc3009, "salt", w, hex_ok=True),
                signature=_signature(erc3009, "signature", w),
            ),
        )
    w = "permit2Authorization."
    if not isinstance(permit2, dict):
        raise PaymentMalformed(f"deposit.authorization.{w[:-1]} is not an object")
    permitted = _obj(permit2, "permitted", w)
    witness = _obj(permit2, "witness", w)
    return Deposit(
        amount,
        Permit2Deposit(
            owner=_address(permit2, "from", w),
            token=_address(permitted, "token", w + "permitted."),
            amount=_uint(permitted, "amount", w + "permitted."),
            spender=_address(permit2, "spender", w),
            nonce=_uint(permit2, "nonce", w, hex_ok=True),
            deadline=_uint(permit2, "deadline", w),
            channel_id=_bytes32(witness, "channelId", w + "witness."),
            signature=_signature(permit2, "signature", w),
        ),
    )


def decode_payload(payload: Any) -> ChannelPayload:
    """An x402 batch-settlement ``payload`` object of a client → :class:`ChannelPayload`. Raises
    ``PaymentMalformed`` on any other shape. Checks shapes and ranges only: that the voucher's channel
    id is :func:`channel_id` of the config, who signed, and the amounts against the channel's state
    are the verifier's business. Shapes (what the SDK's client sends; amounts are decimal strings,
    ``withdrawDelay`` a JSON number; unknown keys are ignored)::

        {"type": "deposit" | "voucher" | "refund",
         "channelConfig": {"payer", "payerAuthorizer", "receiver", "receiverAuthorizer", "token",
                           "withdrawDelay": 900, "salt": "0x<32 bytes>"},
         "voucher": {"channelId": "0x<32 bytes>", "maxClaimableAmount", "signature"},
         # deposit only, exactly one authorization:
         "deposit": {"amount", "authorization": {
             "erc3009Authorization": {"validAfter", "validBefore", "salt": "0x<32 bytes>", "signature"}
           | "permit2Authorization": {"from", "permitted": {"token", "amount"}, "spender", "nonce",
                                      "deadline", "witness": {"channelId"}, "signature"}}},
         # refund only, optional (absent: everything unclaimed):
         "amount"}
    """
    if not isinstance(payload, dict):
        raise PaymentMalformed("payload is not an object")
    kind = payload.get("type")
    if kind not in ("deposit", "voucher", "refund"):
        raise PaymentMalformed("payload.type must be deposit, voucher or refund")
    config = _config(_obj(payload, "channelConfig", "payload."))
    voucher = _voucher(_obj(payload, "voucher", "payload."))
    if kind == "deposit":
        return ChannelPayload("deposit", config, voucher, deposit=_deposit(_obj(payload, "deposit", "payload.")))
    if kind == "refund" and payload.get("amount") is not None:
        amount = _uint(payload, "amount", "payload.", bound=UINT128_MAX)
        if amount == 0:
            raise PaymentMalformed("payload.amount must be positive")
        return ChannelPayload("refund", config, voucher, refund_amount=amount)
    return ChannelPayload(kind, config, voucher)
