"""x402 ``upto`` on EVM: the payer authorises a *maximum* with a Permit2 witness transfer; once the
call is metered, tollway settles what it cost — through the x402 upto proxy — and nothing at all
when it cost nothing.

Checks, cheapest first (x402 ``specs/schemes/upto/scheme_upto_evm.md``): the proxy as spender, the
witness naming our payee as ``to`` and our settlement account as ``facilitator`` (only it may
settle), the token, the maximum equal to the offer, ``validAfter`` passed, a deadline that outlives
the call and its settlement, and the signature (local recovery). Then, once the ledger has locked
the Permit2 nonce against replay and before the upstream is asked anything, ``confirm`` runs the
settlement of the whole maximum as an ``eth_call`` from the settlement account against the
pending state, and reads the payer's balance and Permit2 allowance: a missing allowance is the
spec's 412 ``permit2_allowance_required`` — unless the payment carries an ``eip2612GasSponsoring``
permit, which ``settleWithPermit`` submits first, so that a wallet with no approval and no gas can
pay.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import PaymentInvalid, PreconditionFailed
from ..keccak import keccak
from . import permit2
from .base import Context, Offer, Proof, Quote, Verified
from .chain import BALANCE_OF, RpcError
from .token import TokenScheme

if TYPE_CHECKING:
    from ..ledger.store import Store

PULLS = ("upto", "mpp-permit2")  # the schemes whose payments the payer's Permit2 allowance pays

ALLOWANCE = keccak(b"allowance(address,address)")[:4]
# What the proxy's, Permit2's and the token's reverts mean for the payer.
CUSTOM_ERRORS = {
    keccak(b"InvalidNonce()")[:4]: ("the Permit2 nonce was already used", "permit2_nonce_used"),
    keccak(b"SignatureExpired(uint256)")[:4]: ("the Permit2 deadline has passed", "permit2_deadline_expired"),
    keccak(b"InvalidSigner()")[:4]: ("the Permit2 signature is not the payer's", "invalid_permit2_signature"),
    keccak(b"InvalidSignature()")[:4]: ("the Permit2 signature is malformed", "invalid_permit2_signature"),
    keccak(b"PaymentTooEarly()")[:4]: ("the payment is not valid yet", "permit2_not_yet_valid"),
    keccak(b"Permit2612Failed(bytes)")[:4]: ("the EIP-2612 permit was refused", "invalid_eip2612_permit"),
}
REVERT_REASONS = (
    ("exceeds balance", "insufficient_funds"),
    ("exceeds allowance", "permit2_allowance_required"),
    ("blacklisted", "payer_blacklisted"),
)
EIP2612_DECLARATION = {  # (its fields: the SDK's Eip2612GasSponsoringInfo; no schema, to keep the 402 small)
    "eip2612GasSponsoring": {
        "info": {"description": "an EIP-2612 permit (owner -> Permit2) may come with an upto payment", "version": "1"}
    }
}


class UptoEvm(TokenScheme):
    """The ``upto`` scheme for one token on one EVM chain, settled through the x402 upto proxy."""

    name = "upto"
    metered = True
    prepaid = False
    lapses = True

    def __init__(self, *, store: Store | None = None, **where: Any) -> None:
        super().__init__(**where)
        self.store = store  # (the payer's other Permit2 pulls in flight: see ``confirm``)
        self.extra.update(facilitatorAddress=self.settler, assetTransferMethod="permit2")
        self.domain = permit2.domain_separator(self.chain_id)

    @classmethod
    def where(cls, ctx: Context) -> dict[str, Any]:
        return {**super().where(ctx), "store": ctx.store}

    def extensions(self) -> dict[str, Any]:
        return EIP2612_DECLARATION

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        auth, sig = permit2.decode_payload(proof.payload)
        checks = (
            (
                auth.spender == permit2.UPTO_PROXY_ADDRESS.lower(),
                "the permit's spender is not the x402 upto proxy",
                "invalid_permit2_spender",
            ),
            (auth.to == self.payee.lower(), "the witness pays someone else", "invalid_permit2_recipient_mismatch"),
            (
                auth.facilitator == self.settler.lower(),
                "the witness names another facilitator",
                "invalid_upto_evm_payload_facilitator",
            ),
            (auth.token == self.token.lower(), "the permit is for another token", "permit2_token_mismatch"),
            (
                auth.max_amount == offer.amount,
                f"the permitted maximum {auth.max_amount} must equal the quoted maximum {offer.amount}",
                "permit2_amount_mismatch",
            ),
            (auth.valid_after <= now, "the payment is not valid yet", "permit2_not_yet_valid"),
            (
                auth.deadline >= now + self.min_validity,
                f"the permit must stay valid at least {self.min_validity} s "
                f"(deadline >= now + {self.min_validity}): the call and its settlement must fit in it",
                "permit2_deadline_expired",
            ),
        )
        for ok, message, code in checks:
            if not ok:
                raise PaymentInvalid(message, code=code)
        try:
            signer = permit2.recover(permit2.digest(auth, self.domain), sig)
        except permit2.SignatureError as exc:
            raise PaymentInvalid(f"bad signature: {exc}", code="invalid_permit2_signature") from exc
        if signer != auth.owner:
            raise PaymentInvalid("the permit is not signed by the payer", code="invalid_permit2_signature")
        sponsored = permit2.decode_eip2612_permit(proof.extensions)
        if sponsored is not None and (
            sponsored.owner != auth.owner or sponsored.token != auth.token or sponsored.value != auth.max_amount
        ):
            raise PaymentInvalid("the EIP-2612 permit does not match the payment", code="invalid_eip2612_permit")
        if sponsored is not None:
            try:  # (its calldata splits it: v, r and s must be ones a token's ecrecover takes)
                permit2.split_signature(sponsored.signature)
            except permit2.SignatureError as exc:
                raise PaymentInvalid(f"the EIP-2612 permit's signature: {exc}", code="invalid_eip2612_permit") from None
        if sponsored is not None and sponsored.deadline < now + self.min_validity:
            raise PaymentInvalid(  # (Permit2 is approved by it as the payment settles: it must outlive the call too)
                f"the EIP-2612 permit must stay valid at least {self.min_validity} s", code="invalid_eip2612_permit"
            )
        kept: dict[str, Any] = {"payload": proof.payload}
        if sponsored is not None:
            kept["eip2612GasSponsoring"] = proof.extensions["eip2612GasSponsoring"]  # type: ignore[index]
        return Verified(
            scheme=self.name,
            network=self.network,
            asset=self.token.lower(),
            payer=auth.owner,
            payee=auth.to,
            amount=auth.max_amount,
            lock_key=f"{self.network}:permit2:{auth.owner}:{auth.nonce}",
            proof=kept,
        )

    async def confirm(self, payment: Verified, owed: int, *, recheck: bool = False) -> None:
        if payment.amount == 0:  # (an offer the payer's credit reduced to 0: nothing will be pulled)
            return
        now = time.monotonic() if recheck else self.refuse_if_short(payment.payer)
        to, data = self._settle(payment.proof, payment.amount)
        owner = bytes(12) + bytes.fromhex(payment.payer[2:])
        reads = [
            (self.token, BALANCE_OF + owner),
            (self.token, ALLOWANCE + owner + bytes(12) + _raw(permit2.PERMIT2_ADDRESS)),
        ]
        result, (balance, allowance) = await self.chain.simulate(self.settler, to, data, reads)
        # The allowance must cover every Permit2 pull of the payer's not yet on chain, this one and
        # the others (each would be served, and the last to settle would revert) — read from the
        # ledger only when it does not cover everything the payer owes (``owed``, every scheme's).
        # A sponsored permit *sets* the allowance to its value as its settlement runs (and one permit
        # may come with several payments): every such pull must fit in that value, whatever the
        # allowance is now. Checked again, a call's own pull is what matters (its simulation says).
        sponsored = permit2.decode_eip2612_permit(payment.proof)
        need, have = payment.amount, int(allowance, 16) if sponsored is None else sponsored.value
        if not recheck and (have < owed or sponsored is not None) and self.store is not None:
            pulls = self.store.unsettled_amount(self.network, self.token.lower(), payment.payer, schemes=PULLS)
            need = max(need, pulls)
        if have < need and not (recheck and sponsored is not None):
            others = " and the others not yet on chain" if need > payment.amount else ""
            raise PreconditionFailed(
                f"the payer's Permit2 allowance {have} does not cover {need} (this payment's maximum{others}): "
                "approve Permit2 for this token once, or send an eip2612GasSponsoring permit with the payment"
                if sponsored is None
                else f"the permit sets the payer's Permit2 allowance to {have}, which does not cover {need} (this "
                f"payment's maximum{others}): wait until the others settle, or approve Permit2 for this token",
                code="permit2_allowance_required",
            )
        if isinstance(result, RpcError):
            message, code = self._reason(result)
            if code == "insufficient_funds":
                self.remember_short(payment.payer, now)
            raise PaymentInvalid(f"the settlement would fail on chain: {message}", code=code)
        if int(balance, 16) < owed:
            self.remember_short(payment.payer, now)
            raise PaymentInvalid(
                f"payer balance {int(balance, 16)} does not cover {owed} (this payment's maximum and others not yet "
                "on chain)",
                code="insufficient_funds",
            )

    @staticmethod
    def _reason(error: RpcError) -> tuple[str, str]:
        data = error.data if isinstance(error.data, str) else ""
        selector = bytes.fromhex(data[2:10]) if data.startswith("0x") and len(data) >= 10 else b""
        if selector in CUSTOM_ERRORS:
            return CUSTOM_ERRORS[selector]
        reason = error.revert_reason
        if reason is None:
            raise error  # not a revert: the RPC failed (503)
        code = next((c for k, c in REVERT_REASONS if k in reason.lower()), "payment_would_revert")
        return reason[:200], code

    def settled_amount(self, payment: Verified, due: int) -> int:
        return min(due, payment.amount)

    def settlement_call(self, proof: dict[str, Any], amount: int) -> tuple[str, bytes] | None:
        return None if amount == 0 else self._settle(proof, amount)  # a call that cost nothing moves nothing

    def _settle(self, proof: dict[str, Any], amount: int) -> tuple[str, bytes]:
        auth, sig = permit2.decode_payload(proof["payload"])
        sponsored = permit2.decode_eip2612_permit(proof)
        if sponsored is not None:
            return permit2.UPTO_PROXY_ADDRESS, permit2.settle_with_permit_calldata(sponsored, auth, amount, sig)
        return permit2.UPTO_PROXY_ADDRESS, permit2.settle_calldata(auth, amount, sig)

    async def settled_elsewhere(self, payment: dict[str, Any]) -> str | None:
        return None  # only our settlement account may settle this permit (the witness says so)


def _raw(address: str) -> bytes:
    return bytes.fromhex(address[2:])


from_settings = UptoEvm.from_settings
