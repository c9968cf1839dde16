"""tollway's own signed messages (EIP-712), for what x402 has no word for.

Domain: ``{name: "tollway", version: "2", chainId, verifyingContract: <token>}`` — scoped to one
asset on one chain, so a signature never moves credit of another asset. Every message names the
gateway it is for (``origin``, e.g. ``https://llm.example.com``): a signature collected by another
server — even one that relays a real gateway's 402 — is refused by the real one, and the paying
client signs only for the origin it is talking to.

- ``WalletProof(address wallet, string origin, uint256 validBefore)``: "I hold this wallet" — lets
  a client see its credit and get quotes reduced by it.
- ``CreditPayment(address wallet, string origin, uint256 amount, bytes32 request, bytes32 nonce,
  uint256 validBefore)``: pay one call (the request digest) from credit, without a chain transaction.
- ``Withdrawal(address wallet, string origin, uint256 amount, bytes32 nonce, uint256 validBefore)``:
  pay credit out on chain to the wallet itself.
- ``TransferClaim(address wallet, string origin, bytes32 transaction, bytes32 request)``: "this
  on-chain transfer of mine pays this call" — a transaction hash alone is public.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from eth_account import Account

from ..errors import PaymentInvalid, PaymentMalformed
from ..keccak import keccak
from .eip3009 import SignatureError, domain_separator, recover, word_address, word_uint

WALLET = {"name": "wallet", "type": "address"}
ORIGIN = {"name": "origin", "type": "string"}
TYPES: dict[str, list[dict[str, str]]] = {
    "WalletProof": [WALLET, ORIGIN, {"name": "validBefore", "type": "uint256"}],
    "CreditPayment": [
        WALLET,
        ORIGIN,
        {"name": "amount", "type": "uint256"},
        {"name": "request", "type": "bytes32"},
        {"name": "nonce", "type": "bytes32"},
        {"name": "validBefore", "type": "uint256"},
    ],
    "Withdrawal": [
        WALLET,
        ORIGIN,
        {"name": "amount", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
        {"name": "validBefore", "type": "uint256"},
    ],
    "TransferClaim": [
        WALLET,
        ORIGIN,
        {"name": "transaction", "type": "bytes32"},
        {"name": "request", "type": "bytes32"},
    ],
}
HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")


TYPE_HASHES = {
    kind: keccak(f"{kind}({','.join(f['type'] + ' ' + f['name'] for f in fields)})".encode())
    for kind, fields in TYPES.items()
}


def digest(kind: str, chain_id: int, token: str, message: dict[str, Any]) -> bytes:
    """The EIP-712 digest of a normalised ``message`` (``_normalise``), by hand as in eip3009.py:
    eth-account's typed-data encoder took ~10× the time, on every credit call."""
    words = b"".join(_word(f["type"], message[f["name"]]) for f in TYPES[kind])
    domain = domain_separator("tollway", "2", chain_id, token)
    return keccak(b"\x19\x01" + domain + keccak(TYPE_HASHES[kind] + words))


def _word(typ: str, value: Any) -> bytes:
    if typ == "address":
        return word_address(value.lower())
    if typ == "string":
        return keccak(value.encode())
    if typ == "uint256":
        return word_uint(value)
    return value  # type: ignore[no-any-return]  # (bytes32)


def _normalise(kind: str, message: dict[str, Any]) -> dict[str, Any]:
    """Check field shapes (addresses, bytes32, decimal uints) and convert for encoding."""
    out: dict[str, Any] = {}
    for field in TYPES[kind]:
        name, typ = field["name"], field["type"]
        v = message.get(name)
        text_ok = isinstance(v, str) and (ADDRESS.match(v) if typ == "address" else 0 < len(v) <= 200)
        if typ in ("address", "string") and text_ok:
            out[name] = v
        elif typ == "bytes32" and isinstance(v, str) and HEX32.match(v):
            out[name] = bytes.fromhex(v[2:])
        elif (
            typ == "uint256"
            and isinstance(v, (str, int))
            and not isinstance(v, bool)
            and len(str(v)) <= 78  # (2**256 has 78 digits; int() refuses thousands)
            and str(v).isascii()
            and str(v).isdigit()
        ):
            out[name] = int(v)
            if out[name] >= 2**256:
                raise PaymentMalformed(f"{kind}.{name} is out of range")
        else:
            raise PaymentMalformed(f"{kind}.{name} is missing or malformed")
    return out


def sign(kind: str, key: Any, chain_id: int, token: str, message: dict[str, Any]) -> str:
    signed = Account.unsafe_sign_hash(digest(kind, chain_id, token, _normalise(kind, message)), key)
    return "0x" + bytes(signed.signature).hex()


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower-case: what tollway's messages name."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def signer(kind: str, chain_id: int, token: str, message: dict[str, Any], signature: Any, origin: str) -> str:
    """The lower-case address that signed ``message`` for this gateway (``origin``); raises
    PaymentMalformed if unreadable, and PaymentInvalid if it names another gateway."""
    msg = _normalise(kind, message)
    if str(msg["origin"]).lower().rstrip("/") != origin:
        raise PaymentInvalid(
            f"this {kind} was signed for another gateway ({str(msg['origin'])[:80]}), not {origin}",
            code="wrong_origin",
        )
    if not isinstance(signature, str) or not re.fullmatch(r"0x[0-9a-fA-F]{130}", signature):
        raise PaymentMalformed(f"{kind} signature must be 65 bytes of hex")
    try:
        return recover(digest(kind, chain_id, token, msg), bytes.fromhex(signature[2:]))
    except SignatureError as exc:
        raise PaymentMalformed(f"{kind} signature does not recover: {exc}") from exc
