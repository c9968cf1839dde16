"""EIP-4361 (Sign-In with Ethereum) messages as x402's ``sign-in-with-x`` extension carries them:
a JSON object of the message's fields plus an EIP-191 signature of its text. Used by the
gateway to check a sign-in and by tollway's client to make one."""

from __future__ import annotations

from typing import Any

from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from .keccak import keccak
from .payments import eip3009

# The fields a client echoes from the server's declaration (``info``), in the SDKs' names.
ECHOED = (
    "domain",
    "uri",
    "version",
    "nonce",
    "issuedAt",
    "expirationTime",
    "notBefore",
    "requestId",
    "statement",
    "resources",
)


def message(f: dict[str, Any]) -> str:
    """The EIP-4361 text of a sign-in (what the wallet signs), from its fields."""
    head = f"{f['domain']} wants you to sign in with your Ethereum account:\n{f['address']}\n\n"
    head += f"{f['statement']}\n" if f.get("statement") is not None else ""
    lines = [
        f"URI: {f['uri']}",
        f"Version: {f['version']}",
        f"Chain ID: {str(f['chainId']).split(':', 1)[-1]}",
        f"Nonce: {f['nonce']}",
        f"Issued At: {f['issuedAt']}",
    ]
    for name, label in (("expirationTime", "Expiration Time"), ("notBefore", "Not Before")):
        if f.get(name):
            lines.append(f"{label}: {f[name]}")
    if f.get("requestId") is not None:
        lines.append(f"Request ID: {f['requestId']}")
    if f.get("resources") is not None:
        lines.append("\n".join(["Resources:", *(f"- {r}" for r in f["resources"])]))
    return head + "\n" + "\n".join(lines)


def eip191_hash(text: str) -> bytes:
    data = text.encode()
    return keccak(b"\x19Ethereum Signed Message:\n" + str(len(data)).encode() + data)


def recover(f: dict[str, Any]) -> str | None:
    """The lower-case address whose key signed the sign-in, if its signature (65 bytes, low s)
    recovers. (coincurve directly: eth-account's ``recover_message`` takes ~3.5× the time, on
    every call a signed-in wallet's credit pays.)"""
    try:
        return eip3009.recover(eip191_hash(message(f)), bytes.fromhex(str(f["signature"]).removeprefix("0x")))
    except ValueError:  # not hex, not 65 bytes, high s, does not recover (SignatureError)
        return None


def sign(account: LocalAccount, info: dict[str, Any], chain_id: str) -> dict[str, Any]:
    """The ``SIGN-IN-WITH-X`` payload answering a server's declaration ``info`` on ``chain_id``."""
    fields: dict[str, Any] = {k: info[k] for k in ECHOED if info.get(k) is not None}
    fields.update(address=account.address, chainId=chain_id, type="eip191")
    signed = account.sign_message(encode_defunct(text=message(fields)))
    return {**fields, "signatureScheme": "eip191", "signature": "0x" + bytes(signed.signature).hex()}
