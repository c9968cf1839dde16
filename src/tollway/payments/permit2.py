"""x402 ``upto`` over Permit2: the witness EIP-712 digest, signer recovery, settlement calldata.

The payer signs a Permit2 ``PermitWitnessTransferFrom`` for a *maximum* amount, naming the
x402 upto proxy as the spender and binding a witness ``{to, facilitator, validAfter}``; the
facilitator named in the witness later calls the proxy's ``settle`` (or ``settleWithPermit``, which
first submits an EIP-2612 permit allowing Permit2) with the actual amount, which may be any
``0 < amount <= max`` (0 means: send nothing).

Pure functions, hand-rolled on keccak + coincurve like :mod:`tollway.payments.eip3009` (whose
``recover`` / ``split_signature`` this reuses); the tests check them against eth-account's generic
typed-data encoder and against the calldata the official x402 SDK facilitator sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..errors import PaymentMalformed
from ..keccak import keccak
from .eip3009 import UINT256_MAX, SignatureError, recover, split_signature, word_address, word_uint

__all__ = [
    "PERMIT2_ADDRESS",
    "UPTO_PROXY_ADDRESS",
    "WITNESS_TYPE_STRING",
    "Eip2612Permit",
    "SignatureError",
    "UptoAuthorization",
    "decode_eip2612_permit",
    "decode_payload",
    "digest",
    "domain_separator",
    "recover",
    "settle_calldata",
    "settle_with_permit_calldata",
    "signer",
    "struct_hash",
    "witness_hash",
]

PERMIT2_ADDRESS = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
"""The canonical Permit2 (the same address on every chain; placed on the devnet by
:mod:`tollway.devnet.canonical`)."""
UPTO_PROXY_ADDRESS = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
"""The canonical x402 upto Permit2 proxy: the ``spender`` of every upto permit."""

DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,uint256 chainId,address verifyingContract)")
TOKEN_PERMISSIONS_TYPEHASH = keccak(b"TokenPermissions(address token,uint256 amount)")
WITNESS_TYPEHASH = keccak(b"Witness(address to,address facilitator,uint256 validAfter)")
WITNESS_TYPE_STRING = (
    "Witness witness)TokenPermissions(address token,uint256 amount)"
    "Witness(address to,address facilitator,uint256 validAfter)"
)
"""What the proxy passes to Permit2 after its ``PermitWitnessTransferFrom(...,uint256 deadline,`` stub."""
PERMIT_WITNESS_TYPEHASH = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
    + WITNESS_TYPE_STRING.encode()
)

_PERMIT_TUPLE = "((address,uint256),uint256,uint256)"
_WITNESS_TUPLE = "(address,address,uint256)"
SETTLE_SELECTOR = keccak(f"settle({_PERMIT_TUPLE},uint256,address,{_WITNESS_TUPLE},bytes)".encode())[:4]
SETTLE_WITH_PERMIT_SELECTOR = keccak(
    f"settleWithPermit((uint256,uint256,bytes32,bytes32,uint8),{_PERMIT_TUPLE},uint256,address,{_WITNESS_TUPLE},bytes)".encode()
)[:4]

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
HEX_BYTES = re.compile(r"^0x(?:[0-9a-fA-F]{2})*\Z")
HEX_UINT = re.compile(r"^0x[0-9a-fA-F]{1,64}\Z")


@dataclass(frozen=True)
class UptoAuthorization:
    """A decoded ``permit2Authorization``; addresses lower-case hex."""

    owner: str  # "from": the payer
    token: str  # permitted.token
    max_amount: int  # permitted.amount: the most the facilitator may settle
    spender: str  # must be the upto proxy
    nonce: int  # Permit2 unordered nonce (uint256)
    deadline: int  # Permit2 signature deadline (unix seconds)
    to: str  # witness.to: the only possible recipient
    facilitator: str  # witness.facilitator: the only account allowed to settle
    valid_after: int  # witness.validAfter (unix seconds)


@dataclass(frozen=True)
class Eip2612Permit:
    """The ``eip2612GasSponsoring`` extension's permit (owner → Permit2), as ``settleWithPermit`` takes it."""

    owner: str
    token: str
    value: int
    deadline: int
    signature: bytes  # 65 bytes r‖s‖v


@lru_cache(maxsize=64)
def domain_separator(chain_id: int, permit2: str = PERMIT2_ADDRESS) -> bytes:
    """Permit2's EIP-712 domain separator: {name "Permit2", chainId, verifyingContract}, no version."""
    return keccak(DOMAIN_TYPEHASH + keccak(b"Permit2") + word_uint(chain_id) + word_address(permit2.lower()))


def witness_hash(auth: UptoAuthorization) -> bytes:
    """The EIP-712 hash of the witness struct, as the proxy hands it to Permit2."""
    return keccak(
        WITNESS_TYPEHASH + word_address(auth.to) + word_address(auth.facilitator) + word_uint(auth.valid_after)
    )


def struct_hash(auth: UptoAuthorization) -> bytes:
    token_permissions = keccak(TOKEN_PERMISSIONS_TYPEHASH + word_address(auth.token) + word_uint(auth.max_amount))
    return keccak(
        PERMIT_WITNESS_TYPEHASH
        + token_permissions
        + word_address(auth.spender)
        + word_uint(auth.nonce)
        + word_uint(auth.deadline)
        + witness_hash(auth)
    )


def digest(auth: UptoAuthorization, domain: bytes) -> bytes:
    """The digest the payer signs (``domain`` from :func:`domain_separator`)."""
    return keccak(b"\x19\x01" + domain + struct_hash(auth))


def signer(auth: UptoAuthorization, sig: bytes, chain_id: int) -> str:
    """The lower-case address that signed ``auth`` on ``chain_id`` (raises ``SignatureError``)."""
    return recover(digest(auth, domain_separator(chain_id)), sig)


# -- calldata ----------------------------------------------------------------------------------------


def _bytes_tail(data: bytes) -> bytes:
    return word_uint(len(data)) + data + bytes(-len(data) % 32)


def _settle_words(auth: UptoAuthorization, amount: int) -> bytes:
    """permit, amount, owner, witness: the static head shared by ``settle`` and ``settleWithPermit``."""
    if not 0 < amount <= auth.max_amount:
        raise ValueError(f"settlement amount {amount} must be in 1..{auth.max_amount} (0 settles nothing)")
    return (
        word_address(auth.token)
        + word_uint(auth.max_amount)
        + word_uint(auth.nonce)
        + word_uint(auth.deadline)
        + word_uint(amount)
        + word_address(auth.owner)
        + word_address(auth.to)
        + word_address(auth.facilitator)
        + word_uint(auth.valid_after)
    )


def settle_calldata(auth: UptoAuthorization, amount: int, sig: bytes) -> bytes:
    """Calldata for the proxy's ``settle(permit, amount, owner, witness, signature)``."""
    head = _settle_words(auth, amount)
    return SETTLE_SELECTOR + head + word_uint(len(head) + 32) + _bytes_tail(sig)


def settle_with_permit_calldata(permit2612: Eip2612Permit, auth: UptoAuthorization, amount: int, sig: bytes) -> bytes:
    """Calldata for ``settleWithPermit(permit2612, permit, amount, owner, witness, signature)``, which
    first submits the payer's EIP-2612 permit allowing Permit2 ``permit2612.value`` (it must equal
    ``auth.max_amount``)."""
    if permit2612.value != auth.max_amount:
        raise ValueError("the EIP-2612 permit's value must equal the Permit2 maximum")
    v, r, s = split_signature(permit2612.signature)
    head = (word_uint(permit2612.value) + word_uint(permit2612.deadline) + r + s + word_uint(v)) + _settle_words(
        auth, amount
    )
    return SETTLE_WITH_PERMIT_SELECTOR + head + word_uint(len(head) + 32) + _bytes_tail(sig)


# -- decoding the x402 payload -----------------------------------------------------------------------


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


def _uint(doc: dict[str, Any], key: str, where: str, *, hex_ok: bool = False) -> int:
    v = doc.get(key)
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 78:
        n = int(v)
    elif hex_ok and isinstance(v, str) and HEX_UINT.match(v):
        n = int(v, 16)
    else:
        raise PaymentMalformed(f"{where}{key} is not a decimal integer string")
    if n > UINT256_MAX:
        raise PaymentMalformed(f"{where}{key} is out of range")
    return n


def _hex_bytes(doc: dict[str, Any], key: str, where: str) -> bytes:
    v = doc.get(key)
    if not isinstance(v, str) or not HEX_BYTES.match(v) or len(v) == 2:
        raise PaymentMalformed(f"{where}{key} is not hex bytes")
    return bytes.fromhex(v[2:])


def decode_payload(payload: Any) -> tuple[UptoAuthorization, bytes]:
    """The x402 upto ``payload`` object → (authorization, signature). Raises ``PaymentMalformed``.

    Shape (what the SDK's upto client sends; numbers are decimal strings, the nonce may also be
    0x-hex as in the spec's example)::

        {"permit2Authorization": {"from", "permitted": {"token", "amount"}, "spender", "nonce",
                                  "deadline", "witness": {"to", "facilitator", "validAfter"}},
         "signature": "0x…"}
    """
    if not isinstance(payload, dict):
        raise PaymentMalformed("payload is not an object")
    auth = _obj(payload, "permit2Authorization", "payload.")
    w = "permit2Authorization."
    permitted = _obj(auth, "permitted", w)
    witness = _obj(auth, "witness", w)
    return (
        UptoAuthorization(
            owner=_address(auth, "from", w),
            token=_address(permitted, "token", w + "permitted."),
            max_amount=_uint(permitted, "amount", w + "permitted."),
            spender=_address(auth, "spender", w),
            nonce=_uint(auth, "nonce", w, hex_ok=True),
            deadline=_uint(auth, "deadline", w),
            to=_address(witness, "to", w + "witness."),
            facilitator=_address(witness, "facilitator", w + "witness."),
            valid_after=_uint(witness, "validAfter", w + "witness."),
        ),
        _hex_bytes(payload, "signature", "payload."),
    )


def decode_eip2612_permit(extensions: Any) -> Eip2612Permit | None:
    """The ``eip2612GasSponsoring`` extension of an x402 PaymentPayload's ``extensions``, if it carries
    a signed permit (``{"eip2612GasSponsoring": {"info": {"from", "asset", "spender", "amount", "nonce",
    "deadline", "signature", "version"}}}``); ``None`` when absent. Its spender must be Permit2."""
    if extensions is None:
        return None
    if not isinstance(extensions, dict):
        raise PaymentMalformed("extensions is not an object")
    ext = extensions.get("eip2612GasSponsoring")
    if ext is None:
        return None
    if not isinstance(ext, dict):
        raise PaymentMalformed("extensions.eip2612GasSponsoring is not an object")
    info = ext.get("info")
    if not isinstance(info, dict) or "signature" not in info:
        return None  # a server's declaration of the extension, not a client's signed permit
    w = "eip2612GasSponsoring.info."
    if _address(info, "spender", w) != PERMIT2_ADDRESS.lower():
        raise PaymentMalformed(f"{w}spender is not Permit2")
    sig = _hex_bytes(info, "signature", w)
    if len(sig) != 65:
        raise PaymentMalformed(f"{w}signature is not 65 bytes")
    _uint(info, "nonce", w)
    return Eip2612Permit(
        owner=_address(info, "from", w),
        token=_address(info, "asset", w),
        value=_uint(info, "amount", w),
        deadline=_uint(info, "deadline", w),
        signature=sig,
    )
