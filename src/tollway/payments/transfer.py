"""The ``transfer`` scheme: the payer already sent the token to the payee in an ordinary
transaction and presents its hash, with a ``TransferClaim`` signature proving it is the sender
(a transaction hash is public; without the claim anyone could spend someone else's transfer).

Checks: the receipt exists and succeeded, has enough confirmations, and holds ``Transfer``
events of the token from the claimant to the payee; their sum is the payment. Each transaction
pays once (the ledger locks its hash). Whatever exceeds the call's cost becomes credit.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..config import Settings
from ..errors import PaymentInvalid, PaymentMalformed
from . import signed
from .base import Offer, Proof, Quote, Verified
from .chain import Chain, transfers_in

TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")


class TransferScheme:
    name = "transfer"

    def __init__(self, *, chain: Chain, chain_id: int, token: str, payee: str, confirmations: int) -> None:
        self.chain = chain
        self.chain_id = chain_id
        self.network = f"eip155:{chain_id}"
        self.token = token
        self.payee = payee
        self.confirmations = confirmations

    def offer(self, amount: int, max_timeout_seconds: int) -> Offer:
        extra = {"confirmations": self.confirmations}
        return Offer(self.name, self.network, self.token, self.payee, amount, max_timeout_seconds, extra)

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        p = proof.payload
        tx = p.get("transaction")
        if not isinstance(tx, str) or not TX_HASH.match(tx):
            raise PaymentMalformed("payload.transaction must be a transaction hash")
        claim = {"wallet": p.get("wallet"), "transaction": tx, "request": "0x" + quote.request_digest}
        wallet = signed.signer("TransferClaim", self.chain_id, self.token, claim, p.get("signature"))
        if str(p.get("wallet", "")).lower() != wallet:
            raise PaymentInvalid(
                "the transfer claim is not signed by its wallet (or not for this request)",
                code="invalid_transfer_claim",
            )
        receipt, head = await self.chain.batch([("eth_getTransactionReceipt", [tx]), ("eth_blockNumber", [])])
        if receipt is None:
            raise PaymentInvalid("transaction not found or not mined yet", code="transfer_not_found")
        if int(receipt.get("status", "0x0"), 16) != 1:
            raise PaymentInvalid("the transaction failed on chain", code="transfer_failed")
        if str(receipt.get("from", "")).lower() != wallet:
            # Only the claimant's own transaction: a settlement or payout of this gateway (sent by
            # its own account) also carries a Transfer to the payee, and must never pay twice.
            raise PaymentInvalid("the transaction was not sent by the claimant", code="transfer_mismatch")
        depth = int(head, 16) - int(receipt["blockNumber"], 16)
        if depth < self.confirmations:
            raise PaymentInvalid(
                f"transaction has {depth} confirmations, {self.confirmations} needed", code="transfer_unconfirmed"
            )
        paid = sum(v for frm, to, v in transfers_in(receipt, self.token) if frm == wallet and to == self.payee.lower())
        if paid == 0:
            raise PaymentInvalid(
                "the transaction moves none of the token from the claimant to the payee", code="transfer_mismatch"
            )
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

    async def confirm(self, payment: Verified, owed: Callable[[float], int]) -> None:
        return None  # checked on chain in verify: the money has already moved

    def settlement_call(self, payment: Verified) -> None:
        return None


def from_settings(settings: Settings, chain: Chain, chain_id: int) -> TransferScheme:
    c = settings.chain
    if not (c.token and c.payee):
        raise ValueError("the transfer scheme needs chain.token and chain.payee")
    return TransferScheme(chain=chain, chain_id=chain_id, token=c.token, payee=c.payee, confirmations=c.confirmations)
