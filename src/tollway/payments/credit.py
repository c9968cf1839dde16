"""The ``credit`` scheme: pay a call from the wallet's credit with the gateway — no chain transaction.

Offered in a 402 only to a client that proved its wallet (``X-Tollway-Wallet``) and whose credit
covers the quote. The proof is a ``CreditPayment`` (see ``signed.py``) bound to the request
digest; the pipeline holds the quoted amount from the wallet's credit while the call runs.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import PaymentInvalid, PaymentMalformed
from . import signed
from .base import Context, Offer, Proof, Quote, Verified


class CreditScheme:
    name = "credit"
    rails = ("x402",)
    metered = True
    prepaid = True
    lapses = False

    def __init__(self, *, chain_id: int, token: str, payee: str, timeout: int) -> None:
        self.chain_id = chain_id
        self.network = f"eip155:{chain_id}"
        self.token = token
        self.payee = payee
        self.timeout = timeout

    def offer(self, amount: int) -> Offer:
        return Offer(self.name, self.network, self.token, self.payee, amount, self.timeout, {})

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        p = proof.payload
        wallet = signed.signer("CreditPayment", self.chain_id, self.token, p, p.get("signature"), quote.origin)
        if str(p["wallet"]).lower() != wallet:
            raise PaymentInvalid("credit payment not signed by its wallet", code="invalid_credit_signature")
        if int(p["amount"]) != offer.amount:
            raise PaymentInvalid(
                f"credit payment of {p['amount']} must equal the quote {offer.amount}", code="credit_amount_mismatch"
            )
        if str(p["request"]).lower() != "0x" + quote.request_digest:
            raise PaymentInvalid("this credit payment was signed for another request", code="quote_mismatch")
        if int(p["validBefore"]) < now:
            raise PaymentInvalid("credit payment has expired", code="credit_payment_expired")
        return Verified(
            scheme=self.name,
            network=self.network,
            asset=self.token.lower(),
            payer=wallet,
            payee=self.payee.lower(),
            amount=0,  # nothing moves on chain: the whole quote is held from credit
            lock_key=f"{self.network}:{self.token.lower()}:credit:{wallet}:{p['nonce'].lower()}",
            proof=p,
        )

    async def confirm(self, payment: Verified, owed: int, *, recheck: bool = False) -> None:
        return None

    def settled_amount(self, payment: Verified, due: int) -> int:
        return 0

    def settlement_call(self, proof: dict[str, Any], amount: int) -> None:
        return None

    def extensions(self) -> dict[str, Any]:
        return {}

    def response_extra(self, channel: dict[str, Any] | None, charged: int | None) -> dict[str, Any] | None:
        return None

    async def settled_elsewhere(self, payment: dict[str, Any]) -> str | None:
        return None


# How far ahead a wallet proof may be valid: it is a bearer credential (the wallet's balance, journal,
# receipts), so one that leaks must not last (tollway's client signs one for an hour).
MAX_WALLET_PROOF_SECONDS = 2 * 3600


def check_wallet_proof(doc: Any, chain_id: int, token: str, now: int, origin: str) -> str:
    """The wallet a ``X-Tollway-Wallet`` header proves (decoded JSON {wallet, validBefore, signature})."""
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("wallet"), str)
        or not re.fullmatch(r"0x[0-9a-fA-F]{40}", doc["wallet"])
    ):
        raise PaymentMalformed("X-Tollway-Wallet must carry {wallet, validBefore, signature}")
    try:
        wallet = signed.signer("WalletProof", chain_id, token, doc, doc.get("signature"), origin)
    except PaymentInvalid as exc:
        raise PaymentMalformed(exc.message, code="invalid_wallet_proof") from None
    if wallet != doc["wallet"].lower() or not now <= int(doc["validBefore"]) <= now + MAX_WALLET_PROOF_SECONDS:
        raise PaymentMalformed(
            f"X-Tollway-Wallet is not a valid, current proof for its wallet (valid at most "
            f"{MAX_WALLET_PROOF_SECONDS} s ahead)",
            code="invalid_wallet_proof",
        )
    return wallet


def from_settings(ctx: Context) -> CreditScheme:
    c = ctx.settings.chain
    if not (c.token and c.payee):
        raise ValueError("the credit scheme needs chain.token and chain.payee")
    return CreditScheme(chain_id=ctx.chain_id, token=c.token, payee=c.payee, timeout=ctx.settings.offer_timeout_seconds)
