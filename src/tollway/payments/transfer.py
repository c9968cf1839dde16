"""The ``transfer`` scheme: the payer already sent the token to the payee in an ordinary
transaction and presents its hash, with a ``TransferClaim`` signature proving it is the sender
(a transaction hash is public; without the claim anyone could spend someone else's transfer).

Checks: the receipt exists and succeeded, has enough confirmations, and holds ``Transfer``
events of the token from the claimant to the payee; their sum is the payment. Each transaction
pays once (the ledger locks its hash). Whatever exceeds the call's cost becomes credit.
"""

from __future__ import annotations

import re
import time
from typing import Any

from ..errors import PaymentInvalid, PaymentMalformed
from ..pricing import MAX_AMOUNT
from . import signed
from .base import Context, Offer, Proof, Quote, Verified
from .chain import Chain, carries_authorization, quantity, receipt_status, transfers_in

TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")  # (fullmatch: "$" would let a trailing newline in)
NOT_FOUND_MEMORY = 1.0  # seconds an unmined (or unconfirmed) transaction is not looked up again
REFUSAL_MEMORY = 60.0  # seconds a transaction that does not pay us is not looked up again


class TransferScheme:
    name = "transfer"
    rails = ("x402",)
    metered = False
    prepaid = True
    lapses = False

    def __init__(
        self, *, chain: Chain, chain_id: int, token: str, payee: str, confirmations: int, timeout: int
    ) -> None:
        self.chain = chain
        self.chain_id = chain_id
        self.network = f"eip155:{chain_id}"
        self.token = token
        self.payee = payee
        self.confirmations = confirmations
        self.timeout = timeout
        # (tx hash, claimant) → (until, refusal): known not to pay them (another's claim says nothing of theirs)
        self._unknown: dict[tuple[str, str | None], tuple[float, str, str]] = {}

    def offer(self, amount: int) -> Offer:
        extra = {"confirmations": self.confirmations}
        return Offer(self.name, self.network, self.token, self.payee, amount, self.timeout, extra)

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        p = proof.payload
        tx = p.get("transaction")
        if not isinstance(tx, str) or not TX_HASH.fullmatch(tx):
            raise PaymentMalformed("payload.transaction must be a transaction hash")
        claim = {
            "wallet": p.get("wallet"),
            "origin": p.get("origin"),
            "transaction": tx,
            "request": "0x" + quote.request_digest,
        }
        wallet = signed.signer("TransferClaim", self.chain_id, self.token, claim, p.get("signature"), quote.origin)
        if str(p.get("wallet", "")).lower() != wallet:
            raise PaymentInvalid(
                "the transfer claim is not signed by its wallet (or not for this request)",
                code="invalid_transfer_claim",
            )
        return await self.paid_by(tx, wallet)

    async def paid_by(self, tx: str, wallet: str | None) -> Verified:
        """The payment transaction ``tx`` makes, if ``wallet`` (None: whoever) sent it, remembering refusals."""
        key = (tx.lower(), wallet)
        known_bad = self._unknown.get(key)
        if known_bad is not None and known_bad[0] > time.monotonic():
            raise PaymentInvalid(known_bad[1], code=known_bad[2])
        try:
            return await self._check(tx, wallet)
        except PaymentInvalid as exc:
            # A claim costs nothing to sign: remember refusals so that repeating one costs no RPC.
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            wait = NOT_FOUND_MEMORY if exc.code in ("transfer_not_found", "transfer_unconfirmed") else REFUSAL_MEMORY
            self._unknown[key] = (time.monotonic() + wait, exc.message, exc.code)
            raise

    async def _check(self, tx: str, wallet: str | None) -> Verified:
        """The payment a mined transfer of ``wallet``'s makes (None: of whoever sent it)."""
        receipt, head = await self.chain.batch([("eth_getTransactionReceipt", [tx]), ("eth_blockNumber", [])])
        status = receipt_status(receipt, tx)  # (none yet, or one a node in trouble got wrong: not believed)
        if status is None:
            raise PaymentInvalid("transaction not found or not mined yet", code="transfer_not_found")
        if status != 1:
            raise PaymentInvalid("the transaction failed on chain", code="transfer_failed")
        wallet = wallet or str(receipt.get("from", "")).lower()
        if str(receipt.get("from", "")).lower() != wallet:
            # Only the claimant's own transaction: a settlement or payout of this gateway (sent by
            # its own account) also carries a Transfer to the payee, and must never pay twice.
            raise PaymentInvalid("the transaction was not sent by the claimant", code="transfer_mismatch")
        depth = quantity(head) - quantity(receipt.get("blockNumber"))  # (a malformed one: the chain is down, 503)
        if depth < self.confirmations:
            raise PaymentInvalid(
                f"transaction has {depth} confirmations, {self.confirmations} needed", code="transfer_unconfirmed"
            )
        if carries_authorization(receipt, self.token):
            # An EIP-3009 authorization, which may have paid an exact payment already (whoever
            # sent it: ``ExactEvm.settled_elsewhere``): the same money must not pay twice.
            raise PaymentInvalid(
                "the transaction carries out an EIP-3009 authorization (it may pay an exact payment): only a "
                "transaction of plain transfers pays as a transfer",
                code="transfer_mismatch",
            )
        paid = sum(v for frm, to, v in transfers_in(receipt, self.token) if frm == wallet and to == self.payee.lower())
        if paid == 0:
            raise PaymentInvalid(
                "the transaction moves none of the token from the claimant to the payee", code="transfer_mismatch"
            )
        if paid > MAX_AMOUNT:
            raise PaymentMalformed("the transfer is larger than one payment may be", code="amount_too_large")
        return Verified(
            scheme=self.name,
            network=self.network,
            asset=self.token.lower(),
            payer=wallet,
            payee=self.payee.lower(),
            amount=paid,
            lock_key=f"{self.network}:transfer:{tx.lower()}",
            proof={"transaction": tx, "wallet": wallet},
        )

    async def confirm(self, payment: Verified, owed: int, *, recheck: bool = False) -> None:
        return None  # checked on chain in verify: the money has already moved

    def settled_amount(self, payment: Verified, due: int) -> int:
        return payment.amount

    def settlement_call(self, proof: dict[str, Any], amount: int) -> None:
        return None

    def extensions(self) -> dict[str, Any]:
        return {}

    def response_extra(self, channel: dict[str, Any] | None, charged: int | None) -> dict[str, Any] | None:
        return None

    async def settled_elsewhere(self, payment: dict[str, Any]) -> str | None:
        return None


def from_settings(ctx: Context, kind: type[TransferScheme] = TransferScheme) -> TransferScheme:
    c = ctx.settings.chain
    if not (c.token and c.payee):
        raise ValueError(f"the {kind.name} scheme needs chain.token and chain.payee")
    return kind(
        chain=ctx.chain,
        chain_id=ctx.chain_id,
        token=c.token,
        payee=c.payee,
        confirmations=int(c.confirmations or 0),
        timeout=ctx.settings.offer_timeout_seconds,
    )


class HashCharge(TransferScheme):
    """MPP's evm charge paid with a ``hash`` credential: a transfer to the payee the payer already
    sent, paying like ``transfer`` (its surplus is its sender's credit; one transaction pays once,
    whichever rail presents it). Nothing binds the transaction to the challenge (draft-evm-charge,
    "Hash Credential Binding"): whoever sees it could present it first, so the rail offers it only
    for amounts up to ``mpp_hash_max_usd`` (0, the default: never)."""

    name = "mpp-hash"
    rails = ("mpp",)

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        tx = proof.payload.get("hash")
        if not isinstance(tx, str) or not TX_HASH.fullmatch(tx):
            raise PaymentMalformed("payload.hash must be a transaction hash", code="invalid_payload")
        payment = await self.paid_by(tx, None)
        if payment.amount < quote.amount:  # (the sender's credit is not for whoever presents its transaction)
            raise PaymentInvalid(
                f"a hash credential pays by its transfer alone: {payment.amount} does not cover the quote "
                f"{quote.amount} (claim the transfer with a TransferClaim to use credit)",
                code="amount_insufficient",
            )
        return payment


def hash_from_settings(ctx: Context) -> TransferScheme:
    return from_settings(ctx, HashCharge)
