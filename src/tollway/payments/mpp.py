"""MPP — HTTP ``Payment`` authentication (draft-httpauth-payment) with the EVM ``charge`` intent — as a
second wire codec: challenges out, credentials in, receipts and problem documents; the schemes
behind it are tollway's own.

- **Challenge** (in every 402, next to x402's ``PAYMENT-REQUIRED``): ``WWW-Authenticate: Payment
  id, realm, method="evm", intent="charge", request, expires, digest, opaque``. ``request`` is
  base64url(JCS) of ``{amount, currency, recipient, methodDetails: {chainId, credentialTypes,
  decimals}}``; ``opaque`` carries the x402 quote the amount was priced by (and a random nonce, so
  that no two challenges are alike: the EIP-3009 nonce is derived from the challenge's id);
  ``digest`` binds the request body; ``id`` is an HMAC over all of them, so the credential's echo
  proves the challenge is ours, unaltered and unexpired without any state.
- **Credential** (``Authorization: Payment <base64url JSON>``): the echoed challenge and a payload.
  Type ``authorization`` is an EIP-3009 ``transferWithAuthorization`` to the recipient of exactly
  the amount, whose nonce is the challenge's hash — it becomes a ``Proof`` of the ``exact`` scheme,
  whose verification, replay lock and settlement it shares.
- **Receipt** (``Payment-Receipt``, base64url JSON) on success; failures of a request that came
  with a credential are RFC 9457 problem documents of the draft's types, with a fresh challenge.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any

from ..errors import PaymentInvalid, PaymentMalformed
from ..jsonbytes import loads
from ..keccak import keccak
from .base import Offer, Proof
from .permit2 import PERMIT2_ADDRESS

AUTHORIZATION = "authorization"
CREDENTIAL_TYPES = {"permit2": "mpp-permit2", AUTHORIZATION: "exact", "hash": "mpp-hash"}  # → scheme, preferred first
UNBOUND = "hash"  # a credential type that nothing binds to its challenge: for small amounts only
WWW_AUTHENTICATE = "WWW-Authenticate"
PAYMENT_RECEIPT = "Payment-Receipt"
ACCEPT_PAYMENT = "Accept-Payment"
METHOD, INTENT = "evm", "charge"
PROBLEMS = "https://paymentauth.org/problems/"
MAX_CREDENTIAL = 16 * 1024
ISO = "%Y-%m-%dT%H:%M:%SZ"
# The draft's problem types for what went wrong with a credential (tollway's reason codes → type).
PROBLEM_OF = {
    "invalid_payload": "malformed-credential",
    "invalid_challenge": "invalid-challenge",
    "payment_expired": "payment-expired",
    "invalid_exact_evm_nonce_already_used": "invalid-challenge",
    "quote_mismatch": "invalid-challenge",
    "quote_expired": "payment-expired",
    "amount_insufficient": "payment-insufficient",
    "insufficient_funds": "payment-insufficient",
    "debt_outstanding": "payment-insufficient",
    "payment_required": "payment-required",
}


def jcs(doc: Any) -> bytes:
    """RFC 8785 canonical JSON, for the documents MPP signs (strings, integers, objects, arrays)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise PaymentMalformed("not base64url", code="invalid_payload") from exc


def iso(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime(ISO)


def parse_iso(text: str) -> int:
    try:
        return int(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError as exc:
        raise PaymentMalformed("the challenge's expires is not an RFC 3339 time", code="invalid_payload") from exc


# How long a challenge may be answered: its quote's life, up to this. A payment is signed valid
# until the challenge expires, that plus the validity a call and its settlement need; clients bound
# what they sign (tollway's: max_validity_seconds, an hour), so a challenge must not reach far ahead.
ANSWER_SECONDS = 300


class MppRail:
    """MPP's ``Payment`` scheme for one realm: challenges for offers, credentials into proofs."""

    def __init__(
        self,
        key: bytes,
        realm: str,
        chain_id: int,
        decimals: int,
        types: dict[str, str],
        unbound_max: int = 0,
        spender: str = "",
        validity: int = 0,
    ) -> None:
        """``types``: the credential types taken, preferred first, each → the scheme that pays it;
        ``unbound_max``: the largest amount (atomic) a ``hash`` credential is asked for; ``spender``:
        the account that submits a ``permit2`` credential's transfer (its Permit2 spender);
        ``validity``: how long a payment must stay valid after its credential arrives (the call and
        its settlement). Clients sign their payment valid until the challenge ``expires``: a
        challenge expires that long after the last moment its credential is taken."""
        self.spender = spender
        self.validity = validity
        self.key = hashlib.sha256(b"tollway mpp challenge|" + key).digest()
        self.realm = realm
        self.chain_id = chain_id
        self.decimals = decimals
        self.types = types
        self.unbound_max = unbound_max

    # -- challenges ----------------------------------------------------------------------------

    def challenge(self, offer: Offer, digest: str, answer_by: int) -> str:
        """The ``WWW-Authenticate`` value asking to pay ``offer`` (an ``exact`` offer: its amount,
        asset and payee, and the x402 quote in its ``extra``) for the request of ``digest``, with
        a credential that comes by ``answer_by`` (no later than its quote expires)."""
        expires = answer_by + self.validity
        quoted = {"quote": offer.extra["quote"], "maxTokens": str(offer.extra["maxTokens"])}
        # ``hash`` by the whole quote, not the amount the payer's credit reduced it to: a transfer
        # binds no payer, so whoever claims one makes its sender pay the call — from their credit
        # too, up to the quote — and the cap is what such a claim may cost them.
        taken = self.taken(offer.amount + int(offer.extra.get("credit", 0)))
        details: dict[str, Any] = {"chainId": self.chain_id, "credentialTypes": taken, "decimals": self.decimals}
        if "permit2" in taken:  # (the draft names no spender: ours is the account that submits the transfer)
            details.update(permit2Address=PERMIT2_ADDRESS, spender=self.spender)
        request = {
            "amount": str(offer.amount),
            "currency": offer.asset,
            "recipient": offer.pay_to,
            "methodDetails": details,
        }
        params = {
            "realm": self.realm,
            "method": METHOD,
            "intent": INTENT,
            "request": b64url(jcs(request)),
            "expires": iso(expires),
            "digest": content_digest(digest),
            "opaque": b64url(jcs({**quoted, "n": secrets.token_hex(8)})),
        }
        params = {"id": self._id(params), **params}
        return "Payment " + ", ".join(f'{k}="{v}"' for k, v in params.items())

    def taken(self, amount: int) -> list[str]:
        """The credential types a challenge for ``amount`` lists (so the HMAC binds them)."""
        return [t for t in self.types if t != UNBOUND or amount <= self.unbound_max]

    def _id(self, p: Mapping[str, str]) -> str:
        fields = (p["realm"], p["method"], p["intent"], p["request"], p.get("expires", ""), p.get("digest", ""))
        # (an echoed field may hold a lone surrogate: encoded as it came, it only fails to match)
        message = "|".join((*fields, p.get("opaque", ""))).encode("utf-8", "surrogatepass")
        return b64url(hmac.new(self.key, message, hashlib.sha256).digest())

    # -- credentials ---------------------------------------------------------------------------

    def decode(self, headers: Mapping[str, str], digest: str, now: int) -> Proof | None:
        """The proof an ``Authorization: Payment`` credential makes for the request of ``digest``,
        or None when there is none. Raises ``PaymentMalformed``/``PaymentInvalid`` with a code that
        ``PROBLEM_OF`` maps to the draft's problem type."""
        value = headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "payment":
            return None
        if len(token) > MAX_CREDENTIAL:
            raise PaymentMalformed("payment credential too large", code="invalid_payload")
        try:
            doc = loads(unb64url(token.strip()))
        except (ValueError, RecursionError) as exc:
            raise PaymentMalformed("the credential is not base64url JSON", code="invalid_payload") from exc
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("challenge"), dict)
            or not isinstance(doc.get("payload"), dict)
        ):
            raise PaymentMalformed("the credential needs a challenge and a payload", code="invalid_payload")
        echo, payload = doc["challenge"], doc["payload"]
        params = self._echoed(echo)
        echoed_id = echo.get("id")
        if not (isinstance(echoed_id, str) and echoed_id.isascii()) or not hmac.compare_digest(
            echoed_id.encode(), self._id(params).encode()
        ):
            raise PaymentInvalid("this challenge was not issued here, or was altered", code="invalid_challenge")
        if params.get("digest") != content_digest(digest):
            raise PaymentInvalid("this challenge was issued for another request body", code="invalid_challenge")
        if params["realm"] != self.realm:
            raise PaymentInvalid("this challenge was issued for another realm", code="invalid_challenge")
        if parse_iso(params["expires"]) - self.validity < now:  # (what it pays must stay valid that long)
            raise PaymentInvalid("the challenge has expired: ask for a new one", code="payment_expired")
        if (params["method"], params["intent"]) != (METHOD, INTENT):
            raise PaymentInvalid("only the evm charge intent is taken here", code="method_unsupported")
        request, opaque = json.loads(unb64url(params["request"])), json.loads(unb64url(params["opaque"]))
        kind = payload.get("type")
        listed = (request.get("methodDetails") or {}).get("credentialTypes") or []
        if not isinstance(kind, str) or kind not in self.types or kind not in listed:
            taken = ", ".join(t for t in listed if t in self.types)
            raise PaymentInvalid(
                f"this gateway takes evm charge credentials of type {taken}", code="method_unsupported"
            )
        bound = challenge_nonces(str(echo["id"]), params["realm"])  # what binds the payment to this challenge
        if kind == AUTHORIZATION:
            authorization = {k: payload.get(k) for k in ("from", "to", "value", "validAfter", "validBefore", "nonce")}
            binding = str(authorization["nonce"] or "").lower()
            paid: dict[str, Any] = {"authorization": authorization, "signature": payload.get("signature")}
        elif kind == UNBOUND:  # (nothing to check: see HashCharge)
            binding, paid = bound[0], payload
        else:  # permit2: the witness names the challenge
            witness = payload.get("witness")
            binding = str(witness.get("challengeHash", "")).lower() if isinstance(witness, dict) else ""
            bound, paid = bound[:1], payload
        if binding not in bound:
            raise PaymentInvalid("the payment is not bound to this challenge's hash", code="invalid_challenge")
        source = str(doc.get("source", ""))
        accepted = {
            "scheme": self.types[kind],
            "network": f"eip155:{self.chain_id}",
            "amount": request.get("amount"),
            "asset": request.get("currency"),
            "payTo": request.get("recipient"),
            "extra": {"quote": opaque.get("quote"), "maxTokens": _int(opaque.get("maxTokens"))},
        }
        who = {"source": source.rsplit(":", 1)[-1].lower()} if source.startswith("did:pkh:eip155:") else None
        return Proof(
            2, self.types[kind], accepted["network"], paid, accepted, who, rail="mpp", challenge=str(echo["id"])
        )

    def _echoed(self, echo: Mapping[str, Any]) -> dict[str, str]:
        """The challenge's parameters as they were issued: ``request`` and ``opaque`` re-encoded
        canonically (clients re-serialise them when they echo)."""
        out: dict[str, str] = {}
        for key in ("realm", "method", "intent", "request", "expires", "digest", "opaque"):
            value = echo.get(key)
            if not isinstance(value, str) or not value:
                raise PaymentMalformed(f"the echoed challenge lacks {key}", code="invalid_payload")
            out[key] = value
        for key in ("request", "opaque"):
            try:
                out[key] = b64url(jcs(loads(unb64url(out[key]))))
            except (ValueError, RecursionError) as exc:
                raise PaymentMalformed(f"the echoed challenge's {key} is not JSON", code="invalid_payload") from exc
        return out

    # -- receipts and problems -----------------------------------------------------------------

    def receipt(self, proof: Proof, tx_hash: str, now: int) -> str:
        doc = {
            "status": "success",
            "method": METHOD,
            "timestamp": iso(now),
            "reference": tx_hash,
            "challengeId": proof.challenge,
            "chainId": self.chain_id,
        }
        return b64url(json.dumps(doc, separators=(",", ":")).encode())


def carries_credential(headers: Mapping[str, str]) -> bool:
    return headers.get("authorization", "")[:8].lower() == "payment "


def content_digest(request_digest: str) -> str:
    """``digest``: sha-256 of the request body as tollway reads it (its canonical JSON: whatever
    whitespace or key order the client sends it in again, the same call), RFC 9530 style."""
    return "sha-256=" + base64.b64encode(bytes.fromhex(request_digest)).decode()


def challenge_nonces(challenge_id: str, realm: str) -> tuple[str, str]:
    """The EIP-3009 nonces a credential for this challenge may carry: the draft's (and mppx's)
    ``keccak256(id ‖ realm)``, and pympp's ``keccak256('["id","realm"]')``."""
    packed = keccak(challenge_id.encode() + realm.encode())
    listed = keccak(json.dumps([challenge_id, realm], separators=(",", ":"), ensure_ascii=False).encode())
    return "0x" + packed.hex(), "0x" + listed.hex()


def problem(kind: str, detail: str, status: int = 402) -> dict[str, Any]:
    """An RFC 9457 problem document of the draft's type ``kind``."""
    title = kind.replace("-", " ").capitalize()
    return {"type": PROBLEMS + kind, "title": title, "status": status, "detail": detail}


def problem_type(code: str) -> str:
    if code in PROBLEM_OF:
        return PROBLEM_OF[code]
    return "method-unsupported" if code == "method_unsupported" else "verification-failed"


def accepts_mpp(headers: Mapping[str, str]) -> bool:
    """Whether the client's ``Accept-Payment`` (absent: anything) admits the evm charge."""
    wanted = headers.get(ACCEPT_PAYMENT)
    if wanted is None:
        return True
    for item in wanted.split(","):
        name, *params = (p.strip() for p in item.split(";"))
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        if name.lower() in ("*", "*/*", "evm/*", "*/charge", "evm/charge") and q.strip("0.") != "":
            return True
    return False


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10 else None
