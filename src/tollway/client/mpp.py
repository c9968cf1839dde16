"""The payer's side of MPP (HTTP ``Payment`` authentication, the EVM ``charge`` intent): read a
``WWW-Authenticate: Payment`` challenge, and answer it with an ``Authorization: Payment`` credential
of type ``permit2`` (a Permit2 witness transfer naming the challenge), ``authorization`` (an
EIP-3009 transfer whose nonce is the challenge's hash) or ``hash`` (a transfer the payer sent
itself: the paying transports never choose it — they do not send transactions — but
``credential(..., "hash", tx_hash=...)`` builds it for a transfer sent by other means).
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import secrets
from typing import Any

from eth_account.signers.local import LocalAccount

from ..jsonbytes import loads
from ..keccak import keccak
from ..payments import eip3009, permit2_charge
from ..payments.x402 import MAX_HEADER_BYTES

WWW_AUTHENTICATE = "WWW-Authenticate"
PAYMENT_RECEIPT = "Payment-Receipt"
ECHOED = ("id", "realm", "method", "intent", "request", "expires", "digest", "opaque")
_PARAM = re.compile(r'([a-zA-Z][\w-]*)="([^"]*)"')


def challenge(headers: Any) -> dict[str, Any] | None:
    """The first evm charge challenge of a 402's ``WWW-Authenticate``, with its ``request`` decoded
    (as ``terms``); None if there is none."""
    raw = headers.get(WWW_AUTHENTICATE) or ""
    for part in re.split(r"(?:^|,\s*)(?=Payment\s)", raw):
        if not part.startswith("Payment "):
            continue
        params = dict(_PARAM.findall(part))
        if params.get("method") != "evm" or params.get("intent") != "charge" or "request" not in params:
            continue
        terms = _b64json(params["request"])
        if isinstance(terms, dict) and isinstance(terms.get("methodDetails"), dict):
            return {**params, "terms": terms}
    return None


def credential(
    account: LocalAccount, c: dict[str, Any], kind: str, token_name: str, token_version: str, tx_hash: str = ""
) -> str:
    """``Authorization`` answering challenge ``c`` with a credential of type ``kind`` (``hash``: of
    the transfer ``tx_hash``, which must pay the challenge's amount to its recipient)."""
    terms, details = c["terms"], c["terms"]["methodDetails"]
    chain_id, amount = int(details["chainId"]), int(terms["amount"])
    bound = keccak(c["id"].encode() + c["realm"].encode())  # the challenge's hash
    expires = expiry(c)
    if expires is None:
        raise ValueError("the challenge has no expiry (RFC 3339)")
    if kind == "authorization":
        auth = eip3009.Authorization(
            from_=account.address.lower(),
            to=str(terms["recipient"]).lower(),
            value=amount,
            valid_after=0,
            valid_before=expires,
            nonce=bound,
        )
        domain = eip3009.domain_separator(token_name, token_version, chain_id, terms["currency"])
        payload: dict[str, Any] = {
            "type": kind,
            "from": account.address,
            "to": terms["recipient"],
            "value": str(amount),
            "validAfter": "0",
            "validBefore": str(expires),
            "nonce": "0x" + bound.hex(),
            "signature": _sign(account, eip3009.digest(auth, domain)),
        }
    elif kind == "permit2":
        nonce = secrets.randbits(128)
        fields = {
            "token": str(terms["currency"]).lower(),
            "amount": amount,
            "nonce": nonce,
            "deadline": expires,
            "challenge_hash": bound,
            "external_id": str(terms.get("externalId") or ""),
            "chain_id": chain_id,
        }
        spender = str(details["spender"])
        digest = permit2_charge.digest(fields, spender, permit2_charge.WITNESS_TYPES[0], chain_id)
        payload = {
            "type": kind,
            "permit": {
                "permitted": [{"token": terms["currency"], "amount": str(amount)}],
                "nonce": str(nonce),
                "deadline": str(expires),
            },
            "transferDetails": [{"to": terms["recipient"], "requestedAmount": str(amount)}],
            "witness": {"challengeHash": "0x" + bound.hex(), "externalId": fields["external_id"]},
            "signature": _sign(account, digest),
        }
    elif kind == "hash" and tx_hash:
        payload = {"type": kind, "hash": tx_hash}
    else:
        raise ValueError(f"cannot make a {kind} credential" + (" without a transaction" if kind == "hash" else ""))
    doc = {
        "challenge": {k: c[k] for k in ECHOED if k in c},
        "payload": payload,
        "source": f"did:pkh:eip155:{chain_id}:{account.address}",
    }
    return "Payment " + base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def expiry(c: dict[str, Any]) -> int | None:
    """When challenge ``c`` expires (its credential is valid until then), in Unix seconds; None if it does not say."""
    try:
        moment = datetime.datetime.fromisoformat(str(c["expires"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return int(moment.timestamp()) if moment.tzinfo else None


def receipt(headers: Any) -> dict[str, Any] | None:
    raw = headers.get(PAYMENT_RECEIPT)
    if not raw:
        return None
    doc = _b64json(raw)
    return doc if isinstance(doc, dict) else None


def _b64json(text: str) -> Any:
    """The JSON a server sent in base64url, or None if it is not that (it is not trusted to be well
    formed, nor of a sane size or depth)."""
    if len(text) > MAX_HEADER_BYTES:  # (a challenge's request, a receipt: a few hundred bytes)
        return None
    try:
        return loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, RecursionError):
        return None


def _sign(account: LocalAccount, digest: bytes) -> str:
    return "0x" + bytes(account.unsafe_sign_hash(digest).signature).hex().removeprefix("0x")
