"""The request pipeline, top to bottom:

    price → challenge | verify → lock → confirm → forward → settle → relay → meter → receipt

``chat_completions`` is the whole sequence; each stage is a function below it or a module of
its own (chat/pricing, payments, ledger, upstream, settlement, usage). The rules it keeps:

- **Refuse before serving.** A payment is locked against replay, then confirmed on chain (the
  transfer simulated against the pending state) before the upstream is asked anything. A
  non-streamed call that ran long is confirmed again before its answer is released.
- **Nobody pays for what was not served.** Until the upstream commits to an answer, any failure
  undoes everything; a payment the chain refused is never tried again.
- **Money is accounted in one place.** A call's payment is deposited to the payer's credit
  account, any shortfall against the quote is held from credit while the call runs, and at the
  end the metered cost is charged; what is left stays as credit. A wallet in debt (a settlement
  of theirs failed) pays quote + debt before it is served again.
- **A stream whose settlement fails is cut** (within the block that tells us), and no call runs
  past ``max_call_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import cache
from .chat import ChatCall, parse_chat
from .errors import (
    GatewayError,
    PaymentInvalid,
    PaymentMalformed,
    PaymentRequired,
    TooLarge,
    UpstreamUnavailable,
    truncate,
)
from .gateway import Gateway
from .ledger.store import PREPAID, Settle, credit_account, new_id
from .payments import x402
from .payments.base import Offer, PaymentScheme, Proof, Verified
from .payments.credit import check_wallet_proof
from .pricing import MAX_AMOUNT, atomic_to_usd, to_atomic
from .upstream.client import Opened
from .upstream.router import conversation_key
from .usage import (
    SUMMARY_PREFIX,
    StreamTail,
    Usage,
    UsageEvents,
    body_with_cost,
    parse_usage,
    usage_from_body,
    with_cost,
)

log = logging.getLogger("tollway.pipeline")
calls_log = logging.getLogger("tollway.calls")

WALLET_HEADER = "x-tollway-wallet"


@dataclass(frozen=True)
class Paid:
    """A locked payment and what it covers: ``deposit`` on chain plus ``held`` from credit."""

    payment: Verified
    scheme: PaymentScheme
    payment_id: str
    account: str  # the payer's credit account
    held: int
    proof: Proof
    settlement: tuple[str, bytes] | None  # the transaction that moves the money (to, calldata)

    @property
    def prepaid(self) -> bool:
        """The money already moved (a transfer, or credit): nothing to settle, nothing to release."""
        return self.settlement is None


async def chat_completions(request: Request, gw: Gateway) -> Response:
    started, call_id, model = time.time(), new_id(), "-"
    try:
        call = parse_chat(
            await read_body(request, gw.settings.max_body_bytes), gw.settings, gw.prices, origin=gw.origin(request)
        )  # price
        model = call.model
        return await paid_call(request, gw, call, call_id)
    except GatewayError as exc:
        log_call(call_id, model, exc.status, started, code=exc.code)
        raise
    except Exception:
        log_call(call_id, model, 500, started, code="internal")
        raise


def log_call(call_id: str, model: str, status: int, started: float, **details: Any) -> None:
    """One line per call, key=value, nothing secret: what an operator greps and graphs."""
    fields = " ".join(f"{k}={v}" for k, v in details.items() if v is not None)
    calls_log.info(
        "call id=%s model=%s status=%d ms=%.1f %s", call_id, model, status, (time.time() - started) * 1000, fields
    )


async def paid_call(request: Request, gw: Gateway, call: ChatCall, call_id: str) -> Response:
    try:
        proof = x402.decode_proof(request.headers, gw.v1_names)
        if proof is None:
            gw.check_available(call.model)  # no quote for what cannot be served now (503)
            raise PaymentRequired("PAYMENT-SIGNATURE header is required")  # → challenge
        scheme, payment = await verify(gw, call, proof)  # verify
        paid = lock(gw, call, scheme, payment, proof, call_id)  # lock (replay), debt gate, hold credit
    except PaymentRequired as exc:
        raise with_challenge(exc, gw, call, request) from None

    opened: Opened | None = None
    try:
        await confirm(gw, paid)  # on chain, before the upstream is asked anything
        opened = await forward(gw, call, request)
        if not call.stream and opened.latency_ms > gw.settings.recheck_after_seconds * 1000:
            await confirm(gw, paid)  # the answer is released only if it will still be paid
        expected = gw.prefixes.expect(opened.upstream, call.model, call.body["messages"])  # cache we expect
        settle = settlement(gw, paid)  # committed with the call's record: settled iff on record
        if call.stream:
            response: Response = relay_stream(gw, call, opened, paid, call_id, settle, expected)
        else:
            response = respond(gw, call, opened, paid, call_id, settle, expected)  # meter → receipt
    except BaseException as exc:
        if opened is not None:
            await opened.response.aclose()
        undo(gw, paid, call, call_id, exc)
        if isinstance(exc, PaymentRequired):
            raise with_challenge(exc, gw, call, request) from None
        raise
    gw.settler.wake()  # broadcast at the worker's next pass
    return response


# -- stages ------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"request body larger than {limit} bytes")
    return bytes(body)


async def verify(gw: Gateway, call: ChatCall, proof: Proof) -> tuple[PaymentScheme, Verified]:
    now = int(time.time())
    scheme = next((s for s in gw.schemes if s.name == proof.scheme and s.network == proof.network), None)
    if scheme is None:
        if not any(s.name == proof.scheme for s in gw.schemes):
            raise PaymentInvalid(
                f"scheme '{truncate(proof.scheme, 40)}' is not accepted here", code="unsupported_scheme"
            )
        raise PaymentInvalid(f"network '{truncate(proof.network, 40)}' is not accepted here", code="invalid_network")
    if proof.accepted is not None:
        amount = accepted_amount(gw, call, scheme, proof.accepted, now)
    else:  # x402 v1 echoes no offer: it pays what a wallet without credit is offered
        amount = call.quote.amount if scheme.name == "credit" else max(call.quote.amount, least_payment(gw))
    return scheme, await scheme.verify(proof, scheme.offer(amount), call.quote, now)


def least_payment(gw: Gateway) -> int:
    """The smallest on-chain payment asked (its settlement's gas must be worth it), atomic units."""
    return to_atomic(Fraction(gw.settings.min_chain_payment_usd or 0), gw.settings.chain.decimals)


def accepted_amount(gw: Gateway, call: ChatCall, scheme: PaymentScheme, accepted: dict[str, Any], now: int) -> int:
    """The amount a v2 proof pays: the quote it echoes, if that quote was made for this request."""
    ours = scheme.offer(call.quote.amount)
    if str(accepted.get("asset", "")).lower() != ours.asset.lower():
        raise PaymentInvalid("the accepted offer names another asset", code="invalid_exact_evm_asset_mismatch")
    if str(accepted.get("payTo", "")).lower() != ours.pay_to.lower():
        raise PaymentInvalid(
            "the accepted offer pays someone else", code="invalid_exact_evm_payload_recipient_mismatch"
        )
    extra = accepted.get("extra")
    token = extra.get("quote") if isinstance(extra, dict) else None
    if token is None:
        return max(call.quote.amount, least_payment(gw))  # no quote echoed: today's price for this request
    raw_amount = accepted.get("amount")
    if not isinstance(raw_amount, str) or not (raw_amount.isascii() and raw_amount.isdigit()):
        raise PaymentMalformed("accepted.amount must be a decimal string")
    if len(raw_amount) > 19 or int(raw_amount) > MAX_AMOUNT:
        raise PaymentMalformed("accepted.amount is larger than any quote", code="amount_too_large")
    gw.quotes.check(token, call.quote.request_digest, int(raw_amount), now)
    return int(raw_amount)


def lock(gw: Gateway, call: ChatCall, scheme: PaymentScheme, payment: Verified, proof: Proof, call_id: str) -> Paid:
    """Lock the payment against replay; refuse a wallet in debt that does not pay it off; hold
    from credit what the payment does not cover of the quote."""
    settlement_call = scheme.settlement_call(payment)
    payment_id = gw.store.reserve(
        {
            "lock_key": payment.lock_key,
            "scheme": payment.scheme,
            "network": payment.network,
            "asset": payment.asset,
            "payer": payment.payer,
            "payee": payment.payee,
            "amount": payment.amount,
            "proof": json.dumps(payment.proof, separators=(",", ":")),
            "request_digest": call.quote.request_digest,
        }
    )
    if payment_id is None:
        raise PaymentInvalid("this payment has already been used", code="invalid_exact_evm_nonce_already_used")
    account = credit_account(payment.network, payment.asset, payment.payer)
    paid = Paid(payment, scheme, payment_id, account, 0, proof, settlement_call)
    quote = call.quote.amount
    held = max(quote - payment.amount, 0)
    try:
        debt = max(-gw.store.credit_balance(account), 0)
        if debt and payment.amount < quote + debt:
            refusal = PaymentInvalid(
                f"this wallet owes {debt} (a settlement of its payment failed on chain): pay the quote plus "
                f"the debt, {quote + debt}, or send the debt by transfer",
                code="debt_outstanding",
            )
            refusal.debt = debt
            raise refusal
        if held and not gw.store.hold_credit(account, held, call_id=call_id, payment_id=payment_id):
            raise PaymentInvalid(
                f"payment of {payment.amount} plus credit does not cover the quote {quote}", code="amount_insufficient"
            )
    except BaseException as exc:
        undo(gw, paid, call, call_id, exc)  # nothing is held yet
        raise
    return replace(paid, held=held)


async def confirm(gw: Gateway, paid: Paid) -> None:
    """The payment will settle: checked on chain (with the payer's other payments not on chain yet)."""
    p = paid.payment
    await paid.scheme.confirm(p, lambda: gw.store.unsettled_amount(p.network, p.asset, p.payer))


async def forward(gw: Gateway, call: ChatCall, request: Request) -> Opened:
    """Send the call upstream. A non-streamed call must be answered within ``max_call_seconds``."""
    send = gw.router.send(
        call.model,
        conversation_key(call.model, call.body, request.headers),
        call.forward,
        call.stream,
        request.headers,
        max_usd=Fraction(call.quote.amount, 10**gw.settings.chain.decimals),
    )
    if call.stream:
        return await send
    try:
        async with asyncio.timeout(gw.settings.max_call_seconds):
            return await send
    except TimeoutError:
        raise UpstreamUnavailable(
            f"the upstream did not answer within {gw.settings.max_call_seconds} s", code="upstream_timeout"
        ) from None


def undo(gw: Gateway, paid: Paid, call: ChatCall, call_id: str, exc: BaseException) -> None:
    """The call will not be served: nobody is charged. Money that already moved becomes credit.
    A payment the chain refused is never tried again; any other may pay a retry of this call."""
    reason = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
    try:
        if paid.held:
            gw.store.release_credit(paid.account, paid.held, call_id=call_id)
        if paid.prepaid:
            gw.store.settle_call_credit(
                paid.account, deposit=paid.payment.amount, held=0, cost=0, call_id=call_id, payment_id=paid.payment_id
            )
            gw.store.mark_prepaid(paid.payment_id)
        elif isinstance(exc, PaymentInvalid) and exc.code not in ("debt_outstanding", "amount_insufficient"):
            gw.store.refuse(paid.payment_id, f"{exc.code}: {reason}")
        else:
            gw.store.release(paid.payment_id, f"not served: {reason}")
        gw.store.insert_call(call_row(call_id, paid, call, status="failed", error=reason, finished_at=time.time()))
    except Exception:  # undoing must not mask the original error
        log.exception("could not undo the payment of call %s", call_id)


def settlement(gw: Gateway, paid: Paid) -> Settle:
    """How the payment settles once the upstream has committed: its transaction is signed and
    queued (broadcast by the worker), or — the money moved already — it is simply settled."""
    if paid.settlement is None:
        return PREPAID
    signing = gw.settler.signer(*paid.settlement)
    return signing.sender, signing


def receipt_headers(gw: Gateway, paid: Paid, settle: Settle, call_id: str) -> dict[str, str]:
    """The receipt id, and x402's settlement response in the version the payment came in."""
    p = paid.payment
    tx_hash = settle[1].tx_hash if isinstance(settle, tuple) else p.proof.get("transaction")
    v1 = paid.proof.version == 1
    header = x402.X_PAYMENT_RESPONSE if v1 else x402.PAYMENT_RESPONSE
    network = gw.v1_name_of[p.network] if v1 else p.network
    return {
        "x-tollway-receipt": call_id,
        header: x402.settle_response(success=True, tx_hash=tx_hash or "", network=network, payer=p.payer),
    }


# -- meter and receipt ----------------------------------------------------------------------------


def meter(
    gw: Gateway,
    call: ChatCall,
    paid: Paid,
    opened: Opened,
    usage: Usage | None,
    expected: int,
    row: dict[str, Any],
    *,
    insert_row: bool,
    settle: Settle = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Charge the call's metered cost to the payer's credit account and record the call, in one
    transaction. Returns the metered fields (with ``credit_after``) and this hop's cache figures.

    Without usage the call cannot be metered and costs its quote (the agreed upper bound).
    """
    covered = paid.payment.amount + paid.held
    cost = call.quote.amount if usage is None else call.prices.cost(usage, long_cache=call.long_cache)
    if cost > charge(call, paid, usage) and usage is not None and usage.dialect != "estimated":
        gw.counters["cost_over_quote"] += 1
        log.warning(
            "cost_over_quote call=%s model=%s upstream=%s cost=%d quote=%d usage=%s",
            row["id"],
            call.model,
            opened.upstream,
            cost,
            call.quote.amount,
            usage.as_dict(),
        )
    cost = charge(call, paid, usage)
    fields: dict[str, Any] = {"cost": cost, "expected_cached_tokens": expected}
    discount = None
    if usage is not None:
        uncached = Usage(usage.prompt_tokens, usage.completion_tokens)
        discount = max(min(call.prices.cost(uncached), covered) - cost, 0)
        gw.prefixes.remember(opened.upstream, call.model, call.body["messages"], usage.prompt_tokens)
        fields.update(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            upstream_cost=None if usage.upstream_cost is None else str(usage.upstream_cost),
            usage_dialect=usage.dialect,
            cache_discount=discount,
        )
    balance = gw.store.finish_call(
        paid.account,
        deposit=paid.payment.amount,
        held=paid.held,
        cost=cost,
        payment_id=paid.payment_id,
        call={**row, **fields},
        insert_row=insert_row,
        settle=settle,
    )
    if balance is None:  # another process metered this stream already (it thought it abandoned)
        balance = gw.store.credit_balance(paid.account)
    fields["credit_after"] = balance
    return fields, cache.hop(opened.upstream, usage, expected, discount)


def charge(call: ChatCall, paid: Paid, usage: Usage | None) -> int:
    """What a call is charged: its metered cost, never more than its quote nor what paid for it;
    without usage, its quote (the agreed upper bound)."""
    cost = call.quote.amount if usage is None else call.prices.cost(usage, long_cache=call.long_cache)
    return min(cost, call.quote.amount, paid.payment.amount + paid.held)


def call_row(call_id: str, paid: Paid, call: ChatCall, **values: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "payment_id": paid.payment_id,
        "model": call.model,
        "upstream_model": call.upstream_model,
        "stream": call.stream,
        "quote": call.quote.amount,
        "paid": paid.payment.amount,
        "from_credit": paid.held,
        "created_at": call.received,
        **values,
    }


def respond(
    gw: Gateway, call: ChatCall, opened: Opened, paid: Paid, call_id: str, settle: Settle, expected: int
) -> Response:
    row = call_row(
        call_id,
        paid,
        call,
        upstream=opened.upstream,
        status="served",
        upstream_latency_ms=opened.latency_ms,
        duration_ms=opened.latency_ms,
        finished_at=time.time(),
    )
    usage = usage_from_body(opened.first)
    fields, hop = meter(gw, call, paid, opened, usage, expected, row, insert_row=True, settle=settle)
    headers = receipt_headers(gw, paid, settle, call_id)
    hops = [hop, *cache.upstream_hops(opened.response.headers.get(cache.CACHE_HEADER))]
    headers["x-tollway-cost"] = str(fields["cost"])
    headers["x-tollway-credit"] = str(fields["credit_after"])
    headers[cache.CACHE_HEADER] = cache.encode_hops(hops)
    media = opened.response.headers.get("content-type", "application/json")
    body = body_with_cost(opened.first, atomic_to_usd(fields["cost"], gw.settings.chain.decimals))
    log_call(
        call_id,
        call.model,
        200,
        call.received,
        stream=False,
        upstream=opened.upstream,
        scheme=paid.payment.scheme,
        paid=paid.payment.amount,
        from_credit=paid.held,
        cost=fields["cost"],
    )
    return Response(body, status_code=200, media_type=media, headers=headers)


def error_event(message: str, code: str) -> bytes:
    """How a stream that breaks after its first byte ends (OpenRouter's convention): an error
    chunk with ``finish_reason: "error"``, then ``[DONE]``."""
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
        "error": {"message": message, "code": code},
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"


def relay_stream(
    gw: Gateway, call: ChatCall, opened: Opened, paid: Paid, call_id: str, settle: Settle, expected: int
) -> StreamingResponse:
    started = time.time()
    row = call_row(
        call_id, paid, call, upstream=opened.upstream, status="streaming", upstream_latency_ms=opened.latency_ms
    )
    gw.store.insert_call(row, settle=settle)
    headers = receipt_headers(gw, paid, settle, call_id)
    per_event = gw.settings.models[call.model].max_tokens_per_event
    upstream = gw.router.named(opened.upstream)

    def finish(tail: StreamTail, complete: bool, usage: Usage | None) -> tuple[dict[str, Any], dict[str, Any]]:
        error = opened.error or tail.error()
        # Without usage, the documented rule: the prompt at its bound and each delivered event at
        # the model's most tokens per event (meter caps it at the quote).
        usage = usage or tail.estimate(call.quote.prompt_bound, per_event)
        row = {
            "id": call_id,
            "status": "served" if complete and error is None else "incomplete",
            "error": error,
            "duration_ms": (time.time() - started) * 1000,
            "finished_at": time.time(),
        }
        metered = meter(gw, call, paid, opened, usage, expected, row, insert_row=False)
        log_call(
            call_id,
            call.model,
            200,
            call.received,
            stream=True,
            upstream=opened.upstream,
            scheme=paid.payment.scheme,
            paid=paid.payment.amount,
            from_credit=paid.held,
            cost=metered[0]["cost"],
            outcome=row["status"],
        )
        return metered

    def close(tail: StreamTail, complete: bool) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Meter the stream now — or, when it carried no usage but its upstream can tell it after
        the fact, in the background once it does (the receipt then has it)."""
        usage = tail.usage()
        if usage is None and upstream.generation_url and tail.generation_id():
            gw.spawn(meter_later(tail, complete))
            return None
        return finish(tail, complete, usage)

    async def meter_later(tail: StreamTail, complete: bool) -> None:
        try:
            finish(tail, complete, await upstream.usage_after(tail.generation_id()))
        except Exception:
            log.exception("could not meter stream %s after the fact", call_id)

    stop_cutting = stream_cutter(gw, opened, paid)

    def usage_event(doc: dict[str, Any]) -> dict[str, Any] | None:
        """The usage chunk as the client gets it: tollway's charge as ``usage.cost``; dropped (or
        just its usage) if the client did not ask for it."""
        usage = parse_usage(doc["usage"], doc.get("timings"))
        if usage is not None:
            doc = with_cost(doc, atomic_to_usd(charge(call, paid, usage), gw.settings.chain.decimals))
        if call.wants_usage:
            return doc
        if not doc.get("choices"):
            return None
        return {k: v for k, v in doc.items() if k != "usage"}

    async def body() -> AsyncIterator[bytes]:
        tail = StreamTail()
        tail.feed(opened.first)
        relay = UsageEvents(usage_event)
        closed = False
        try:
            yield relay.feed(opened.first)
            async for chunk in opened.rest():
                tail.feed(chunk)
                if opened.error is None:  # once cut, nothing more reaches the client
                    out = relay.feed(chunk)
                    if out:
                        yield out
            if relay.held:
                yield relay.flush()
            if opened.error is not None and tail.error() is None:
                yield error_event(opened.error, "stream_interrupted")
            metered = close(tail, complete=opened.error is None)
            closed = True
            fields, hop = metered or ({"cost": None, "credit_after": None}, None)
            summary = {
                "receipt": call_id,
                "cost": None if fields["cost"] is None else str(fields["cost"]),
                "credit": None if fields["credit_after"] is None else str(fields["credit_after"]),
                "cache": [hop, *tail.upstream_hops()] if hop else tail.upstream_hops(),
            }
            yield SUMMARY_PREFIX + json.dumps(summary, separators=(",", ":")).encode() + b"\n\n"
        finally:
            stop_cutting()
            if not closed:  # the client went away, or the relay broke: meter what was delivered
                close(tail, complete=False)
            with anyio.CancelScope(shield=True):
                await opened.response.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def stream_cutter(gw: Gateway, opened: Opened, paid: Paid) -> Callable[[], None]:
    """Cut the stream when its settlement fails on chain, and at ``max_call_seconds``: the
    upstream is closed, and the client gets an error event. Returns what stops watching."""
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task[None]] = set()

    def cut(reason: str) -> None:
        if opened.error is None:
            opened.error = reason
            task = loop.create_task(opened.response.aclose())
            closing.add(task)
            task.add_done_callback(closing.discard)

    limit = gw.settings.max_call_seconds
    timer = loop.call_later(limit, cut, f"the call reached its time limit ({limit} s)")
    if not paid.prepaid:
        gw.settler.watch(paid.payment_id, lambda reason: cut(f"payment failed on chain: {reason}"))

    def stop() -> None:
        timer.cancel()
        gw.settler.unwatch(paid.payment_id)

    return stop


# -- the 402 ------------------------------------------------------------------------------------


def wallet_credit(gw: Gateway, request: Request) -> tuple[str | None, int]:
    """The wallet a request proves it holds (``X-Tollway-Wallet``), and its final credit."""
    raw = request.headers.get(WALLET_HEADER)
    if not raw:
        return None, 0
    wallet = check_wallet_proof(x402.unb64json(raw), gw.chain_id, gw.token, int(time.time()), gw.origin(request))
    return wallet, gw.store.available_credit(credit_account(gw.network, gw.token, wallet))


def offers(gw: Gateway, call: ChatCall, credit: int, debt: int = 0) -> list[Offer]:
    """What a 402 offers: on-chain payments of the quote less the wallet's credit (plus its debt),
    never below the smallest on-chain payment; or credit alone, when it covers the call."""
    q = call.quote
    least = least_payment(gw)
    due = q.amount + debt - min(credit, q.amount)
    out = []
    for s in gw.schemes:
        if s.name == "credit":
            if credit >= q.amount and not debt:
                out.insert(0, s.offer(q.amount))
        else:
            out.append(s.offer(max(due, least)))
    bound = []
    for o in out:
        extra = {**o.extra, "quote": gw.quotes.token(q.request_digest, o.amount, q.expires)}
        if o.scheme != "exact":  # our schemes sign the request digest itself
            extra["request"] = "0x" + q.request_digest
        if o.amount < q.amount:
            extra["credit"] = str(q.amount - o.amount)  # what the call will take from credit
        if debt:
            extra["debt"] = str(debt)
        bound.append(replace(o, extra=extra))
    return bound


def with_challenge(exc: PaymentRequired, gw: Gateway, call: ChatCall, request: Request) -> PaymentRequired:
    """Attach a fresh quote for this request to a 402 (x402: every 402 carries one)."""
    try:
        _, credit = wallet_credit(gw, request)
    except PaymentMalformed:
        credit = 0  # a bad wallet proof only forfeits the credit discount
    quoted = offers(gw, call, credit, getattr(exc, "debt", 0))
    resource = {
        "url": gw.public_base(request) + request.url.path,
        "description": f"{call.model[:80]} chat completion, at most {call.quote.max_tokens} output tokens",
        "mimeType": "application/json",
    }
    error = truncate(f"{exc.code}: {exc.message}", 300)
    doc = x402.payment_required(error, resource, quoted)
    # v2 clients read the header. The body is for OpenAI-compatible clients (``error`` an object,
    # whose message their SDKs show) — unless the chain has an x402 v1 name: v1 clients read the
    # body, with ``error`` a string, so it keeps that and says the rest at the top level.
    body: dict[str, Any] = {**exc.body(), "x402": doc}
    if gw.v1_names:
        exact = [o for o in quoted if o.scheme == "exact"]
        body = {**x402.payment_required_v1(error, resource, exact, gw.v1_name_of), **exc.body()["error"]}
    exc.challenge = {"headers": {x402.PAYMENT_REQUIRED: x402.b64json(doc)}, "body": body}
    return exc
