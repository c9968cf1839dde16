"""x402 ``batch-settlement`` on EVM: a payer deposits once into the canonical escrow, then pays each
call with a cumulative voucher that is checked with a signature alone and claimed later, many
channels in one transaction (``channels.py`` in the gateway).

The server's side of the scheme (x402 ``specs/schemes/batch-settlement``, as the official SDK's
server does it), with tollway's metering:
- A voucher must build on exactly what the channel has been charged: ``maxClaimableAmount ==
  charged + amount`` (``amount``: this call's quote). The ledger checks it as it takes the
  channel for the call (one call per channel at a time); a client that lost count gets the
  corrective 402, carrying the channel's state and the last voucher it signed.
- A call is charged its *metered* cost (at most the quote), told in
  ``PAYMENT-RESPONSE.extra.chargedAmount``. A stream's headers leave before its cost is known: it
  says ``"0"`` there, is charged when it ends, and the client resynchronises through the
  corrective 402 of its next call.
- A ``deposit`` payload (an ERC-3009 ``ReceiveWithAuthorization`` to the deposit collector, and
  this call's voucher) is simulated, sent, and mined before the upstream is asked anything: once
  per channel (and top-up) the call waits a block, so that the escrow holds what the channel
  counts — and what a client reads on chain when it resynchronises — before anything is served.
  The channel counts the deposit in the ledger transaction that concludes it (the settlement
  worker's, in whichever process sees it mined): one mined after its call stopped waiting counts too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from coincurve import PrivateKey
from eth_account import Account

from ..errors import PaymentInvalid, PaymentMalformed
from ..jsonbytes import compact
from ..ledger.channels import ChannelRefused, ChannelUse
from ..ledger.store import Store, new_id
from ..pricing import MAX_AMOUNT
from . import channel as ch
from .base import Context, Offer, Outbox, Proof, Quote, Verified
from .chain import BALANCE_OF, RpcError
from .eip3009 import SignatureError, recover
from .token import TokenScheme

PREFIX = "invalid_batch_settlement_evm_"
MISMATCH = PREFIX + "cumulative_amount_mismatch"  # the corrective 402's error, as SDK clients compare it
REFUSALS = {  # ledger reason → (x402 error, what the payer reads)
    "not_found": (PREFIX + "channel_not_found", "this channel has no deposit here: send a deposit first"),
    "withdrawing": (
        PREFIX + "channel_not_found",
        "this channel's payer started a withdrawal: it takes no more vouchers (open a new channel)",
    ),
    "mismatch": (MISMATCH, "the voucher does not build on what the channel has been charged: resynchronise"),
    "busy": ("invalid_batch_settlement_evm_channel_busy", "another call holds this channel: retry when it ends"),
    "exceeds_balance": (
        PREFIX + "cumulative_exceeds_balance",
        "the voucher exceeds the channel's deposit: top it up with a deposit",
    ),
}


class BatchSettlementEvm(TokenScheme):
    """The ``batch-settlement`` scheme for one token on one EVM chain, through the canonical escrow."""

    name = "batch-settlement"
    metered = True
    prepaid = False
    lapses = False

    def __init__(
        self,
        *,
        authorizer_key: str,
        withdraw_delay: int,
        min_deposit_calls: int,
        outbox: Outbox,
        store: Store,
        deposit_wait: float,
        **where: Any,
    ) -> None:
        super().__init__(**where)
        self.outbox, self.store, self.deposit_wait = outbox, store, deposit_wait
        self.authorizer = PrivateKey(bytes.fromhex(authorizer_key.removeprefix("0x")))
        self.authorizer_address = Account.from_key(authorizer_key).address.lower()
        self.withdraw_delay = withdraw_delay
        self.min_deposit_calls = min_deposit_calls
        self.extra.update(
            receiverAuthorizer=self.authorizer_address, withdrawDelay=withdraw_delay, assetTransferMethod="eip3009"
        )

    @classmethod
    def from_settings(cls, ctx: Context) -> BatchSettlementEvm:  # type: ignore[override]
        c, channels = ctx.settings.chain, ctx.settings.channels
        if not (c.token and c.payee and c.settler_key and ctx.outbox and ctx.store):
            raise ValueError("the batch-settlement scheme needs chain.token, chain.payee and chain.settler_key")
        return cls(
            outbox=ctx.outbox,
            store=ctx.store,
            deposit_wait=ctx.settings.settle_margin_seconds,
            authorizer_key=channels.authorizer_key or c.settler_key,
            withdraw_delay=channels.withdraw_delay_seconds,
            min_deposit_calls=channels.min_deposit_calls,
            **cls.where(ctx),
        )

    def offer(self, amount: int) -> Offer:
        extra = {**self.extra, "minDeposit": str(amount * self.min_deposit_calls)}
        return Offer(self.name, self.network, self.token, self.payee, amount, self.timeout, extra)

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        p = ch.decode_payload(proof.payload)
        if p.type == "refund":
            raise PaymentInvalid(
                "a refund is asked for at /v1/channels/refund, not with a call", code=PREFIX + "payload_type"
            )
        self.check_channel(p)
        deposit = 0 if p.deposit is None else self._check_deposit(p.config, p.deposit, now)
        least = offer.amount * self.min_deposit_calls  # (extra.minDeposit: the gateway pays each deposit's gas)
        if deposit and deposit < least:
            raise PaymentInvalid(
                f"a deposit is at least {least} (extra.minDeposit: {self.min_deposit_calls} quotes)",
                code=PREFIX + "deposit_below_min_deposit",
            )
        base = p.voucher.max_claimable - offer.amount
        if base < 0:
            raise PaymentInvalid(REFUSALS["mismatch"][1], code=MISMATCH)
        use = replace(self._use(p, proof.payload), base=base, deposit=deposit)
        return Verified(
            scheme=self.name,
            network=self.network,
            asset=self.token.lower(),
            payer=p.config.payer,
            payee=self.payee.lower(),
            amount=offer.amount,
            # The channel's charged total is the replay lock (see ledger.channels): each use of a
            # voucher is a payment of its own.
            lock_key=f"{self.network}:channel:{use.id}:{use.signed_max}:{new_id()}",
            proof={"payload": proof.payload},
            channel=use,
        )

    def check_channel(self, p: ch.ChannelPayload) -> bytes:
        """The channel id of a payload whose channel pays us on our terms and whose voucher its
        payer authorizer signed; raises ``PaymentInvalid`` otherwise."""
        amounts = (p.voucher.max_claimable, p.deposit.amount if p.deposit else 0, p.refund_amount or 0)
        if max(amounts) > MAX_AMOUNT:
            raise PaymentMalformed("an amount is larger than the ledger counts", code="amount_too_large")
        config = p.config
        cid = ch.channel_id(config, self.chain_id)
        checks = (
            (p.voucher.channel_id == cid, "the voucher's channel id is not its config's", "channel_id_mismatch"),
            (config.receiver == self.payee.lower(), "the channel pays someone else", "receiver_mismatch"),
            (
                config.receiver_authorizer == self.authorizer_address,
                "the channel names another receiver authorizer",
                "receiver_authorizer_mismatch",
            ),
            (config.token == self.token.lower(), "the channel is in another token", "token_mismatch"),
            (
                config.withdraw_delay == self.withdraw_delay,
                f"the channel's withdraw delay must be {self.withdraw_delay} s",
                "withdraw_delay_mismatch",
            ),
            (
                config.payer_authorizer != ch.ZERO_ADDRESS,
                "the channel needs a payer authorizer (vouchers are checked by signature alone)",
                "authorizer_address_mismatch",
            ),
        )
        for ok, message, code in checks:
            if not ok:
                raise PaymentInvalid(message, code=PREFIX + code)
        try:
            signer = ch.voucher_signer(p.voucher, self.chain_id)
        except SignatureError as exc:
            raise PaymentInvalid(f"bad voucher signature: {exc}", code=PREFIX + "voucher_signature") from exc
        if signer != config.payer_authorizer:
            raise PaymentInvalid("the voucher is not signed by the payer authorizer", code=PREFIX + "voucher_signature")
        return cid

    def channel_use(self, proof: dict[str, Any]) -> ChannelUse:
        """What a payment (its ``Verified.proof``, as the ledger keeps it) asks of its channel, to
        charge it: also after a crash, for a stream another process meters."""
        return self._use(ch.decode_payload(proof["payload"]), proof["payload"])

    @staticmethod
    def _use(p: ch.ChannelPayload, payload: dict[str, Any]) -> ChannelUse:
        """What ``payload`` (decoded: ``p``) asks of its channel."""
        return ChannelUse(
            id="0x" + p.voucher.channel_id.hex(),
            config=compact(payload["channelConfig"]),
            base=0,
            signed_max=p.voucher.max_claimable,
            signature="0x" + p.voucher.signature.hex(),
            deposit=0 if p.deposit is None else p.deposit.amount,
        )

    def _check_deposit(self, config: ch.ChannelConfig, deposit: ch.Deposit, now: int) -> int:
        auth = deposit.authorization
        if not isinstance(auth, ch.Erc3009Deposit):
            raise PaymentInvalid(
                "deposit with an ERC-3009 authorization (this gateway offers assetTransferMethod eip3009)",
                code=PREFIX + "erc3009_authorization_required",
            )
        if auth.valid_after > now:
            raise PaymentInvalid("the deposit is not valid yet", code=PREFIX + "payload_authorization_valid_after")
        if auth.valid_before < now + self.min_validity:
            raise PaymentInvalid(
                f"the deposit authorization must stay valid at least {self.min_validity} s: the call and its "
                "settlement must fit in it",
                code=PREFIX + "payload_authorization_valid_before",
            )
        digest = ch.erc3009_deposit_digest(
            config, deposit, self.chain_id, str(self.extra["name"]), str(self.extra["version"])
        )
        try:
            signer = recover(digest, auth.signature)
        except SignatureError as exc:
            raise PaymentInvalid(f"bad deposit signature: {exc}", code=PREFIX + "deposit_payload") from exc
        if signer != config.payer:
            raise PaymentInvalid("the deposit is not signed by the channel's payer", code=PREFIX + "deposit_payload")
        return deposit.amount

    async def confirm(self, payment: Verified, owed: int, *, recheck: bool = False) -> None:
        """A voucher needs nothing more: the ledger took the channel against its deposit. A deposit
        is simulated from the settlement account — the payer's balance must cover it besides what
        they owe us elsewhere — then sent, and waited for until mined."""
        use = payment.channel
        if use is None or not use.deposit:
            return
        now = self.refuse_if_short(payment.payer)
        p = ch.decode_payload(payment.proof["payload"])
        to, data = ch.BATCH_SETTLEMENT_ADDRESS, ch.deposit_calldata(p.config, p.deposit)  # type: ignore[arg-type]
        owner = BALANCE_OF + bytes(12) + bytes.fromhex(payment.payer[2:])
        result, (balance,) = await self.chain.simulate(self.settler, to, data, [(self.token, owner)])
        if isinstance(result, RpcError):
            if result.revert_reason is None and not isinstance(result.data, str):
                raise result  # not a revert: the RPC failed (503)
            raise PaymentInvalid(
                f"the deposit would fail on chain: {(result.revert_reason or str(result.data))[:200]}",
                code=PREFIX + "deposit_simulation_failed",
            )
        if int(balance, 16) < owed - payment.amount + use.deposit:
            self.remember_short(payment.payer, now)
            raise PaymentInvalid(
                f"payer balance {int(balance, 16)} does not cover the deposit {use.deposit} and what it owes",
                code="insufficient_funds",
            )
        if await self.outbox.send("deposit", to, data, timeout=self.deposit_wait) is None:
            raise PaymentInvalid("the deposit reverted on chain", code=PREFIX + "deposit_transaction_failed")
        # (the settlement worker counts it in its channel as it sees it mined: ``Store.deposit_mined``)

    def settled_amount(self, payment: Verified, due: int) -> int:
        return min(due, payment.amount)

    def settlement_call(self, proof: dict[str, Any], amount: int) -> None:
        return None  # a deposit went on chain before the call; vouchers are claimed later, with others

    def response_extra(self, channel: dict[str, Any] | None, charged: int | None) -> dict[str, Any] | None:
        """``PAYMENT-RESPONSE.extra``: what this call was charged (``"0"`` for a stream, charged as
        it ends) and the channel's state after it."""
        if channel is None:
            return None
        return {"chargedAmount": str(charged or 0), "channelState": state(channel, channel["charged"] + (charged or 0))}

    def sign(self, digest: bytes) -> bytes:
        """The receiver authorizer's signature of an EIP-712 digest (a claim batch, a refund): r‖s‖v."""
        sig = self.authorizer.sign_recoverable(digest, hasher=None)
        return sig[:64] + bytes([sig[64] + 27])

    def channel_refused(self, refused: ChannelRefused) -> PaymentInvalid:
        code, message = REFUSALS[refused.reason]
        exc = PaymentInvalid(message, code=code)
        if refused.reason == "mismatch" and refused.state is not None:
            s = refused.state
            exc.offer_extra = {
                self.name: {
                    "channelState": state(s, s["charged"]),
                    "voucherState": {"signedMaxClaimable": str(s["signed_max"]), "signature": s["signature"]},
                }
            }
            exc.bare_error = True
        return exc

    async def settled_elsewhere(self, payment: dict[str, Any]) -> str | None:
        return None


def state(channel: dict[str, Any], charged: int) -> dict[str, Any]:
    """A channel's ``channelState``, as SDK clients read it."""
    return {
        "channelId": channel["id"],
        "balance": str(channel["balance"]),
        "totalClaimed": str(channel["claimed"]),
        "withdrawRequestedAt": channel["withdraw_at"],
        "refundNonce": str(channel["refund_nonce"]),
        "chargedCumulativeAmount": str(charged),
    }


from_settings = BatchSettlementEvm.from_settings
