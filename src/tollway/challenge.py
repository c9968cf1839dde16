"""The 402: what a request is offered, per scheme, and the challenge headers that carry it.

Each offer is priced for the output cap its scheme is served with (``ChatCall.cap``): a
bound-paying scheme (``exact``) at the default cap, a metered one (``upto``, credit) at the
metered cap — and says so in ``extra.maxTokens``, which the quote's HMAC covers. A wallet the
request identifies sees its quotes reduced by its final credit (and raised by its debt);
on-chain offers are never below the smallest on-chain payment worth its gas.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from fractions import Fraction
from typing import Any

from starlette.requests import Request

from . import discovery, idempotency, signin
from .chat import ChatCall
from .errors import PaymentRequired, truncate
from .gateway import Gateway
from .ledger.store import credit_account
from .payments import mpp, x402
from .payments.base import Offer
from .pricing import to_atomic
from .signin import SignIn


def least_payment(gw: Gateway) -> int:
    """The smallest on-chain payment asked (its settlement's gas must be worth it), atomic units."""
    return _least(gw.settings.min_chain_payment_usd or 0, gw.settings.chain.decimals)


def least_withdrawal(gw: Gateway) -> int:
    """The smallest withdrawal of credit, or refund of part of a channel (the gateway pays their gas)."""
    return _least(gw.settings.min_withdrawal_usd or 0, gw.settings.chain.decimals)


@functools.lru_cache(maxsize=16)  # (asked of every payment: two Fractions each time otherwise)
def _least(usd: Any, decimals: int) -> int:
    return to_atomic(Fraction(usd), decimals)


def credit_of(gw: Gateway, who: SignIn | None) -> int:
    """The final credit of a signed-in wallet (0 for nobody)."""
    return 0 if who is None else gw.store.available_credit(credit_account(gw.network, gw.token, who.wallet))


def offers(gw: Gateway, call: ChatCall, credit: int, debt: int = 0) -> list[Offer]:
    """What a 402 offers: for each scheme, its quote less the wallet's credit (plus its debt) —
    never below the smallest on-chain payment — or, for credit, the quote when credit covers it."""
    least = least_payment(gw)
    out = []
    for s in gw.schemes:
        if "x402" not in s.rails:
            continue
        quote = call.quote(call.cap(s.metered))
        if s.name == "credit":
            if credit < quote.amount or debt:
                continue
            offer = s.offer(quote.amount)
        else:
            due = quote.amount + debt - min(credit, quote.amount)
            offer = s.offer(max(due, least))
        extra = {
            **offer.extra,
            "maxTokens": quote.max_tokens,
            "quote": gw.quotes.token(call.digest, offer.amount, quote.expires, quote.max_tokens),
        }
        if s.name in ("credit", "transfer"):  # tollway's own schemes sign the request digest itself
            extra["request"] = "0x" + call.digest
        if offer.amount < quote.amount:
            extra["credit"] = str(quote.amount - offer.amount)  # what the call will take from credit
        if debt:
            extra["debt"] = str(debt)
        out.append(replace(offer, extra=extra))
    out.sort(key=lambda o: ORDER.get(o.scheme, len(ORDER)))
    return out


# The official x402 client pays the first offer it can: credit (no chain at all), then what pays
# the metered cost (upto), then what pays the bound.
ORDER = {"credit": 0, "upto": 1, "exact": 2, "batch-settlement": 3}


def with_challenge(
    exc: PaymentRequired, gw: Gateway, call: ChatCall, request: Request, who: SignIn | None
) -> PaymentRequired:
    """Attach a fresh quote for this request to a 402 (x402: every 402 carries one) — reduced by
    the credit of the wallet the request signed in as — and a sign-in for it."""
    quoted = offers(gw, call, credit_of(gw, who), exc.debt)
    more = exc.offer_extra  # e.g. a channel's state, for the client to resynchronise
    quoted = [replace(o, extra={**o.extra, **more[o.scheme]}) if o.scheme in more else o for o in quoted]
    resource = {
        "url": gw.public_base(request) + request.url.path,
        "description": f"{call.model[:80]} chat completion",
        "mimeType": "application/json",
    }
    # (an error a client must recognise, such as a channel's cumulative mismatch, is its code alone)
    error = exc.code if exc.bare_error else truncate(f"{exc.code}: {exc.message}", 300)
    extensions = {k: v for s in gw.schemes for k, v in s.extensions().items()}
    extensions.update(signin.declaration(gw, request, call.digest), **idempotency.declaration(gw))
    extensions.update(discovery.bazaar(call.model, call.surface))
    doc = x402.payment_required(error, resource, quoted, extensions)
    headers = {x402.PAYMENT_REQUIRED: x402.b64json(doc)}
    exact = next((o for o in quoted if o.scheme == "exact"), None)
    if gw.mpp is not None and exact is not None and mpp.accepts_mpp(request.headers):
        answer_by = int(time.time()) + min(gw.settings.quote_ttl_seconds, mpp.ANSWER_SECONDS)
        headers[mpp.WWW_AUTHENTICATE] = gw.mpp.challenge(exact, call.digest, answer_by)
    # v2 clients read the header. The body is for OpenAI-compatible clients (``error`` an object,
    # whose message their SDKs show) — unless the chain has an x402 v1 name: v1 clients read the
    # body, with ``error`` a string, so it keeps that and says the rest at the top level.
    body: dict[str, Any] = {**exc.body(), "x402": doc}
    if gw.v1_names:
        exact = [o for o in quoted if o.scheme == "exact"]
        body = {**x402.payment_required_v1(error, resource, exact, gw.v1_name_of), **exc.body()["error"]}
    if gw.mpp is not None and mpp.carries_credential(request.headers):  # MPP answers with a problem document
        body = mpp.problem(mpp.problem_type(exc.code), exc.message, exc.status)
        headers["content-type"] = "application/problem+json"
    exc.challenge = {"headers": headers, "body": body}
    return exc
