"""x402 ``exact`` on EVM: an EIP-3009 ``transferWithAuthorization`` signed by the payer.

Checks, cheapest first (PROTOCOLS.md §1): recipient, exact value, validity window, signature
(local recovery), then — in ``confirm``, overlapped with the upstream call — the nonce's state
and the payer's balance on chain. The ledger's lock on ``lock_key`` keeps one authorization
from paying twice, across every replica sharing the database.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..errors import PaymentInvalid, PaymentMalformed
from . import eip3009
from .base import Offer, Proof, Quote, Verified
from .chain import Chain

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
VALID_BEFORE_MARGIN = 6  # seconds an authorization must still be valid for (as the reference)


def _address(v: Any, what: str) -> str:
    if not isinstance(v, str) or not ADDRESS.match(v):
        raise PaymentMalformed(f"authorization.{what} is not an address")
    return v.lower()


def _uint(v: Any, what: str) -> int:
    if isinstance(v, bool):
        raise PaymentMalformed(f"authorization.{what} is not an integer")
    if isinstance(v, int):
        n = v
    elif isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 78:
        n = int(v)
    else:
        raise PaymentMalformed(f"authorization.{what} is not a decimal integer")
    if not 0 <= n <= eip3009.UINT256_MAX:
        raise PaymentMalformed(f"authorization.{what} is out of range")
    return n


def decode_authorization(payload: dict[str, Any]) -> tuple[eip3009.Authorization, bytes]:
    auth = payload.get("authorization")
    sig = payload.get("signature")
    if not isinstance(auth, dict):
        raise PaymentMalformed("payload.authorization is missing")
    if not isinstance(sig, str) or not re.fullmatch(r"0x(?:[0-9a-fA-F]{2})*", sig):
        raise PaymentMalformed("payload.signature is not hex bytes")
    nonce = auth.get("nonce")
    if not isinstance(nonce, str) or not BYTES32.match(nonce):
        raise PaymentMalformed("authorization.nonce is not 32 bytes of hex")
    return (
        eip3009.Authorization(
            from_=_address(auth.get("from"), "from"),
            to=_address(auth.get("to"), "to"),
            value=_uint(auth.get("value"), "value"),
            valid_after=_uint(auth.get("validAfter"), "validAfter"),
            valid_before=_uint(auth.get("validBefore"), "validBefore"),
            nonce=bytes.fromhex(nonce[2:]),
        ),
        bytes.fromhex(sig[2:]),
    )


class ExactEvm:
    """The ``exact`` scheme for one EIP-3009 token on one EVM chain."""

    name = "exact"

    def __init__(
        self, *, chain: Chain, chain_id: int, token: str, token_name: str, token_version: str, payee: str
    ) -> None:
        self.chain = chain
        self.chain_id = chain_id
        self.network = f"eip155:{chain_id}"
        self.token = token
        self.payee = payee
        self.extra = {"name": token_name, "version": token_version}
        self.domain = eip3009.domain_separator(token_name, token_version, chain_id, token)

    def offer(self, amount: int, max_timeout_seconds: int) -> Offer:
        return Offer(self.name, self.network, self.token, self.payee, amount, max_timeout_seconds, dict(self.extra))

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        auth, sig = decode_authorization(proof.payload)
        if auth.to != self.payee.lower():
            raise PaymentInvalid("authorization pays someone else", code="invalid_exact_evm_payload_recipient_mismatch")
        if auth.value != offer.amount:
            raise PaymentInvalid(
                f"authorization value {auth.value} must equal the quoted amount {offer.amount}",
                code="invalid_exact_evm_payload_authorization_value_mismatch",
            )
        if auth.valid_after > now:
            raise PaymentInvalid(
                "authorization is not valid yet", code="invalid_exact_evm_payload_authorization_valid_after"
            )
        if auth.valid_before < now + VALID_BEFORE_MARGIN:
            raise PaymentInvalid(
                "authorization has expired", code="invalid_exact_evm_payload_authorization_valid_before"
            )
        try:
            signer = eip3009.recover(eip3009.digest(auth, self.domain), sig)
        except eip3009.SignatureError as exc:
            raise PaymentInvalid(f"bad signature: {exc}", code="invalid_exact_evm_payload_signature") from exc
        if signer != auth.from_:
            # Also what a signature for another token, chain or amount looks like.
            raise PaymentInvalid(
                "signature is not the payer's for this token and chain", code="invalid_exact_evm_payload_signature"
            )
        return Verified(
            scheme=self.name,
            network=self.network,
            asset=self.token.lower(),
            payer=auth.from_,
            payee=auth.to,
            amount=auth.value,
            lock_key=f"{self.network}:{self.token.lower()}:{auth.from_}:0x{auth.nonce.hex()}",
            proof={"authorization": proof.payload["authorization"], "signature": proof.payload["signature"]},
            chain_nonce=auth.nonce,
        )

    async def confirm(self, payment: Verified, owed: Callable[[float], int]) -> None:
        balance, used, read_at = await self.chain.token_state(self.token, payment.payer, payment.chain_nonce)
        if used:
            raise PaymentInvalid(
                "authorization nonce already used on chain", code="invalid_exact_evm_nonce_already_used"
            )
        due = owed(read_at)
        if balance < due:
            self.chain.forget_balance(self.token, payment.payer)
            raise PaymentInvalid(
                f"payer balance {balance} does not cover {due} (this payment and others not yet settled)",
                code="insufficient_funds",
            )

    def settlement_call(self, payment: Verified) -> tuple[str, bytes]:
        auth, sig = decode_authorization(payment.proof)
        return self.token, eip3009.transfer_calldata(auth, sig)


def from_settings(settings: Settings, chain: Chain, chain_id: int) -> ExactEvm:
    c = settings.chain
    if not (c.token and c.payee):
        raise ValueError("the exact scheme needs chain.token and chain.payee")
    return ExactEvm(
        chain=chain,
        chain_id=chain_id,
        token=c.token,
        token_name=c.token_name,
        token_version=c.token_version,
        payee=c.payee,
    )
