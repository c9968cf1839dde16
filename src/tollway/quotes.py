"""Binding a quote to its request, statelessly, so any replica can check it.

A 402 offer carries ``extra.quote = "<expires>.<mac>"`` where the MAC (HMAC-SHA256 with the
gateway's secret) covers the request digest, the amount, the expiry and the output cap the amount
was priced for (``extra.maxTokens``). A v2 client echoes the
offer in ``accepted``; on the paid retry the gateway recomputes the digest of the request it
actually got, so a proof made for another (cheaper) request, or for an expired quote, is refused.
A sign-in's nonce is bound the same way (hex, as EIP-4361 nonces must be alphanumeric).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from .errors import PaymentInvalid
from .jsonbytes import dumps


def request_digest(body: dict[str, Any]) -> str:
    """sha-256 of the canonical JSON of a request body (key order and spacing do not matter)."""
    return hashlib.sha256(dumps(body, sort_keys=True)).hexdigest()


NONCE_MAC = 32  # hex characters of a sign-in nonce's MAC


class QuoteSigner:
    def __init__(self, secret: str) -> None:
        self.key = secret.encode()

    def _mac(self, digest: str, amount: int, expires: int, cap: int) -> str:
        msg = f"{digest}|{amount}|{expires}|{cap}".encode()
        return base64.urlsafe_b64encode(hmac.new(self.key, msg, hashlib.sha256).digest()[:18]).decode()

    def token(self, digest: str, amount: int, expires: int, cap: int) -> str:
        return f"{expires}.{self._mac(digest, amount, expires, cap)}"

    def check(self, token: Any, digest: str, amount: int, now: int, cap: int) -> None:
        """Raise unless ``token`` quotes ``amount`` with output ``cap`` for this very request and
        has not expired."""
        if not isinstance(token, str) or "." not in token:
            raise PaymentInvalid("the accepted offer carries no valid quote", code="invalid_quote")
        expires_s, mac = token.split(".", 1)
        if not (
            len(expires_s) <= 12 and expires_s.isascii() and expires_s.isdigit() and mac.isascii()
        ) or not hmac.compare_digest(mac, self._mac(digest, amount, int(expires_s), cap)):
            raise PaymentInvalid("this payment was quoted for a different request or amount", code="quote_mismatch")
        if int(expires_s) < now:
            raise PaymentInvalid("the quote has expired; request a new one", code="quote_expired")

    def nonce(self, digest: str, expires: int) -> str:
        """A sign-in nonce for this request, valid until ``expires``: ``<expires hex><mac hex>``."""
        return f"{expires:x}{self._nonce_mac(digest, expires)}"

    def check_nonce(self, nonce: str, digest: str, now: int) -> bool:
        """Whether ``nonce`` was issued for this very request and has not expired."""
        head, mac = nonce[:-NONCE_MAC], nonce[-NONCE_MAC:]
        if not (nonce.isascii() and 0 < len(head) <= 12 and all(c in "0123456789abcdef" for c in head)):
            return False
        expires = int(head, 16)
        return expires >= now and hmac.compare_digest(mac, self._nonce_mac(digest, expires))

    def _nonce_mac(self, digest: str, expires: int) -> str:
        return hmac.new(self.key, f"sign-in|{digest}|{expires}".encode(), hashlib.sha256).hexdigest()[:NONCE_MAC]
