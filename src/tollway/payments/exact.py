"""x402 ``exact`` on EVM: an EIP-3009 ``transferWithAuthorization`` signed by the payer.

Checks, cheapest first (PROTOCOLS.md §1): recipient, exact value, validity window — it must
outlive the call and its settlement (``Settings.min_validity_seconds``) — and signature (local
recovery). Then, once the ledger has locked the authorization against replay and before the
upstream is asked anything, ``confirm`` runs the transfer itself as an ``eth_call`` from the
settlement account against the chain's pending state: a cancelled or used authorization, a
frozen payer, a token whose EIP-712 domain is not the one offered all fail there; the payer's
balance must also cover this payment and the others of theirs not yet on chain.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from ..errors import PaymentInvalid, PaymentMalformed
from . import eip3009
from .base import Offer, Proof, Quote, Verified
from .chain import AUTHORIZATION_STATE, BALANCE_OF, RpcError, authorization_used, authorized_transfer
from .token import TokenScheme

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
LOG_LOOKBACK = 50_000  # blocks searched for the transaction that used an authorization
# What a token's revert reasons (FiatTokenV2's wording) mean for the payer.
REVERT_REASONS = (
    ("exceeds balance", "insufficient_funds"),
    ("used or canceled", "invalid_exact_evm_nonce_already_used"),
    ("expired", "invalid_exact_evm_payload_authorization_valid_before"),
    ("not yet valid", "invalid_exact_evm_payload_authorization_valid_after"),
    ("invalid signature", "invalid_exact_evm_payload_signature"),
    ("blacklisted", "payer_blacklisted"),
)


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


class ExactEvm(TokenScheme):
    """The ``exact`` scheme for one EIP-3009 token on one EVM chain."""

    name = "exact"
    rails = ("x402", "mpp")  # (MPP's charge credential of type authorization)
    metered = False
    prepaid = False
    lapses = True

    def __init__(self, **where: Any) -> None:
        super().__init__(**where)
        self.domain = eip3009.domain_separator(self.extra["name"], self.extra["version"], self.chain_id, self.token)

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
        if auth.valid_before < now + self.min_validity:
            raise PaymentInvalid(
                f"authorization must stay valid at least {self.min_validity} s (validBefore >= now + "
                f"{self.min_validity}): the call and its settlement must fit in it",
                code="invalid_exact_evm_payload_authorization_valid_before",
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

    async def confirm(self, payment: Verified, owed: int, *, recheck: bool = False) -> None:
        now = time.monotonic() if recheck else self.refuse_if_short(payment.payer)
        to, data = self.settlement_call(payment.proof, payment.amount)
        balance_of = BALANCE_OF + bytes(12) + bytes.fromhex(payment.payer[2:])
        result, (balance,) = await self.chain.simulate(self.settler, to, data, [(self.token, balance_of)])
        if isinstance(result, RpcError):
            reason = result.revert_reason
            if reason is None:
                raise result  # not a revert: the RPC failed (503)
            code = next((c for k, c in REVERT_REASONS if k in reason.lower()), "payment_would_revert")
            if code == "insufficient_funds":
                self.remember_short(payment.payer, now)
            raise PaymentInvalid(f"the transfer would fail on chain: {reason[:200]}", code=code)
        if int(balance, 16) < owed:
            self.remember_short(payment.payer, now)
            raise PaymentInvalid(
                f"payer balance {int(balance, 16)} does not cover {owed} (this payment and others not yet on chain)",
                code="insufficient_funds",
            )

    def settled_amount(self, payment: Verified, due: int) -> int:
        return payment.amount

    def settlement_call(self, proof: dict[str, Any], amount: int) -> tuple[str, bytes]:
        auth, sig = decode_authorization(proof)
        return self.token, eip3009.transfer_calldata(auth, sig)

    async def settled_elsewhere(self, payment: dict[str, Any]) -> str | None:
        """The transaction that used this authorization, if the authorization's own transfer paid
        the payee the amount. (Only its own: a payer's transaction carrying out another payment's
        authorization and spending this one's nonce on a transfer to itself holds a transfer of
        the amount to the payee too — the other payment's.)"""
        auth, _ = decode_authorization(json.loads(payment["proof"]))
        state = AUTHORIZATION_STATE + bytes(12) + bytes.fromhex(auth.from_[2:]) + auth.nonce
        if int.from_bytes(await self.chain.call(self.token, state), "big") == 0:
            return None
        paid = (auth.from_, auth.to, auth.value)
        async for log in self.chain.logs(self.token, authorization_used(auth.from_, auth.nonce), LOG_LOOKBACK):
            receipt = await self.chain.receipt(log["transactionHash"])
            if isinstance(receipt, dict) and authorized_transfer(receipt, self.token, auth.from_, auth.nonce) == paid:
                return str(log["transactionHash"])
        return None  # cancelled, not used


from_settings = ExactEvm.from_settings
