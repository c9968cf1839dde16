"""relay → meter → receipt: a served call is charged its metered cost and answered with a receipt.

A non-streamed call is metered from its body, and its payment settles in the same ledger
transaction that records it. A stream is relayed chunk by chunk — its usage chunk rewritten with
tollway's charge, or dropped if the client did not ask for it — and metered when it ends: from its
usage, else from the upstream's own record after the fact, else by the documented estimate (the
prompt at its bound, each delivered event at the model's most tokens per event). A stream is cut,
with an error event, when its payment fails on chain and at ``max_call_seconds``; its progress is
saved as it goes, so that a stream a crash left open is metered by what it delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import anyio
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from . import cache, metrics
from .chat import ChatCall
from .errors import ChainUnavailable, PaymentInvalid
from .free_tier import PAYER as FREE_PAYER
from .gateway import Gateway
from .jsonbytes import compact
from .ledger.store import Settlement
from .payments import mpp, x402
from .payments.base import PaymentScheme, Proof, Quote, Verified
from .pricing import atomic_to_usd, to_atomic
from .upstream.attempts import encode_attempts
from .upstream.client import GENERATION, Opened
from .usage import (
    SUMMARY_PREFIX,
    StreamTail,
    StreamUsage,
    Usage,
    UsageEvents,
    body_with_cost,
    parse_usage,
    usage_of_answer,
    with_cost,
)

log = logging.getLogger("tollway.pipeline")
calls_log = logging.getLogger("tollway.calls")
PROGRESS_SECONDS = 2.0  # how often a stream's delivered events are saved
USAGE_GRACE = 5.0  # seconds a relay goes on, for the usage chunk, after its client left an ended answer


@dataclass(frozen=True)
class Paid:
    """A locked payment: what it was priced at (``quote``: the output cap it is served with),
    what covers it (the payment, plus ``held`` from credit), and the debt it must also pay off."""

    payment: Verified
    scheme: PaymentScheme
    payment_id: str
    account: str  # the payer's credit account
    quote: Quote
    proof: Proof
    held: int = 0
    debt: int = 0
    owed: int = 0  # what the payer owed us, this payment included, as it was locked
    channel: dict[str, Any] | None = None  # the channel the payment took, as it took it

    @property
    def covered(self) -> int:
        return self.payment.amount + self.held

    @property
    def free(self) -> bool:
        return self.payment.payer == FREE_PAYER

    @property
    def who(self) -> str:
        """Whose call it is, for what is kept of one payer's calls apart from another's (its
        conversation's upstream, the prompts it is expected to have cached): the wallet, or for a
        free call the identity its quota counts (every free call's payer is ``free``)."""
        return f"free:{self.payment.proof['free']}" if self.free else self.payment.payer


def settlement(gw: Gateway, paid: Paid, due: int | None = None) -> Settlement:
    """How the payment settles once the call is on record (``Gateway.settlement``); ``due``: what
    the call owes beyond the credit held for it, for a metered payment."""
    return gw.settlement(paid.scheme, paid.payment, paid.quote.amount if due is None else due)


def log_call(call_id: str, model: str, status: int, started: float, **details: Any) -> None:
    """One line per call, key=value, nothing secret: what an operator greps and graphs."""
    metrics.call(model, status, details.get("code"))
    if calls_log.isEnabledFor(logging.INFO):  # (the line is built only if it is written)
        fields = " ".join(f"{k}={v}" for k, v in details.items() if v is not None)
        ms = (time.time() - started) * 1000
        calls_log.info("call id=%s model=%s status=%d ms=%.1f %s", call_id, model, status, ms, fields)


def log_served(call_id: str, call: ChatCall, paid: Paid, opened: Opened, cost: int, **more: Any) -> None:
    """The log line of a call that was served (a stream's, once it is metered)."""
    metrics.first_byte(opened.upstream, opened.latency_ms / 1000)
    p = paid.payment
    log_call(
        call_id,
        call.model,
        200,
        call.received,
        stream=call.stream,
        upstream=opened.upstream,
        scheme=p.scheme,
        paid=p.amount,
        from_credit=paid.held,
        cost=cost,
        **more,
    )


def charge(call: ChatCall, paid: Paid, usage: Usage | None) -> int:
    """What a call is charged: its metered cost, never more than its quote nor what paid for it;
    without usage, its quote (the agreed upper bound)."""
    quote = paid.quote.amount
    cost = quote if usage is None else call.prices.cost(usage, long_cache=call.long_cache)
    return min(cost, quote, paid.covered)


def call_row(call_id: str, paid: Paid, call: ChatCall, **values: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "payment_id": paid.payment_id,
        "model": call.model,
        "upstream_model": call.upstream_model,
        "api": call.surface,
        "stream": call.stream,
        "byok": call.route.byok,
        "quote": paid.quote.amount,
        "prompt_bound": paid.quote.prompt_bound,
        "paid": paid.payment.amount,
        "from_credit": paid.held,
        "created_at": call.received,
        **values,
    }


def added_ms(call: ChatCall, opened: Opened) -> float:
    """The time the gateway took of a call before its answer could start, beyond the upstream's
    own: from the request's arrival to now (its answer is about to leave), less the upstream's time
    to its first byte (failed attempts before it count as the gateway's)."""
    return max((time.time() - call.received) * 1000 - opened.latency_ms, 0.0)


def served_row(call_id: str, paid: Paid, call: ChatCall, opened: Opened, **values: Any) -> dict[str, Any]:
    """The row of a call an upstream answered: which one, after which attempts, how soon."""
    served = {"upstream": opened.upstream, "attempts": encode_attempts(opened.attempts)}
    return call_row(call_id, paid, call, **served, upstream_latency_ms=opened.latency_ms, **values)


def receipt_headers(gw: Gateway, paid: Paid, settled: Settlement | None, call_id: str) -> dict[str, str]:
    """The receipt id, and x402's settlement response in the version the payment came in: the
    transaction (none yet for a stream that settles when it ends), and what moved when a metered
    payment moved less than it authorised."""
    if not paid.scheme.rails:  # (a free call: no payment to answer for)
        return {"x-tollway-receipt": call_id}
    p = paid.payment
    signing = settled.sign if settled else None
    tx_hash = getattr(signing, "tx_hash", None) or p.proof.get("transaction") or ""
    amount = settled.amount if settled is not None and paid.scheme.metered else None
    v1 = paid.proof.version == 1
    header = x402.X_PAYMENT_RESPONSE if v1 else x402.PAYMENT_RESPONSE
    network = gw.v1_name_of[p.network] if v1 else p.network
    if paid.proof.rail == "mpp" and gw.mpp is not None:
        return {
            "x-tollway-receipt": call_id,
            mpp.PAYMENT_RECEIPT: gw.mpp.receipt(paid.proof, tx_hash, int(time.time())),
        }
    extra = paid.scheme.response_extra(paid.channel, amount)
    response = x402.settle_response(
        success=True, tx_hash=tx_hash, network=network, payer=p.payer, amount=amount, extra=extra
    )
    return {"x-tollway-receipt": call_id, header: response}


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
    settled: Settlement | None,
) -> tuple[dict[str, Any], dict[str, Any], Settlement | None]:
    """Charge the call's metered cost to the payer's credit account and record the call — and, if
    its payment has not settled yet, settle it — in one transaction. Returns the metered fields
    (with ``credit_after``), this hop's cache figures, and how the payment settled."""
    cost, billed = charge(call, paid, usage), 0
    if usage is not None and usage.dialect == GENERATION and usage.upstream_cost and not call.route.byok:
        billed = to_atomic(Fraction(usage.upstream_cost), gw.settings.chain.decimals)  # (its writes unnamed)
        cost = min(max(cost, billed), paid.quote.amount, paid.covered)
    if usage is not None and usage.dialect != "estimated" and paid.quote.amount:  # (a free call's is 0)
        over = max(call.prices.cost(usage, long_cache=call.long_cache), billed)  # (what the upstream says it billed)
        if over > cost:
            gw.counters["cost_over_quote"] += 1
            log.warning(
                "cost_over_quote call=%s model=%s upstream=%s cost=%d quote=%d usage=%s",
                row["id"],
                call.model,
                opened.upstream,
                over,
                paid.quote.amount,
                usage.as_dict(),
            )
    now_settled = settled is None
    if now_settled:  # (a metered payment moves what credit held for the call does not cover)
        settled = settlement(gw, paid, max(cost + paid.debt - paid.held, 0))
    deposit = paid.payment.amount if settled.amount is None else settled.amount  # type: ignore[union-attr]
    fields: dict[str, Any] = {"cost": cost, "expected_cached_tokens": expected}
    if insert_row:  # (a non-streamed answer leaves once this is recorded; a stream's row has its own)
        fields["added_ms"] = added_ms(call, opened)
    discount = None
    if usage is not None:
        uncached = Usage(usage.prompt_tokens, usage.completion_tokens)
        discount = max(min(call.prices.cost(uncached), paid.covered) - cost, 0)
        if call.prompt:
            gw.prefixes.remember(paid.who, opened.upstream, call.prefixes(), usage.prompt_tokens)
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
        deposit=deposit,
        held=paid.held,
        cost=cost,
        payment_id=paid.payment_id,
        call={**row, **fields},
        insert_row=insert_row,
        settle=settled if now_settled else None,
    )
    if balance is None:  # another process metered this stream already (it thought it abandoned)
        balance = gw.store.credit_balance(paid.account)
        fields["cost"] = gw.store.metered_cost(row["id"])  # (its charge stands: the one the payer is told)
        settled = None if now_settled else settled  # (the settlement built here rolled back: the sweep's stands)
    else:
        gw.settler.wake()
    fields["credit_after"] = balance
    return fields, cache.hop(opened.upstream, usage, expected, discount), settled


def respond(gw: Gateway, call: ChatCall, opened: Opened, paid: Paid, call_id: str, expected: int) -> Response:
    """A non-streamed answer: metered, its payment settled, with tollway's charge in ``usage.cost``."""
    row = served_row(
        call_id, paid, call, opened, status="served", duration_ms=opened.latency_ms, finished_at=time.time()
    )
    doc = opened.doc  # (an answer is a JSON object: ``upstream.client.no_answer``)
    usage = usage_of_answer(doc, output=call.surface != "embeddings")
    fields, hop, settled = meter(gw, call, paid, opened, usage, expected, row, insert_row=True, settled=None)
    headers = receipt_headers(gw, paid, settled, call_id)
    hops = [hop, *cache.upstream_hops(opened.response.headers.get(cache.CACHE_HEADER))]
    headers["x-tollway-cost"] = str(fields["cost"])
    headers["x-tollway-credit"] = str(fields["credit_after"])
    headers[cache.CACHE_HEADER] = cache.encode_hops(hops)
    headers["x-content-type-options"] = "nosniff"
    body = opened.first
    if call.surface in OPENAI_USAGE:  # (the other APIs' answers go back untouched)
        body = body_with_cost(body, doc, atomic_to_usd(fields["cost"], gw.settings.chain.decimals))
    log_served(call_id, call, paid, opened, fields["cost"])
    # (never as the upstream labels it: a text/html answer would be a page of this gateway's origin)
    return Response(body, status_code=200, media_type="application/json", headers=headers)


OPENAI_USAGE = ("chat", "embeddings")  # the APIs whose answers carry tollway's charge as usage.cost


def error_event(message: str, code: str, surface: str = "chat") -> bytes:
    """How a stream that breaks after its first byte ends, in its API's own terms: chat (OpenRouter's
    convention) an error chunk with ``finish_reason: "error"``, then ``[DONE]``; Messages and
    Responses their ``error`` event."""
    if surface in ("messages", "responses"):
        doc: dict[str, Any] = {"type": "error"}
        if surface == "messages":
            doc["error"] = {"type": "api_error", "message": message}
        else:
            doc.update(code=code, message=message, param=None)
        return b"event: error\ndata: " + compact(doc).encode() + b"\n\n"
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
        "error": {"message": message, "code": code},
    }
    return b"data: " + compact(chunk).encode() + b"\n\ndata: [DONE]\n\n"


def relay_stream(
    gw: Gateway, call: ChatCall, opened: Opened, paid: Paid, call_id: str, expected: int, unchecked: float = 0.0
) -> RelayResponse:
    """A stream: recorded as it starts — with its payment's settlement, for a payment of the bound
    (a metered one settles when the stream ends) — relayed, then metered. ``unchecked``: the
    seconds since its payment was last checked on chain."""
    started = time.time()
    per_event = gw.settings.models[call.model].max_tokens_per_event  # (what can fail, before the row is written)
    upstream = gw.router.named(opened.upstream)
    settled = None if paid.scheme.metered else settlement(gw, paid)
    row = served_row(call_id, paid, call, opened, status="streaming", added_ms=added_ms(call, opened))
    gw.store.insert_call(row, settle=settled)
    headers = receipt_headers(gw, paid, settled, call_id)

    reader = None if call.surface == "chat" else StreamUsage()  # (chat's usage chunk is read from the tail)

    def finish(tail: StreamTail, complete: bool, usage: Usage | None) -> tuple[dict[str, Any], Any, Settlement | None]:
        error = opened.error or tail.error()
        q, opening = paid.quote, reader.prompt() if reader else None
        usage = usage or tail.estimate(q.prompt_bound, per_event, q.max_tokens * q.choices, opening)
        row = {
            "id": call_id,
            "status": "served" if complete and error is None else "incomplete",
            "error": error,
            "events": tail.events_seen,
            "duration_ms": (time.time() - started) * 1000,
            "finished_at": time.time(),
        }
        metered = meter(gw, call, paid, opened, usage, expected, row, insert_row=False, settled=settled)
        log_served(call_id, call, paid, opened, metered[0]["cost"], outcome=row["status"])
        return metered

    def close(tail: StreamTail, complete: bool) -> tuple[dict[str, Any], Any, Settlement | None] | None:
        """Meter the stream now — or, when it carried no usage but its upstream can tell it after
        the fact, in the background once it does (the receipt then has it)."""
        usage = tail.usage() if reader is None else reader.usage()
        if usage is None and reader is None and upstream.generation_url and tail.generation_id():
            gw.store.metering_later(call_id, tail.events_seen)  # (the sweeps of streams left open wait)
            gw.spawn(meter_later(tail, complete))
            return None
        return finish(tail, complete, usage)

    async def meter_later(tail: StreamTail, complete: bool) -> None:
        # The lookup may take long (retries, slow answers) but the payment must still settle: it
        # gets until a quarter of the settlement's margin past the call's limit, then the stream is
        # metered as one that told nothing (its estimate).
        left = call.received + gw.settings.usage_wait_seconds - time.time()
        try:
            try:
                usage = await asyncio.wait_for(upstream.usage_after(tail.generation_id()), timeout=max(left, 0.0))
            except TimeoutError:
                usage = None
            finish(tail, complete, usage)
        except Exception:
            log.exception("could not meter stream %s after the fact", call_id)

    def usage_event(doc: dict[str, Any]) -> dict[str, Any] | None:
        """The usage chunk as the client gets it: tollway's charge as ``usage.cost``; dropped (or
        just its usage) if the client did not ask for it."""
        if not isinstance(doc.get("usage"), dict):
            return doc
        usage = parse_usage(doc["usage"], doc.get("timings"))
        if usage is not None:
            doc = with_cost(doc, atomic_to_usd(charge(call, paid, usage), gw.settings.chain.decimals))
        if call.wants_usage:
            return doc
        if not doc.get("choices"):
            return None
        return {k: v for k, v in doc.items() if k != "usage"}

    watch = settled is not None and settled.sign is not None
    stop_cutting = stream_cutter(gw, call, opened, paid, watch=watch, unchecked=unchecked)

    tail = StreamTail()

    async def body() -> AsyncIterator[bytes]:
        tail.feed(opened.first)
        relay = UsageEvents(usage_event if reader is None else reader.see)
        closed, saved = False, time.monotonic()
        left = call.received + gw.settings.max_call_seconds - time.time()
        gw.live[call_id] = time.monotonic() + left  # (said alive while it is relayed, up to its limit)
        try:
            yield relay.feed(opened.first)
            async for chunk in opened.rest():
                if opened.error is not None:  # once cut, nothing more reaches the client, nor counts
                    continue
                tail.feed(chunk)
                if time.monotonic() - saved > PROGRESS_SECONDS:  # what a crash would leave to meter
                    gw.store.stream_progress(call_id, tail.events_seen)
                    saved = time.monotonic()
                out = relay.feed(chunk)
                if out:
                    yield out
            if relay.held:
                yield relay.flush()
            if opened.error is not None and tail.error() is None:
                yield error_event(opened.error, "stream_interrupted", call.surface)
            metered = close(tail, complete=opened.error is None)
            closed = True
            yield summary(call_id, tail, metered)
        finally:
            gw.live.pop(call_id, None)
            stop_cutting()
            try:
                if not closed:  # the client went away, or the relay broke: meter what was delivered
                    relay.flush()  # (an event held back whole may carry the usage)
                    close(tail, complete=False)
            finally:  # (the upstream's connection is let go whatever metering did)
                with anyio.CancelScope(shield=True):
                    await opened.response.aclose()

    headers = {**headers, "cache-control": "no-cache", "x-content-type-options": "nosniff"}
    return RelayResponse(body(), media_type="text/event-stream", headers=headers, answered=tail.answered)


class RelayResponse(StreamingResponse):
    """A relayed stream, stopped when its client goes. Starlette's own, under a server that speaks
    ASGI < 2.4 (uvicorn), runs the stream in an anyio task group beside a listener for the
    disconnect: ~0.2 ms of CPU per stream, before its first byte. Here the listener is one plain
    task, which cancels the relay (this task) if the client goes first: the stream's generator then
    meters what was delivered and closes the upstream (``relay_stream``).

    A client that goes once the answer has ended (``answered``) is not waiting for anything but the
    usage chunk; the relay goes on reading the upstream for it (for ``USAGE_GRACE`` seconds at most),
    and the call is charged what the upstream bills: a model's hidden reasoning is no event, and
    the estimate of a stream cut there would have left it out."""

    def __init__(self, *args: Any, answered: Callable[[], bool] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answered = answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        state = {"finished": False, "gone": False}
        done = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["finished"] and self.answered is not None and self.answered():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), USAGE_GRACE)
            if not state["finished"]:
                state["gone"] = True
                relay.cancel()

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not state["gone"]:
                raise  # (cancelled from elsewhere: the server is shutting down)
            relay.uncancel()  # the client went: the stream ends here
        finally:
            state["finished"] = True
            done.set()
            listener.cancel()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # (cut while sending: it meters now)


def summary(call_id: str, tail: StreamTail, metered: tuple[dict[str, Any], Any, Settlement | None] | None) -> bytes:
    """The SSE comment a tollway ends its streams with: the receipt, the charge, the credit after it,
    the settlement (for a payment that settled as the stream ended), the cache hops."""
    doc: dict[str, Any] = {"receipt": call_id, "cost": None, "credit": None, "cache": tail.upstream_hops()}
    if metered is not None:
        fields, hop, settled = metered
        doc.update(cost=str(fields["cost"]), credit=str(fields["credit_after"]), cache=[hop, *doc["cache"]])
        if settled is not None:
            doc["settlement"] = {
                "transaction": getattr(settled.sign, "tx_hash", "") or "",
                "amount": None if settled.amount is None else str(settled.amount),
            }
    return SUMMARY_PREFIX + compact(doc).encode() + b"\n\n"


def stream_cutter(
    gw: Gateway, call: ChatCall, opened: Opened, paid: Paid, *, watch: bool, unchecked: float = 0.0
) -> Callable[[], None]:
    """Cut the stream when its settlement fails on chain (``watch``: it was sent as the stream
    began), when its payment no longer covers it (a metered one that can lapse — upto — settles
    only as the stream ends, so it is checked on chain again every ``stream_recheck_seconds``
    from its last check, ``unchecked`` seconds before the stream began — an upstream slow to
    its first byte included: a payer who moves the money away is served that long at most, not
    the whole stream), and
    ``max_call_seconds`` after the request arrived (so that no stream outlives its payment's
    validity): the upstream is closed, and the client gets an error event. Returns what stops
    watching."""
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task[None]] = set()

    def cut(reason: str) -> None:
        if opened.error is None:
            opened.error = reason
            task = loop.create_task(opened.response.aclose())
            closing.add(task)
            task.add_done_callback(closing.discard)

    limit = gw.settings.max_call_seconds
    timer = loop.call_later(limit - (time.time() - call.received), cut, f"the call reached its time limit ({limit} s)")
    if watch:
        gw.settler.watch(paid.payment_id, lambda reason: cut(f"payment failed on chain: {reason}"))

    async def recheck() -> None:
        p = paid.payment
        wait = max(gw.settings.stream_recheck_seconds - unchecked, 0.0)
        while opened.error is None:
            await asyncio.sleep(wait)
            wait = gw.settings.stream_recheck_seconds
            try:
                owed = gw.store.unsettled_amount(p.network, p.asset, p.payer, through=paid.payment_id)
                await paid.scheme.confirm(p, owed, recheck=True)
            except PaymentInvalid as exc:
                cut(f"payment no longer covers the call: {exc.message}")
            except ChainUnavailable:  # (an outage is not the payer's doing: served on, asked again)
                pass
            except Exception:  # (a fault of ours: the stream is served on, unchecked)
                log.exception("stream %s: its payment could not be checked again", paid.payment_id)
                return

    checking = loop.create_task(recheck()) if paid.scheme.metered and paid.scheme.lapses else None

    def stop() -> None:
        timer.cancel()
        gw.settler.unwatch(paid.payment_id)
        if checking is not None:
            checking.cancel()

    return stop
