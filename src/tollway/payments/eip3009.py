"""EIP-3009 ``TransferWithAuthorization``: EIP-712 digest, signer recovery, settlement calldata.

Hand-rolled on keccak + coincurve because this is the hot path: about 40 µs per verification,
against ~200 µs through eth-account's generic typed-data encoder (which the tests use as the
reference implementation to check this one).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from coincurve import PublicKey

from ..keccak import keccak

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2
UINT256_MAX = 2**256 - 1

DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
TRANSFER_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)
TRANSFER_SELECTOR = keccak(
    b"transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)[:4]


class SignatureError(ValueError):
    pass


@dataclass(frozen=True)
class Authorization:
    """A decoded authorization; addresses lower-case hex, nonce 32 bytes."""

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes


def word_address(addr: str) -> bytes:
    return bytes(12) + bytes.fromhex(addr[2:])


def word_uint(v: int) -> bytes:
    return v.to_bytes(32, "big")


@lru_cache(maxsize=64)
def domain_separator(name: str, version: str, chain_id: int, contract: str) -> bytes:
    return keccak(
        DOMAIN_TYPEHASH
        + keccak(name.encode())
        + keccak(version.encode())
        + word_uint(chain_id)
        + word_address(contract.lower())
    )


def _words(auth: Authorization) -> bytes:
    """The six fields, ABI-encoded: the same words in the EIP-712 struct and in the calldata."""
    return (
        word_address(auth.from_)
        + word_address(auth.to)
        + word_uint(auth.value)
        + word_uint(auth.valid_after)
        + word_uint(auth.valid_before)
        + auth.nonce
    )


def digest(auth: Authorization, domain: bytes) -> bytes:
    return keccak(b"\x19\x01" + domain + keccak(TRANSFER_TYPEHASH + _words(auth)))


def split_signature(sig: bytes) -> tuple[int, bytes, bytes]:
    """65 bytes r‖s‖v → (v in {27, 28}, r, s), refusing malleable or malformed signatures."""
    if len(sig) != 65:
        raise SignatureError("signature must be 65 bytes")
    r, s, v = sig[:32], sig[32:64], sig[64]
    if v in (0, 1):
        v += 27
    if v not in (27, 28):
        raise SignatureError("signature v must be 27 or 28")
    s_int, r_int = int.from_bytes(s, "big"), int.from_bytes(r, "big")
    if not (0 < r_int < SECP256K1_N) or not (0 < s_int <= HALF_N):
        raise SignatureError("signature r/s out of range (high-s signatures are malleable)")
    return v, r, s


def recover(digest32: bytes, sig: bytes) -> str:
    """The lower-case address that signed ``digest32``."""
    v, r, s = split_signature(sig)
    try:
        pub = PublicKey.from_signature_and_message(r + s + bytes([v - 27]), digest32, hasher=None)
    except Exception as exc:  # coincurve raises plain Exception on unrecoverable input
        raise SignatureError("signature does not recover to a key") from exc
    return "0x" + keccak(pub.format(compressed=False)[1:])[-20:].hex()


def transfer_calldata(auth: Authorization, sig: bytes) -> bytes:
    """Calldata for ``transferWithAuthorization(from,to,value,validAfter,validBefore,nonce,v,r,s)``."""
    v, r, s = split_signature(sig)
    return TRANSFER_SELECTOR + _words(auth) + word_uint(v) + r + s
