"""x402 wire codec, versions 1 and 2: headers ↔ the neutral types of ``base.py``.

v2: ``PAYMENT-REQUIRED`` (402) / ``PAYMENT-SIGNATURE`` (request) / ``PAYMENT-RESPONSE``;
v1: requirements in the 402 body / ``X-PAYMENT`` / ``X-PAYMENT-RESPONSE``. Header values are
base64 of compact JSON; decoding is tolerant (standard or URL-safe alphabet, padding optional)
but strict about shape: anything else is a ``PaymentMalformed`` (400).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from ..errors import PaymentInvalid, PaymentMalformed
from ..jsonbytes import compact, loads
from .base import Offer, Proof

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
X_PAYMENT = "X-PAYMENT"
X_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"
MAX_HEADER_BYTES = 16 * 1024

# x402 v1 names networks; v2 uses CAIP-2 ids.
V1_NETWORK_NAMES = {
    1: "ethereum",
    8453: "base",
    84532: "base-sepolia",
    137: "polygon",
    80002: "polygon-amoy",
    43114: "avalanche",
    43113: "avalanche-fuji",
    2741: "abstract",
    11124: "abstract-testnet",
    4689: "iotex",
    1329: "sei",
    1328: "sei-testnet",
    42220: "celo",
}


def b64json(doc: Any) -> str:
    return base64.b64encode(compact(doc).encode()).decode()


def unb64json(value: str) -> Any:
    if len(value) > MAX_HEADER_BYTES:
        raise PaymentMalformed("payment header too large")
    raw = value.strip().encode()
    raw += b"=" * (-len(raw) % 4)
    try:
        decoded = base64.b64decode(raw.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
        return loads(decoded)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise PaymentMalformed("payment header is not base64-encoded JSON") from exc


def offer_v2(o: Offer) -> dict[str, Any]:
    return {
        "scheme": o.scheme,
        "network": o.network,
        "amount": str(o.amount),
        "asset": o.asset,
        "payTo": o.pay_to,
        "maxTimeoutSeconds": o.max_timeout_seconds,
        "extra": o.extra,
    }


def offer_v1(o: Offer, network_name: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "scheme": o.scheme,
        "network": network_name,
        "maxAmountRequired": str(o.amount),
        "resource": resource["url"],
        "description": resource.get("description", ""),
        "mimeType": resource.get("mimeType", "application/json"),
        "outputSchema": None,
        "payTo": o.pay_to,
        "maxTimeoutSeconds": o.max_timeout_seconds,
        "asset": o.asset,
        "extra": o.extra,
    }


def payment_required(
    error: str, resource: dict[str, Any], offers: list[Offer], extensions: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The v2 ``PaymentRequired`` document."""
    return {
        "x402Version": 2,
        "error": error,
        "resource": resource,
        "accepts": [offer_v2(o) for o in offers],
        "extensions": extensions or {},
    }


def payment_required_v1(
    error: str, resource: dict[str, Any], offers: list[Offer], names: dict[str, str]
) -> dict[str, Any]:
    """The v1 402 body, for offers whose network has a v1 name."""
    return {
        "x402Version": 1,
        "error": error,
        "accepts": [offer_v1(o, names[o.network], resource) for o in offers if o.network in names],
    }


def _obj(doc: Any, key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise PaymentMalformed(f"payment payload lacks an object '{key}'")
    return value


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise PaymentMalformed(f"payment payload lacks a string '{key}'")
    return value


def decode_proof(headers: Mapping[str, str], v1_names: dict[str, str]) -> Proof | None:
    """The payment a request carries, or None when it carries none.

    ``v1_names`` maps v1 network names to CAIP-2 ids for the networks we serve in v1.
    """
    v2 = headers.get(PAYMENT_SIGNATURE)
    v1 = headers.get(X_PAYMENT)
    if v2 is None and v1 is None:
        return None
    doc = unb64json(v2 if v2 is not None else v1)  # type: ignore[arg-type]
    if not isinstance(doc, dict):
        raise PaymentMalformed("payment payload must be a JSON object")
    version = doc.get("x402Version")
    if v2 is not None:
        if version != 2:
            raise PaymentMalformed("PAYMENT-SIGNATURE carries x402Version 2 only", code="invalid_x402_version")
        accepted = _obj(doc, "accepted")
        extensions = doc.get("extensions")
        if extensions is not None and not isinstance(extensions, dict):
            raise PaymentMalformed("payment extensions must be an object")
        return Proof(2, _str(accepted, "scheme"), _str(accepted, "network"), _obj(doc, "payload"), accepted, extensions)
    if version != 1:
        raise PaymentMalformed("X-PAYMENT carries x402Version 1 only", code="invalid_x402_version")
    name = _str(doc, "network")
    if name not in v1_names:
        raise PaymentInvalid(f"x402 v1 network '{name}' is not accepted here", code="invalid_network")
    return Proof(1, _str(doc, "scheme"), v1_names[name], _obj(doc, "payload"))


def settle_response(
    *,
    success: bool,
    tx_hash: str,
    network: str,
    payer: str,
    error: str | None = None,
    amount: int | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """``SettleResponse``; ``amount`` is what moved, for schemes that settle less than authorised
    (upto); ``extra`` what the scheme adds (a channel's charge and state)."""
    doc: dict[str, Any] = {"success": success, "transaction": tx_hash, "network": network, "payer": payer}
    if amount is not None:
        doc["amount"] = str(amount)
    if extra:
        doc["extra"] = extra
    if error:
        doc["errorReason"] = error
    return b64json(doc)
