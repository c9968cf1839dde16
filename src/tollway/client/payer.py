"""The I/O-free half of the paying client: read a 402, choose an offer, sign, keep the budget.

Shared by the async and sync transports. Spend limits are in USD (the assets are USD
stablecoins); only offers for explicitly allowed (network, asset) pairs are ever signed.

The gateway is not trusted with the budget: what is signed counts from the moment it is signed —
a payment the gateway then refuses, answers without a settlement or never answers stays counted,
since the gateway still holds a signature it could settle (the client cannot tell it never will).
Two exceptions: an ``upto`` payment counts, once its answer says, what moved rather than its
maximum (the session total then takes the gateway's word; its maximum is within the per-call
limit); and a Permit2 payment refused for want of the wallet's Permit2 approval (412) is not
counted — after the first, none is signed for that asset again. A channel counts the highest
voucher signed on it; deposits count against ``max_deposit_usd`` once signed, and a refund does
not give that back.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.signers.local import LocalAccount

from .. import siwe
from ..errors import PaymentMalformed
from ..payments import eip3009, permit2, signed
from ..payments.x402 import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    X_PAYMENT_RESPONSE,
    b64json,
    unb64json,
)
from . import mpp
from .channels import MISMATCH, Channel, digits

BATCH_SETTLEMENT = "batch-settlement"
SIGN_IN_WITH_X = "SIGN-IN-WITH-X"  # the header
SIGN_IN_WITH_X_KEY = "sign-in-with-x"  # the 402's extension


class PaymentRefused(Exception):
    """The client will not pay this 402 (no allowed offer, or over a spend limit)."""


@dataclass(frozen=True)
class AllowedAsset:
    network: str  # CAIP-2, e.g. eip155:8453
    asset: str  # token address
    decimals: int = 6
    name: str = "USD Coin"  # the token's EIP-712 domain (an MPP challenge does not say it; x402 offers do)
    version: str = "2"


@dataclass(frozen=True)
class PaidCall:
    network: str
    asset: str
    amount: int  # what the payment authorised (upto: its maximum; credit: 0)
    transaction: str | None
    receipt_id: str | None
    usd: Decimal  # what the spend limits counted
    scheme: str = "exact"
    settled: int | None = None  # what moved on chain, when the answer says (upto, not streamed)


@dataclass
class Payer:
    """Pays x402 v2 offers for one wallet, within limits: ``upto`` (the metered cost moves)
    before ``exact`` (the quote moves; the surplus becomes credit), in the order of ``schemes``;
    signs in (Sign-In-With-X) so that the wallet's credit pays what it covers. With
    ``batch-settlement`` among its schemes it pays through a channel: it deposits (the gateway's
    suggested deposit, within ``max_deposit_usd``), tops up, and signs a voucher per call."""

    account: LocalAccount
    allowed: list[AllowedAsset]
    max_per_call_usd: Decimal = Decimal("1")
    max_total_usd: Decimal = Decimal("10")
    schemes: tuple[str, ...] = ("upto", "exact")  # the on-chain schemes it pays, preferred first
    # The protocols it answers, preferred first: x402, and MPP (HTTP Payment authentication) when a
    # 402 carries no x402 offer or MPP comes first; the MPP credential types it makes, preferred first.
    rails: tuple[str, ...] = ("x402", "mpp")
    mpp_types: tuple[str, ...] = ("permit2", "authorization")
    spent_usd: Decimal = Decimal(0)
    max_deposit_usd: Decimal = Decimal("10")  # most deposited into channels in the session (refundable, not spent)
    # The longest a signature may stay valid (an offer's maxTimeoutSeconds, an MPP challenge's
    # expiry): a gateway asking for longer is refused — it could keep payments to settle at leisure.
    max_validity_seconds: int = 3600
    deposited_usd: Decimal = Decimal(0)
    history: list[PaidCall] = field(default_factory=list)
    channels: dict[str, Channel] = field(default_factory=dict)  # channel id → its totals
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _proofs: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)  # origin → (until, header)
    _credit_in_use: bool = field(default=False, repr=False)
    _no_permit2: set[tuple[str, str]] = field(default_factory=set, repr=False)  # (network, asset) without approval
    # Whether the wallet may have credit worth signing in for: not after a sign-in the credit did not
    # cover, until a payment of the quote (exact) leaves a surplus again.
    credit_hint: bool = field(default=True, repr=False)

    def credit_turn(self) -> bool:
        """Whether a new call may use the wallet's credit (sign in on its 402). One call at a time
        does: calls in parallel would each be quoted against the same credit, and all but one find
        it spent. The others pay on chain."""
        with self._lock:
            if self._credit_in_use:
                return False
            self._credit_in_use = True
            return True

    def end_credit_turn(self) -> None:
        with self._lock:
            self._credit_in_use = False

    @classmethod
    def from_key(cls, key: str, allowed: list[AllowedAsset], **limits: Any) -> Payer:
        return cls(Account.from_key(key), allowed, **limits)

    def _allowed(self, offer: dict[str, Any]) -> AllowedAsset | None:
        for a in self.allowed:
            if offer.get("network") == a.network and str(offer.get("asset", "")).lower() == a.asset.lower():
                return a
        return None

    def choose(
        self, required: dict[str, Any], max_usd: Decimal | None = None, already: Decimal = Decimal(0)
    ) -> tuple[dict[str, Any], Decimal]:
        """The allowed offer to pay — credit first (no chain transaction), then by ``schemes``
        (``upto`` only where Permit2 is approved), the cheapest of a kind — and the most USD it
        takes from the wallet (0 for credit). ``max_usd`` lowers the per-call limit for this call,
        of which ``already`` was signed by its earlier attempts."""
        limit = self._call_limit(max_usd) - already
        rank = {"credit": -1, **{name: i for i, name in enumerate(self.schemes)}}
        accepts = required.get("accepts")
        candidates = []
        for offer in _offers(required):
            terms = self._terms(offer) if offer.get("scheme") in rank else None
            if terms is None or not self._lasting(offer.get("maxTimeoutSeconds") or 300):
                continue
            asset, usd, credit = terms
            if offer["scheme"] == "upto" and (asset.network, asset.asset.lower()) in self._no_permit2:
                continue
            if offer["scheme"] == BATCH_SETTLEMENT:  # (a voucher takes what it signs beyond the highest)
                try:
                    usd = Decimal(self.channel(offer).adds(self.account, offer)).scaleb(-asset.decimals)
                except MALFORMED:
                    continue
            whole = usd + credit
            if whole > limit:
                raise PaymentRefused(f"the call costs up to ${whole}, over the per-call limit ${limit}")
            candidates.append((rank[offer["scheme"]], usd, offer))
        if not candidates:
            raise PaymentRefused(f"no offer in an allowed asset and scheme, well formed: {str(accepts)[:500]}")
        _, usd, offer = min(candidates, key=lambda c: (c[0], c[1]))
        return offer, usd if offer["scheme"] != "credit" else Decimal(0)

    def credit_within_limits(
        self, required: dict[str, Any], max_usd: Decimal | None = None, already: Decimal = Decimal(0)
    ) -> None:
        """Before signing in on a 402, so that the wallet's credit pays the call: the largest quote its
        offers in allowed assets state (a call served from credit is held and charged as a metered
        one, whose quote is the largest), credit included, within the per-call limit — else
        ``PaymentRefused``. (Credit is not counted against the session limit: that bounds what this
        client signs, and an exact payment's surplus, which becomes credit, was counted in full.)"""
        limit = self._call_limit(max_usd) - already
        quotes = [usd + credit for _, usd, credit in filter(None, map(self._terms, _offers(required)))]
        if not quotes:
            raise PaymentRefused(f"no offer in an allowed asset, well formed: {str(required.get('accepts'))[:500]}")
        if (most := max(quotes)) > limit:
            raise PaymentRefused(f"the call costs up to ${most}, over the per-call limit ${limit}")

    def _terms(self, offer: dict[str, Any]) -> tuple[AllowedAsset, Decimal, Decimal] | None:
        """An offer's asset, amount and the wallet's credit its quote is less by (USD), if it is in an
        allowed asset and well formed; else None."""
        asset = self._allowed(offer)
        amount, credit = str(offer.get("amount", "")), str((offer.get("extra") or {}).get("credit", "0"))
        if asset is None or not digits(amount) or not digits(credit):
            return None
        return asset, Decimal(int(amount)).scaleb(-asset.decimals), Decimal(int(credit)).scaleb(-asset.decimals)

    def _call_limit(self, max_usd: Decimal | None) -> Decimal:
        """The most one call may take: the per-call limit, lowered by this call's own (``max_usd``)."""
        return self.max_per_call_usd if max_usd is None else min(self.max_per_call_usd, max_usd)

    def _lasting(self, seconds: Any) -> bool:
        """Whether a signature valid for ``seconds`` is one this payer makes (see ``max_validity_seconds``)."""
        return isinstance(seconds, int) and not isinstance(seconds, bool) and 0 < seconds <= self.max_validity_seconds

    def _reserve(self, usd: Decimal) -> None:
        """Take ``usd`` from the session's budget, before signing (``_release``: nothing was signed)."""
        with self._lock:
            if self.spent_usd + usd > self.max_total_usd:
                raise PaymentRefused(f"paying ${usd} would exceed the session limit ${self.max_total_usd}")
            self.spent_usd += usd

    def _release(self, usd: Decimal) -> None:
        with self._lock:
            self.spent_usd -= usd

    def no_permit2(self, offer: dict[str, Any], pending: Pending | None = None) -> None:
        """The gateway says this wallet has not approved Permit2 for the offer's asset: pay it
        with other schemes from now on. The Permit2 payment it refused (``pending``) is not counted:
        it cannot move money without that approval (the one exception to "signed counts": after
        it, none is signed for the asset — but those of calls already under way)."""
        with self._lock:
            if pending is not None:
                self.spent_usd -= pending.usd
            self._no_permit2.add((str(offer["network"]), str(offer["asset"]).lower()))

    def sign_in(self, declared: dict[str, Any], origin: str) -> dict[str, str] | None:
        """``SIGN-IN-WITH-X`` answering a gateway's declaration of the extension, if it is for the
        gateway at ``origin`` and on a chain this wallet pays on; else None."""
        info, chains = declared.get("info"), declared.get("supportedChains")
        if not isinstance(info, dict) or not isinstance(chains, list):
            return None
        networks = {a.network for a in self.allowed}
        chain = next(
            (c for c in chains if isinstance(c, dict) and c.get("type") == "eip191" and c.get("chainId") in networks),
            None,
        )
        uri = str(info.get("uri", ""))
        if chain is None or signed.origin_of(uri) != origin or info.get("domain") != urlsplit(origin).netloc:
            return None
        return {SIGN_IN_WITH_X: b64json(siwe.sign(self.account, info, chain["chainId"]))}

    def wallet_header(self, origin: str, now: int | None = None) -> dict[str, str]:
        """``X-Tollway-Wallet``: proves this wallet to the gateway at ``origin``, so its quotes are
        reduced by the wallet's credit there."""
        now = int(time.time()) if now is None else now
        origin = signed.origin_of(origin)
        cached = self._proofs.get(origin)
        if cached is None or cached[0] < now + 60:
            a = self.allowed[0]
            until = now + 3600
            msg = {"wallet": self.account.address, "origin": origin, "validBefore": str(until)}
            sig = signed.sign("WalletProof", self.account.key, chain_id_of(a.network), a.asset, msg)
            cached = self._proofs[origin] = (until, b64json({**msg, "signature": sig}))
        return {"X-Tollway-Wallet": cached[1]}

    def withdrawal(
        self, amount: int, origin: str, asset: AllowedAsset | None = None, now: int | None = None
    ) -> dict[str, Any]:
        """The signed body of ``POST <origin>/v1/credit/withdrawals``: pay ``amount`` of credit out
        to this wallet."""
        a = asset or self.allowed[0]
        now = int(time.time()) if now is None else now
        w = {
            "wallet": self.account.address,
            "origin": signed.origin_of(origin),
            "amount": str(amount),
            "nonce": "0x" + secrets.token_hex(32),
            "validBefore": str(now + 600),
        }
        return {
            "withdrawal": w,
            "signature": signed.sign("Withdrawal", self.account.key, chain_id_of(a.network), a.asset, w),
        }

    def prepare(
        self,
        response_headers: Any,
        origin: str,
        now: int | None = None,
        max_usd: Decimal | None = None,
        already: Decimal = Decimal(0),
    ) -> Pending:
        """Answer a 402 from the gateway at ``origin``: the payment to retry with, its USD taken
        from the budget (``already``: what this call's earlier attempts signed). A 402 describing a
        resource at another origin is refused: a server must not relay another's quotes for us to
        sign. A malformed 402 is refused, and costs nothing."""
        raw = response_headers.get(PAYMENT_REQUIRED)
        challenge = mpp.challenge(response_headers) if "mpp" in self.rails else None
        if challenge is not None and (self.rails[0] == "mpp" or not raw):
            return self._pay_mpp(challenge, max_usd, already)
        if not raw:
            raise PaymentRefused("402 without a PAYMENT-REQUIRED header (x402 v2)")
        required = _required(response_headers)
        if required is None:
            raise PaymentRefused("PAYMENT-REQUIRED is not an x402 document")
        resource = required.get("resource")
        if resource is not None and not isinstance(resource, dict):
            raise PaymentRefused("PAYMENT-REQUIRED.resource is not an object")
        url = str((resource or {}).get("url", ""))
        if url and signed.origin_of(url) != origin:
            raise PaymentRefused(f"the 402 is for {signed.origin_of(url)}, not {origin}: not signing it")
        offer, usd = self.choose(required, max_usd, already)
        self._reserve(usd)
        now = int(time.time()) if now is None else now
        try:
            if offer["scheme"] == BATCH_SETTLEMENT:
                inner, deposit, usd = self._voucher(offer, usd)
            else:
                sign = {
                    "credit": lambda: sign_credit(self.account, offer, now, origin),
                    "upto": lambda: sign_upto(self.account, offer, now),
                }
                inner, deposit = sign.get(offer["scheme"], lambda: sign_exact(self.account, offer, now))(), 0
        except MALFORMED as exc:  # (nothing was signed)
            self._release(usd)
            why = f"the {offer['scheme']} offer is malformed ({type(exc).__name__}): not paying it"
            raise PaymentRefused(why) from None
        except PaymentRefused:  # (nothing was signed)
            self._release(usd)
            raise
        payload = {
            "x402Version": 2,
            "resource": required.get("resource"),
            "accepted": offer,
            "payload": inner,
            "extensions": {},
        }
        total = int(inner["voucher"]["maxClaimableAmount"]) if offer["scheme"] == BATCH_SETTLEMENT else 0
        return Pending({PAYMENT_SIGNATURE: b64json(payload)}, offer, usd, deposit, total)

    def _pay_mpp(self, challenge: dict[str, Any], max_usd: Decimal | None, already: Decimal) -> Pending:
        """Answer an MPP evm charge challenge, within the limits, with the first credential type
        this wallet makes that it lists (permit2 only where this wallet has approved Permit2)."""
        terms, details = challenge["terms"], challenge["terms"]["methodDetails"]
        expires = mpp.expiry(challenge)
        if expires is None or not self._lasting(expires - int(time.time())):
            raise PaymentRefused(
                f"the MPP challenge's expiry is missing, past, or more than {self.max_validity_seconds} s ahead"
            )
        offer = {
            "rail": "mpp",
            "network": f"eip155:{details.get('chainId')}",
            "asset": str(terms.get("currency", "")),
            "amount": str(terms.get("amount", "")),
        }
        asset = self._allowed(offer)
        if asset is None or not digits(offer["amount"]):
            raise PaymentRefused(
                f"the MPP challenge asks for {offer['amount']} of {offer['asset']} on {offer['network']}"
            )
        listed = details.get("credentialTypes")
        listed = listed if isinstance(listed, list) else []
        unapproved = (asset.network, asset.asset.lower()) in self._no_permit2
        kinds = [
            k
            for k in self.mpp_types
            if k in listed and not (k == "permit2" and (unapproved or not details.get("spender")))
        ]
        if not kinds:
            raise PaymentRefused(f"the MPP challenge takes no credential this client makes: {listed}")
        usd = Decimal(int(offer["amount"])).scaleb(-asset.decimals)
        limit = self._call_limit(max_usd) - already
        if usd > limit:
            raise PaymentRefused(f"the call costs up to ${usd}, over the per-call limit ${limit}")
        self._reserve(usd)
        try:
            header = mpp.credential(self.account, challenge, kinds[0], asset.name, asset.version)
        except MALFORMED as exc:  # (nothing was signed)
            self._release(usd)
            raise PaymentRefused(f"the MPP challenge is malformed ({type(exc).__name__}): not paying it") from None
        return Pending({"Authorization": header}, {**offer, "scheme": f"mpp-{kinds[0]}"}, usd)

    def refund_headers(
        self, response_headers: Any, amount: int | None = None
    ) -> tuple[dict[str, str], dict[str, Any]] | None:
        """Answer the refund endpoint's 402 (its channel terms, or its count of the channel to
        resynchronise from): the request headers asking for this wallet's channel's unclaimed rest
        (or ``amount`` of it) back, and the offer; None if it offers no channel this wallet may pay in."""
        accepts = (_required(response_headers) or {}).get("accepts")
        offers = [o for o in accepts if isinstance(o, dict)] if isinstance(accepts, list) else []
        offer = next((o for o in offers if o.get("scheme") == BATCH_SETTLEMENT), None)
        if offer is None or self._allowed(offer) is None:
            return None
        try:
            channel = self.channel(offer)
        except MALFORMED as exc:
            raise PaymentRefused(f"the refund's channel terms are malformed ({type(exc).__name__})") from None
        extra = offer.get("extra")
        if isinstance(extra, dict) and "channelState" in extra:
            channel.resync(self.account, extra)
        doc = {"x402Version": 2, "accepted": offer, "payload": channel.refund_payload(self.account, amount)}
        return {PAYMENT_SIGNATURE: b64json(doc)}, offer

    def refunded(self, offer: dict[str, Any], amount: int) -> None:
        """``amount`` came back from the channel of ``offer``: it holds less (what it may be deposited
        again is still bounded by ``max_deposit_usd``: the gateway's word is all the client has)."""
        with self._lock:
            channel = self.channel(offer)
            channel.balance -= min(max(amount, 0), channel.balance)

    def channel(self, offer: dict[str, Any]) -> Channel:
        """This wallet's channel with the gateway of a batch-settlement ``offer``."""
        fresh = Channel.of(self.account, offer)
        return self.channels.setdefault(fresh.id, fresh)

    def _voucher(self, offer: dict[str, Any], usd: Decimal) -> tuple[dict[str, Any], int, Decimal]:
        """The payload paying ``offer`` (``usd`` reserved for it) on this wallet's channel — with a
        deposit when the channel does not hold enough (the gateway's least, ``extra.minDeposit``, or
        what is missing if more) — the deposit, and what its voucher signs beyond the highest one
        before it (the rest of ``usd`` goes back to the budget)."""
        channel = self.channel(offer)
        extra = offer.get("extra") or {}
        amount = int(offer["amount"])
        suggested = str(extra.get("minDeposit", "0"))
        decimals = self._allowed(offer).decimals  # type: ignore[union-attr]  # (chosen: allowed)
        with self._lock:  # (another thread's call may move the channel's totals: read them once, here)
            if "channelState" in extra:  # a corrective 402: the gateway counted another total
                channel.resync(self.account, extra)
            if Decimal(channel.adds(self.account, offer)).scaleb(-decimals) > usd:
                raise PaymentRefused("the channel's charged total moved past what this call's limits allow")
            deposit = 0
            if channel.needs(amount):
                deposit = max(channel.needs(amount), int(suggested) if digits(suggested) else 0)
            deposit_usd = Decimal(deposit).scaleb(-decimals)
            if deposit_usd > self.max_deposit_usd - self.deposited_usd:
                raise PaymentRefused(f"a deposit of ${deposit_usd} would exceed the limit ${self.max_deposit_usd}")
            before = channel.signed
            payload = channel.payload(self.account, offer, deposit)
            self.deposited_usd += deposit_usd
            signed = Decimal(channel.signed - before).scaleb(-decimals)
            self.spent_usd -= usd - signed
        return payload, deposit, signed

    def outdone(self, pending: Pending, response_headers: Any) -> Decimal:
        """A voucher refused by a corrective 402 that shows, by this wallet's own signature, a higher
        voucher signed before (a process that started afresh signs from zero) adds nothing the gateway
        could not claim already: what it was counted goes back to the budget, and is returned. Only a
        higher one: a gateway could show the refused voucher itself, and have the next signed on top."""
        offer = pending.offer
        if offer is None or offer.get("scheme") != BATCH_SETTLEMENT or not pending.usd:
            return Decimal(0)
        accepts = (_required(response_headers) or {}).get("accepts")
        channel = self.channel(offer)
        for o in accepts if isinstance(accepts, list) else []:
            extra = o.get("extra") if isinstance(o, dict) else None
            totals = channel.corrected(self.account, extra) if isinstance(extra, dict) else None
            if totals is not None and totals[2] > pending.total:
                with self._lock:
                    self.spent_usd -= pending.usd
                return pending.usd
        return Decimal(0)

    def conclude(self, pending: Pending, status: int, response_headers: Any) -> None:
        """Record a paid response — an ``upto`` payment counting, once the answer says, what moved
        rather than its maximum — or give the reservation back if the call was not paid."""
        if pending.offer is not None and pending.offer.get("rail") == "mpp":
            paid = mpp.receipt(response_headers) if status < 400 else None
            if paid is None or paid.get("status") != "success":
                return  # (not paid, it says: the credential stays counted)
            o, receipt_id = pending.offer, response_headers.get("x-tollway-receipt")
            self.history.append(
                PaidCall(
                    o["network"],
                    o["asset"],
                    int(o["amount"]),
                    paid.get("reference"),
                    receipt_id,
                    pending.usd,
                    o["scheme"],
                )
            )
            return
        raw = response_headers.get(PAYMENT_RESPONSE) or response_headers.get(X_PAYMENT_RESPONSE)
        try:
            doc = unb64json(raw) if raw and status < 400 else {}
        except PaymentMalformed:
            doc = {}
        if not isinstance(doc, dict) or not doc.get("success"):
            return  # (not settled, it says: what was signed stays counted)
        o = pending.offer or {"network": doc.get("network"), "asset": "", "amount": "0", "scheme": "credit"}
        if o["scheme"] == BATCH_SETTLEMENT:  # what the channel was charged is what moved (a stream's: "0" so far)
            extra = doc.get("extra") if isinstance(doc.get("extra"), dict) else {}
            with self._lock:
                self.channel(o).charged_by(extra, pending.deposit, int(o["amount"]))
            doc = {**doc, "amount": extra.get("chargedAmount", "")}
        moved = str(doc.get("amount", ""))
        settled = int(moved) if digits(moved) and int(moved) <= int(o["amount"]) else None
        usd = pending.usd
        if o["scheme"] == "upto" and settled is not None and int(o["amount"]):  # (see the module's docstring)
            usd = pending.usd * settled / int(o["amount"])
            with self._lock:
                self.spent_usd -= pending.usd - usd
        if o["scheme"] == "exact":
            self.credit_hint = True
        receipt_id = response_headers.get("x-tollway-receipt")
        self.history.append(
            PaidCall(
                o["network"],
                o["asset"],
                int(o["amount"]),
                doc.get("transaction"),
                receipt_id,
                usd,
                o["scheme"],
                settled,
            )
        )


@dataclass(frozen=True)
class Pending:
    headers: dict[str, str]
    offer: dict[str, Any] | None  # None: a sign-in, no payment
    usd: Decimal
    deposit: int = 0  # into a channel, with this payment
    total: int = 0  # the cumulative amount a voucher signs


# What a malformed offer raises as it is read and signed (a field missing, of the wrong type, not a number)
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, PaymentMalformed)

# A payment refused for these reasons is worth paying again with the fresh quote the 402 carries:
# the wallet's credit moved (another call used it), or the quote aged.
RETRYABLE = ("amount_insufficient", "quote_expired", "credit_amount_mismatch", "quote_mismatch", MISMATCH)
ATTEMPTS = 3


class Exchange:
    """One call's dance with a gateway, I/O-free, shared by the sync and async transports:
    ``start`` gives the headers of the first request; ``next`` reads each answer and says what
    to send next (a sign-in's or a payment's headers), or None when the answer is the one to
    return; ``finish`` always ends it.

    On a 402, the call whose turn it is to use credit signs in first (a call the credit covers is
    served with no payment; else the next 402 quotes less by the credit); the others, and that one
    if the credit falls short, pay an offer. A 401 that declares a sign-in is answered with one."""

    def __init__(self, payer: Payer, origin: str, max_usd: Decimal | None) -> None:
        self.payer, self.origin, self.max_usd = payer, origin, max_usd
        self.pending: Pending | None = None
        self.signed_usd = Decimal(0)  # by this call's payments so far (its per-call limit is for them all)
        self.attempts = 0
        self.signed_in = False
        self.turn = False

    def start(self) -> dict[str, str]:
        self.turn = self.payer.credit_turn()
        return {}

    def next(self, status: int, headers: Any) -> Pending | None:
        if self.pending is not None:
            self.payer.conclude(self.pending, status, headers)
            pending, self.pending = self.pending, None
            offer = pending.offer
            if status == 412 and offer is not None and offer.get("scheme") in ("upto", "mpp-permit2"):
                self.payer.no_permit2(offer, pending)  # (and pay with another scheme, from this 412's fresh quote)
                self.signed_usd -= pending.usd
            elif status == 402 and offer is None:
                self.payer.credit_hint = False  # the credit did not cover it: pay, and sign in less
            elif status != 402 or (offer is not None and not self._retryable(headers)):
                return None  # served (or refused for good); a sign-in the credit did not cover goes on to pay
            self.signed_usd -= self.payer.outdone(pending, headers)
            if self.attempts >= ATTEMPTS:
                return None
        elif status not in (401, 402):
            return None
        required = _required(headers)
        if not self.signed_in and (status == 401 or (self.turn and self.payer.credit_hint)):
            self.signed_in = True
            extensions = required.get("extensions") if required else None
            declared = extensions.get(SIGN_IN_WITH_X_KEY) if isinstance(extensions, dict) else None
            headers_in = self.payer.sign_in(declared, self.origin) if isinstance(declared, dict) else None
            if headers_in is not None:
                if status == 402:
                    self.payer.credit_within_limits(required or {}, self.max_usd, self.signed_usd)
                self.pending = Pending(headers_in, None, Decimal(0))
                return self.pending
        if status == 401:
            return None
        self.attempts += 1
        self.pending = self.payer.prepare(headers, self.origin, max_usd=self.max_usd, already=self.signed_usd)
        self.signed_usd += self.pending.usd
        return self.pending

    def finish(self) -> None:
        self.pending = None  # (a payment that never got an answer stays counted: it may be settled)
        if self.turn:
            self.payer.end_credit_turn()
            self.turn = False

    @staticmethod
    def _retryable(headers: Any) -> bool:
        required = _required(headers)
        return str((required or {}).get("error", "")).split(":", 1)[0] in RETRYABLE


def _offers(required: dict[str, Any]) -> list[dict[str, Any]]:
    """A 402's offers that are objects, with an object (or no) ``extra``; each as it was sent."""
    accepts = required.get("accepts")
    offers = [o for o in accepts if isinstance(o, dict)] if isinstance(accepts, list) else []
    return [o for o in offers if isinstance(o.get("extra") or {}, dict)]


def _required(headers: Any) -> dict[str, Any] | None:
    raw = headers.get(PAYMENT_REQUIRED)
    try:
        doc = unb64json(raw) if raw else None
    except (ValueError, PaymentMalformed):
        return None
    return doc if isinstance(doc, dict) else None


def chain_id_of(network: str) -> int:
    return int(network.split(":", 1)[1])


def sign_credit(account: LocalAccount, offer: dict[str, Any], now: int, origin: str) -> dict[str, Any]:
    """A ``CreditPayment`` for ``offer``: pays the call (its request digest) at ``origin`` from credit."""
    msg = {
        "wallet": account.address,
        "origin": signed.origin_of(origin),
        "amount": str(offer["amount"]),
        "request": (offer.get("extra") or {})["request"],
        "nonce": "0x" + secrets.token_hex(32),
        "validBefore": str(now + int(offer.get("maxTimeoutSeconds") or 300)),
    }
    return {
        **msg,
        "signature": signed.sign("CreditPayment", account.key, chain_id_of(offer["network"]), offer["asset"], msg),
    }


def claim_transfer(account: LocalAccount, offer: dict[str, Any], tx_hash: str, origin: str) -> dict[str, Any]:
    """The payload of a ``transfer`` payment: "my transaction ``tx_hash`` pays this call at ``origin``".

    The transfer itself (the token sent to ``offer["payTo"]``) is the payer's to make, with any
    wallet; surplus over the call's cost becomes credit.
    """
    origin = signed.origin_of(origin)
    msg = {
        "wallet": account.address,
        "origin": origin,
        "transaction": tx_hash,
        "request": (offer.get("extra") or {})["request"],
    }
    sig = signed.sign("TransferClaim", account.key, chain_id_of(offer["network"]), offer["asset"], msg)
    return {"transaction": tx_hash, "wallet": account.address, "origin": origin, "signature": sig}


def sign_exact(account: LocalAccount, offer: dict[str, Any], now: int) -> dict[str, Any]:
    """An EIP-3009 authorization paying ``offer`` exactly, valid from now for its timeout."""
    extra = offer.get("extra") or {}
    chain_id = chain_id_of(str(offer["network"]))
    auth = eip3009.Authorization(
        from_=account.address.lower(),
        to=str(offer["payTo"]).lower(),
        value=int(offer["amount"]),
        valid_after=max(now - 60, 0),
        valid_before=now + int(offer.get("maxTimeoutSeconds") or 300),
        nonce=secrets.token_bytes(32),
    )
    domain = eip3009.domain_separator(
        extra.get("name", "USD Coin"), extra.get("version", "2"), chain_id, offer["asset"]
    )
    sig = account.unsafe_sign_hash(eip3009.digest(auth, domain))
    return {
        "signature": "0x" + bytes(sig.signature).hex().removeprefix("0x"),
        "authorization": {
            "from": account.address,
            "to": offer["payTo"],
            "value": str(auth.value),
            "validAfter": str(auth.valid_after),
            "validBefore": str(auth.valid_before),
            "nonce": "0x" + auth.nonce.hex(),
        },
    }


def sign_upto(account: LocalAccount, offer: dict[str, Any], now: int) -> dict[str, Any]:
    """A Permit2 witness transfer authorising at most ``offer["amount"]`` to ``offer["payTo"]``,
    settled by the facilitator the offer names, valid from now for its timeout."""
    extra = offer.get("extra") or {}
    auth = permit2.UptoAuthorization(
        owner=account.address.lower(),
        token=str(offer["asset"]).lower(),
        max_amount=int(offer["amount"]),
        spender=permit2.UPTO_PROXY_ADDRESS.lower(),
        nonce=int.from_bytes(secrets.token_bytes(32), "big"),
        deadline=now + int(offer.get("maxTimeoutSeconds") or 300),
        to=str(offer["payTo"]).lower(),
        facilitator=str(extra["facilitatorAddress"]).lower(),
        valid_after=0,
    )
    domain = permit2.domain_separator(chain_id_of(str(offer["network"])))
    sig = account.unsafe_sign_hash(permit2.digest(auth, domain))
    return {
        "signature": "0x" + bytes(sig.signature).hex().removeprefix("0x"),
        "permit2Authorization": {
            "from": account.address,
            "permitted": {"token": offer["asset"], "amount": str(auth.max_amount)},
            "spender": permit2.UPTO_PROXY_ADDRESS,
            "nonce": str(auth.nonce),
            "deadline": str(auth.deadline),
            "witness": {"to": offer["payTo"], "facilitator": extra["facilitatorAddress"], "validAfter": "0"},
        },
    }
