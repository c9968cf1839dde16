"""The request pipeline, top to bottom:

    price → challenge | verify → lock → confirm → forward → settle → relay → meter → receipt

``chat_completions`` is the whole sequence; each stage is a function below it or a module of its
own (chat: price; challenge: the 402; payments: verify/confirm; ledger: lock; upstream: forward;
metering: settle, relay, meter, receipt). The rules it keeps:

- **Refuse before serving.** A payment is locked against replay, then confirmed on chain (the
  transfer simulated against the pending state) before the upstream is asked anything. A
  non-streamed call that ran long is confirmed again before its answer is released.
- **Nobody pays for what was not served.** Until the upstream commits to an answer, any failure
  undoes everything; a payment the chain refused is never tried again.
- **The price follows the scheme.** A payment of the bound (``exact``) is priced and served at the
  default output cap; a metered one (``upto``, credit) at the metered cap, and moves only what the
  call cost.
- **Money is accounted in one place.** A call's payment is deposited to the payer's credit
  account, any shortfall against the quote is held from credit while the call runs, and at the
  end the metered cost is charged; what is left stays as credit. A wallet in debt (a settlement
  of theirs failed) pays quote + debt before it is served again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from functools import partial
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from . import idempotency, signin
from .bounded import read_bounded
from .challenge import least_payment, with_challenge
from .chat import ChatCall, parse_chat, parse_embeddings, parse_generation
from .dialects import MESSAGES, RESPONSES, refuse_betas
from .errors import (
    BadRequest,
    ChainUnavailable,
    ClientGone,
    GatewayError,
    PaymentInvalid,
    PaymentMalformed,
    PaymentRequired,
    TooLarge,
    TooManyRequests,
    truncate,
)
from .gateway import Gateway
from .jsonbytes import compact
from .ledger.channels import ChannelRefused
from .ledger.models import PaymentState
from .ledger.store import InsufficientCredit, credit_account, new_id
from .metering import Paid, call_row, log, log_call, relay_stream, respond
from .payments import x402
from .payments.base import PaymentScheme, Proof, Quote, Verified
from .priced import Pricing
from .pricing import MAX_AMOUNT, Prices
from .signin import SignIn
from .upstream.attempts import encode_attempts
from .upstream.client import Opened
from .upstream.router import conversation_key

PARSE_MESSAGES = partial(parse_generation, MESSAGES)
PARSE_RESPONSES = partial(parse_generation, RESPONSES)  # (one object per API: ``priced.py`` keeps parses by it)


async def chat_completions(request: Request, gw: Gateway) -> Response:
    return await paid_api(request, gw, parse_chat)


async def embeddings(request: Request, gw: Gateway) -> Response:
    return await paid_api(request, gw, parse_embeddings)


async def messages(request: Request, gw: Gateway) -> Response:
    betas = request.headers.get("anthropic-beta")
    return await paid_api(request, gw, PARSE_MESSAGES, check=lambda: refuse_betas(betas))


async def responses(request: Request, gw: Gateway) -> Response:
    return await paid_api(request, gw, PARSE_RESPONSES)


async def paid_api(
    request: Request, gw: Gateway, parse: Callable[..., ChatCall], check: Callable[[], None] | None = None
) -> Response:
    """A paid call of an API whose request ``parse`` reads and prices (``chat.py``), after the
    API's own ``check`` of its headers."""
    started, call_id, model = time.time(), new_id(), "-"
    pricing: Pricing | None = None
    call: ChatCall | None = None
    try:
        if check is not None:
            check()
        body = await read_body(request, gw.settings.max_body_bytes)
        byok = provider_key(request) is not None
        pricing = Pricing(parse, body, gw.settings, gw.byok_prices if byok else gw.prices, gw.origin(request), byok)
        call = gw.priced.parse(pricing)  # price
        model = call.model
        return await idempotency.once(gw, request, call.digest, partial(paid_call, request, gw, call, call_id))
    except GatewayError as exc:
        log_call(call_id, model, exc.status, started, code=exc.code)
        if exc.status == 402 and pricing is not None and call is not None:
            keep(gw, pricing, call)
        raise
    except Exception:
        log_call(call_id, model, 500, started, code="internal")
        raise


def keep(gw: Gateway, pricing: Pricing, call: ChatCall) -> None:
    """Keep the parse of a request answered 402: its paid retry comes next (``priced.py``)."""
    try:
        gw.priced.keep(pricing, call)
    except Exception:  # (its 402 goes out whatever happens here)
        log.exception("could not keep the parse of a request answered 402")


async def paid_call(request: Request, gw: Gateway, call: ChatCall, call_id: str) -> Response:
    who = None
    try:
        proof = x402.decode_proof(request.headers, gw.v1_names) or mpp_proof(gw, request, call)
        if proof is None:
            who = await signin.identify(gw, request, call.digest)
            if gw.free is not None and gw.free.covers(call, gw.settings.models):
                scheme, payment, quote = free_call(gw, request, call, who)  # the free tier (429 beyond it)
            elif who is None or who.legacy:
                gw.check_available(call)  # no quote for what cannot be served now (503), or at all (400)
                raise PaymentRequired("PAYMENT-SIGNATURE header is required")  # → challenge
            else:
                scheme, payment, quote = from_credit(gw, call, who)  # a signed-in wallet's credit pays
            proof = Proof(2, scheme.name, payment.network, payment.proof)
        else:
            scheme, payment, quote = await verify(gw, call, proof)  # verify
        paid = lock(gw, call, scheme, payment, quote, proof, call_id)  # lock (replay), debt gate, hold credit
    except PaymentRequired as exc:
        raise with_challenge(exc, gw, call, request, who) from None

    opened: Opened | None = None
    try:
        await confirm(gw, paid, paid.owed)  # on chain, before the upstream is asked anything
        confirmed = time.monotonic()
        opened = await forward(gw, call, paid, request)
        call = billed_at(gw, call.member(opened.model), opened.upstream)  # (the model and upstream that served it)
        # The answer (a stream's first byte) is released only if it will still be paid: checked
        # again if every attempt together (a failed upstream's too) took long since the last check.
        unchecked = time.monotonic() - confirmed if paid.scheme.lapses else 0.0
        if unchecked > (gw.settings.stream_recheck_seconds if call.stream else gw.settings.recheck_after_seconds):
            try:
                await confirm(gw, paid)
                unchecked = 0.0
            except ChainUnavailable:  # (a stream is served on through an outage, as its later checks are)
                if not call.stream:
                    raise
        expected = expected_cache(gw, call, paid.who, opened.upstream)
        if call.stream:  # settle (a payment of the bound) → relay → meter (→ settle, a metered one)
            return relay_stream(gw, call, opened, paid, call_id, expected, unchecked)
        return respond(gw, call, opened, paid, call_id, expected)  # meter + settle → receipt
    except BaseException as exc:
        if opened is not None:
            await opened.response.aclose()
        undo(gw, paid, call, call_id, exc)
        if isinstance(exc, PaymentRequired):
            raise with_challenge(exc, gw, call, request, who) from None
        raise


# -- stages ------------------------------------------------------------------------------------


PROVIDER_KEY = "x-provider-key"
PROVIDER_KEY_CHARACTERS = frozenset(chr(c) for c in range(0x21, 0x7F))  # printable ASCII, no space


def provider_key(request: Request) -> str | None:
    """A payer's own provider key (BYOK), if the request brings one; a malformed one is a 400
    that does not quote it."""
    key = request.headers.get(PROVIDER_KEY)
    if key is not None and not (8 <= len(key) <= 512 and set(key) <= PROVIDER_KEY_CHARACTERS):
        raise BadRequest("X-Provider-Key must be 8 to 512 printable ASCII characters", code="invalid_provider_key")
    return key


EXPECTED_OUTPUT_TOKENS = 512  # what ranking by price expects a call to produce (at most its cap)


class Costs(dict[str, float]):
    """Expected costs by upstream; an upstream not listed costs ``default``."""

    def __init__(self, default: float) -> None:
        super().__init__()
        self.default = default

    def __missing__(self, name: str) -> float:
        return self.default


def expected_costs(gw: Gateway, call: ChatCall, payer: str) -> Callable[[str, list[str]], Costs] | None:
    """What the router ranks upstreams by (``Router.candidates``): the request's expected cost on
    each — its prompt (``prompt_bound``/4 tokens, or what an upstream is expected to hold cached if
    more) at the cache price as far as the upstream is expected to hold it cached (its prefix sent
    there lately, times the share of expected cache the upstream's discounts lately survived), the
    rest at the prompt price, and the expected output, at the upstream's own prices. Computed only
    for the upstreams that differ (a price of their own, a prefix held); the rest cost the same.
    Only where there is a choice."""
    if len(gw.router.upstreams) < 2:
        return None

    def costs(model: str, names: list[str]) -> Costs:
        member = call.member(model)
        held = gw.prefixes.expected_by(payer, names, member.prefixes()) if member.prompt else {}
        own = upstreams_prices(gw, call, model)
        prompt = max(member.prompt_bound // 4, *held.values(), 0)
        output = min(member.cap(metered=True), EXPECTED_OUTPUT_TOKENS) * member.choices

        def cost(p: Prices, hit: int) -> float:
            p = p.at(prompt)  # (a long prompt's tier)
            return ((prompt - hit) * p.prompt + hit * p.cache_read + output * p.completion + p.request) / p.denominator

        out = Costs(cost(member.prices, 0))
        for name in own.keys() | held.keys():
            hit = held.get(name, 0)
            if hit:
                survival = gw.router.stats.figures(name, model).cache_survival
                hit = int(hit * (1.0 if survival is None else min(survival, 1.0)))
            out[name] = cost(own.get(name, member.prices), hit)
        return out

    return costs


def upstreams_prices(gw: Gateway, call: ChatCall, model: str) -> dict[str, Prices]:
    """The upstreams that price ``model`` themselves, and their prices for this call (BYOK: the fee's)."""
    return (gw.upstream_byok_prices if call.route.byok else gw.upstream_prices).get(model, {})


def billed_at(gw: Gateway, call: ChatCall, upstream: str) -> ChatCall:
    """The call as ``upstream`` bills it: at its own prices for the model, where it has some."""
    own = upstreams_prices(gw, call, call.model).get(upstream)
    return call if own is None or own == call.prices else replace(call, prices=own)


def expected_cache(gw: Gateway, call: ChatCall, payer: str, upstream: str) -> int:
    """The prompt tokens we expect ``upstream`` to have cached of ``payer``'s call (a generation's)."""
    return gw.prefixes.expect(payer, upstream, call.prefixes()) if call.prompt else 0


def mpp_proof(gw: Gateway, request: Request, call: ChatCall) -> Proof | None:
    """The proof an MPP credential makes, if the request carries one; a malformed one is a 402
    (``malformed-credential``, with a fresh challenge), as MPP answers it."""
    if gw.mpp is None:
        return None
    try:
        return gw.mpp.decode(request.headers, call.digest, int(time.time()))
    except PaymentMalformed as exc:
        raise PaymentInvalid(exc.message, code="invalid_payload") from None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body larger than {limit} bytes")
    try:
        return await read_bounded(request.stream(), limit, lambda: TooLarge(f"request body larger than {limit} bytes"))
    except ClientDisconnect:
        raise ClientGone("the client hung up before its request was read") from None


async def verify(gw: Gateway, call: ChatCall, proof: Proof) -> tuple[PaymentScheme, Verified, Quote]:
    """The scheme a proof pays with, the payment it makes, and the quote (output cap) it pays."""
    now = int(time.time())
    schemes = [s for s in gw.schemes if proof.rail in s.rails]
    scheme = next((s for s in schemes if s.name == proof.scheme and s.network == proof.network), None)
    if scheme is None:
        if not any(s.name == proof.scheme for s in schemes):
            raise PaymentInvalid(
                f"scheme '{truncate(proof.scheme, 40)}' is not accepted here", code="unsupported_scheme"
            )
        raise PaymentInvalid(f"network '{truncate(proof.network, 40)}' is not accepted here", code="invalid_network")
    quote = call.quote(call.cap(scheme.metered))
    least = 0 if scheme.prepaid and scheme.metered else least_payment(gw)
    amount = max(quote.amount, least)
    if proof.accepted is not None:
        quote, amount = accepted(gw, call, scheme, proof.accepted, now) or (quote, amount)
        if amount < least:  # (a quote token binds no scheme: the credit offer's bare quote, paid on chain)
            raise PaymentInvalid(
                f"a payment on chain is at least {least} (its settlement costs gas): pay an offer made for it",
                code="quote_mismatch",
            )
    try:
        return scheme, await scheme.verify(proof, scheme.offer(amount), quote, now), quote
    except PaymentMalformed as exc:
        if proof.rail != "mpp":
            raise
        raise PaymentInvalid(exc.message, code="invalid_payload") from None  # (MPP: a 402, malformed-credential)


def free_call(
    gw: Gateway, request: Request, call: ChatCall, who: SignIn | None
) -> tuple[PaymentScheme, Verified, Quote]:
    """A call of the free tier, as a payment of 0 (``free_tier.py``); beyond the quota, a 429 that
    (for an address) carries a sign-in for the wallet's own quota."""
    assert gw.free is not None
    try:
        return gw.free.take(request, call, who.wallet if who else None)
    except TooManyRequests as exc:
        if who is None and gw.settings.free_calls_per_wallet and exc.code == "free_quota_exhausted":
            exc.challenge = signin.challenge(gw, request, call.digest, exc)
        raise


def from_credit(gw: Gateway, call: ChatCall, who: SignIn) -> tuple[PaymentScheme, Verified, Quote]:
    """A call a signed-in wallet's credit covers, at the metered cap: nothing moves on chain; the
    quote is held from credit while the call runs, and the sign-in's nonce (bound to this
    request) is the charge's unique key, so the sign-in pays once."""
    scheme = next((s for s in gw.schemes if s.name == "credit"), None)
    if scheme is None:
        raise PaymentRequired("this gateway takes no payment from credit: pay with one of the offers")
    quote = call.quote(call.cap(scheme.metered))  # (held from credit as it is locked: see ``lock``)
    offer = scheme.offer(0)
    payment = Verified(
        scheme=scheme.name,
        network=offer.network,
        asset=offer.asset.lower(),
        payer=who.wallet,
        payee=offer.pay_to.lower(),
        amount=0,
        # (the nonce is the request's, any wallet's: with the wallet, nobody spends another's first)
        lock_key=f"{offer.network}:{offer.asset.lower()}:sign-in:{who.wallet}:{who.nonce}",
        proof={"signIn": who.nonce},
    )
    return scheme, payment, quote


def accepted(
    gw: Gateway, call: ChatCall, scheme: PaymentScheme, offer: dict[str, Any], now: int
) -> tuple[Quote, int] | None:
    """What a v2 proof pays, from the offer it echoes: (the quote with its output cap, the
    amount) — if that offer was quoted for this very request. None: it echoes no quote (today's
    price then)."""
    ours = scheme.offer(0)
    if str(offer.get("asset", "")).lower() != ours.asset.lower():
        raise PaymentInvalid("the accepted offer names another asset", code="invalid_exact_evm_asset_mismatch")
    if str(offer.get("payTo", "")).lower() != ours.pay_to.lower():
        raise PaymentInvalid(
            "the accepted offer pays someone else", code="invalid_exact_evm_payload_recipient_mismatch"
        )
    extra = offer.get("extra")
    token = extra.get("quote") if isinstance(extra, dict) else None
    if token is None:
        return None
    raw_amount, cap = offer.get("amount"), extra.get("maxTokens")  # type: ignore[union-attr]
    if not isinstance(raw_amount, str) or not (raw_amount.isascii() and raw_amount.isdigit()):
        raise PaymentMalformed("accepted.amount must be a decimal string")
    if len(raw_amount) > 19 or int(raw_amount) > MAX_AMOUNT:
        raise PaymentMalformed("accepted.amount is larger than any quote", code="amount_too_large")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap not in (call.cap(True), call.cap(False)):
        raise PaymentInvalid("the accepted offer carries no output cap quoted for this request", code="quote_mismatch")
    gw.quotes.check(token, call.digest, int(raw_amount), now, cap)
    return call.quote(cap), int(raw_amount)


def lock(
    gw: Gateway,
    call: ChatCall,
    scheme: PaymentScheme,
    payment: Verified,
    quote: Quote,
    proof: Proof,
    call_id: str,
) -> Paid:
    """Lock the payment against replay; refuse a wallet in debt that does not pay it off; hold
    from credit what the payment does not cover of the quote."""
    account = credit_account(payment.network, payment.asset, payment.payer)
    held = max(quote.amount - payment.amount, 0)
    row = {
        "lock_key": payment.lock_key,
        "scheme": payment.scheme,
        "network": payment.network,
        "asset": payment.asset,
        "payer": payment.payer,
        "payee": payment.payee,
        "amount": payment.amount,
        "proof": compact(payment.proof),
        "request_digest": call.digest,
    }
    if payment.channel is not None:
        row["deposit"] = payment.channel.deposit  # (``Store.lock`` names the channel)
    try:
        locked = gw.store.lock(  # one transaction
            row,
            account,
            held,
            call_id=call_id,
            channel=payment.channel,
            channel_hold_seconds=gw.settings.min_validity_seconds,
            must_hold="signIn" in payment.proof,  # (credit alone pays: nothing is locked unless it covers the quote)
        )
    except ChannelRefused as refused:
        raise scheme.channel_refused(refused) from None  # type: ignore[attr-defined]
    except InsufficientCredit:
        raise PaymentInvalid(
            f"the credit of {payment.payer} does not cover this call's quote {quote.amount}: pay with one of the "
            "offers (they are reduced by the credit)",
            code="insufficient_credit",
        ) from None
    if locked is None:
        if "signIn" in payment.proof:
            raise PaymentInvalid("this sign-in has already paid a call", code="invalid_siwx_nonce_used")
        raise PaymentInvalid("this payment has already been used", code="invalid_exact_evm_nonce_already_used")
    payment_id = locked.payment_id
    debt = max(-locked.balance, 0)
    holding = held if locked.held else 0
    paid = Paid(payment, scheme, payment_id, account, quote, proof, holding, debt, locked.owed, locked.channel)
    try:
        if debt and payment.amount < quote.amount + debt:
            refusal = PaymentInvalid(
                f"this wallet owes {debt} (a settlement of its payment failed on chain): pay the quote plus "
                f"the debt, {quote.amount + debt}, or send the debt by transfer",
                code="debt_outstanding",
            )
            refusal.debt = debt
            raise refusal
        if held and not locked.held:
            raise PaymentInvalid(
                f"payment of {payment.amount} plus credit does not cover the quote {quote.amount}",
                code="amount_insufficient",
            )
    except BaseException as exc:
        undo(gw, paid, call, call_id, exc)
        raise
    return paid


async def confirm(gw: Gateway, paid: Paid, owed: int | None = None) -> None:
    """The payment will settle: checked on chain, with what the payer owes us that is not on chain
    yet — as the payment was locked; or, checked again (no ``owed``), read now, of the payments
    locked no later than this one (the payer's later calls are theirs to cover)."""
    p = paid.payment
    if owed is not None:
        await paid.scheme.confirm(p, owed)
        if paid.channel is not None and p.channel is not None and p.channel.deposit:
            paid.channel["balance"] += p.channel.deposit  # (mined: the channel state its answer tells holds it)
        return
    owed = gw.store.unsettled_amount(p.network, p.asset, p.payer, through=paid.payment_id)
    await paid.scheme.confirm(p, owed, recheck=True)


async def forward(gw: Gateway, call: ChatCall, paid: Paid, request: Request) -> Opened:
    """Send the call upstream, with the output cap it was paid for. The answer (a stream's first
    byte) must come within ``max_call_seconds``."""
    cap = paid.quote.max_tokens
    return await gw.router.send(
        [m.model for m in call.members],
        partial(conversation_key, paid.who, call.model, call.body, call.prompt, request.headers),
        lambda upstream, model: call.member(model).forward(
            upstream.cap_field, cap, upstream.routes_providers, upstream.prices.get(model)
        ),
        call.stream,
        request.headers,
        max_usd=Fraction(paid.quote.amount, 10**gw.settings.chain.decimals),
        prefs=call.route,
        api_key=request.headers.get(PROVIDER_KEY) if call.route.byok else None,  # (checked as it was priced)
        costs=expected_costs(gw, call, paid.who),
        # (the call's time counts from its arrival, as a stream's cut does: ``metering.stream_cutter``)
        deadline=asyncio.get_running_loop().time() + gw.settings.max_call_seconds - (time.time() - call.received),
        paying=not paid.free,
        gone=request.is_disconnected,
    )


def timed_out(exc: BaseException) -> bool:
    """Whether a call failed timing out on an upstream, which may have had its request and bill for
    it (a timeout while connecting counts too: which one it was is not told apart)."""
    if not isinstance(exc, GatewayError):
        return False
    return "upstream_timeout" in (exc.code, *(a.outcome for a in exc.attempts))


def undo(gw: Gateway, paid: Paid, call: ChatCall, call_id: str, exc: BaseException) -> None:
    """The call will not be served: nobody is charged. Money that already moved becomes credit.
    A payment the chain refused is never tried again; any other may pay a retry of this call. One
    transaction, and only while the payment is still reserved: a call charged already, or given
    back by another process (``Gateway.give_back_abandoned_payments``), is not undone twice."""
    reason = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
    deposit = 0
    if paid.scheme.prepaid:  # (its money moved: it stays, as credit)
        to, error, deposit = PaymentState.SETTLED, f"not served: {reason}", paid.payment.amount
    elif isinstance(exc, PaymentInvalid) and exc.code not in ("debt_outstanding", "amount_insufficient"):
        to, error = PaymentState.REFUSED, f"{exc.code}: {reason}"
    else:
        to, error = PaymentState.RELEASED, f"not served: {reason}"
    try:
        attempts = encode_attempts(exc.attempts) if isinstance(exc, GatewayError) and exc.attempts else None
        row = call_row(call_id, paid, call, status="failed", error=reason, attempts=attempts, finished_at=time.time())
        undone = gw.store.undo_call(
            paid.payment_id, to, error, account=paid.account, held=paid.held, deposit=deposit, row=row
        )
        if undone and gw.free is not None and paid.free and not timed_out(exc):
            gw.free.give_back(paid.payment)  # (a call an upstream may have worked on keeps its slot)
    except Exception:  # undoing must not mask the original error
        log.exception("could not undo the payment of call %s", call_id)
