"""The request pipeline, top to bottom:

    price → challenge | verify → forward → meter → settle → receipt

``chat_completions`` is the whole sequence; each stage is a function below it or a module of
its own (pricing/chat, payments, upstream, usage, settlement, ledger). Money only moves after
the upstream has committed to an answer; before that, any failure releases the payment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .chat import ChatCall, parse_chat
from .errors import BadRequest, GatewayError, PaymentInvalid, PaymentMalformed, PaymentRequired
from .gateway import Gateway
from .ledger.store import new_id
from .payments import x402
from .payments.base import PaymentScheme, Proof, Verified
from .pricing import to_atomic
from .upstream.client import Opened
from .usage import StreamTail, Usage, usage_from_body

log = logging.getLogger("tollway.pipeline")


async def chat_completions(request: Request, gw: Gateway) -> Response:
    call = parse_chat(await read_body(request, gw.settings.max_body_bytes), gw.settings, gw.prices)  # price
    proof: Proof | None = None
    try:
        proof = x402.decode_proof(request.headers, gw.v1_names)
        if proof is None:
            raise PaymentRequired("PAYMENT-SIGNATURE header is required")  # → challenge
        scheme, payment = verify(gw, call, proof)  # verify (local checks)
        payment_id = lock(gw, call, payment)  # the replay lock, shared by all replicas
    except PaymentRequired as exc:
        raise with_challenge(exc, gw, call, request, proof) from None

    receipt_id = new_id()
    try:
        opened = await forward(gw, call, scheme, payment, request)  # forward (funds confirmed meanwhile)
    except BaseException as exc:
        gw.store.release(payment_id, f"not served: {exc}")
        record_failure(gw, receipt_id, payment_id, call, exc)
        if isinstance(exc, PaymentRequired):
            raise with_challenge(exc, gw, call, request, proof) from None
        raise

    tx_hash = settle(gw, scheme, payment, payment_id)  # settle (signed here, broadcast by the worker)
    headers = receipt_headers(gw, proof, payment, tx_hash, receipt_id)
    if call.stream:
        return relay_stream(gw, call, opened, payment, payment_id, receipt_id, headers)  # meter at the end
    return respond(gw, call, opened, payment, payment_id, receipt_id, headers)  # meter → receipt


# -- stages ------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"request body larger than {limit} bytes", code="body_too_large")
    return bytes(body)


def verify(gw: Gateway, call: ChatCall, proof: Proof) -> tuple[PaymentScheme, Verified]:
    now = int(time.time())
    scheme = next((s for s in gw.schemes if s.name == proof.scheme and s.network == proof.network), None)
    if scheme is None:
        if not any(s.name == proof.scheme for s in gw.schemes):
            raise PaymentInvalid(f"scheme '{proof.scheme}' is not accepted here", code="unsupported_scheme")
        raise PaymentInvalid(f"network '{proof.network}' is not accepted here", code="invalid_network")
    amount = call.quote.amount
    if proof.accepted is not None:
        amount = accepted_amount(gw, call, scheme, proof.accepted, now)
    return scheme, scheme.verify(proof, scheme.offer(amount, gw.settings.max_timeout_seconds), now)


def accepted_amount(gw: Gateway, call: ChatCall, scheme: PaymentScheme, accepted: dict[str, Any], now: int) -> int:
    """The amount a v2 proof pays: the quote it echoes, if that quote was made for this request."""
    ours = scheme.offer(call.quote.amount, gw.settings.max_timeout_seconds)
    if str(accepted.get("asset", "")).lower() != ours.asset.lower():
        raise PaymentInvalid("the accepted offer names another asset", code="invalid_exact_evm_asset_mismatch")
    if str(accepted.get("payTo", "")).lower() != ours.pay_to.lower():
        raise PaymentInvalid(
            "the accepted offer pays someone else", code="invalid_exact_evm_payload_recipient_mismatch"
        )
    extra = accepted.get("extra")
    token = extra.get("quote") if isinstance(extra, dict) else None
    if token is None:
        return call.quote.amount  # no quote echoed: pay today's price for this request
    raw_amount = accepted.get("amount")
    if not isinstance(raw_amount, str) or not raw_amount.isdigit():
        raise PaymentMalformed("accepted.amount must be a decimal string")
    gw.quotes.check(token, call.quote.request_digest, int(raw_amount), now)
    return int(raw_amount)


def lock(gw: Gateway, call: ChatCall, payment: Verified) -> str:
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
    return payment_id


async def forward(gw: Gateway, call: ChatCall, scheme: PaymentScheme, payment: Verified, request: Request) -> Opened:
    """Send the call upstream while the payment is confirmed on chain; commit only if both succeed."""
    unsettled = gw.store.unsettled_amount(payment.network, payment.asset, payment.payer)
    funds = asyncio.ensure_future(scheme.confirm(payment, unsettled))
    try:
        opened = await gw.upstream.send(call.forward, call.stream, request.headers)
    except BaseException:
        funds.cancel()
        raise
    try:
        await funds
    except BaseException:
        await opened.response.aclose()
        raise
    return opened


def settle(gw: Gateway, scheme: PaymentScheme, payment: Verified, payment_id: str) -> str:
    to, data = scheme.settlement_call(payment)  # type: ignore[misc]
    return gw.settler.sign(payment_id, to, data)


def receipt_headers(gw: Gateway, proof: Proof, payment: Verified, tx_hash: str, receipt_id: str) -> dict[str, str]:
    headers = {"x-tollway-receipt": receipt_id}
    if proof.version == 1:
        name = next(n for n, net in gw.v1_names.items() if net == payment.network)
        headers[x402.X_PAYMENT_RESPONSE] = x402.settle_response(
            success=True, tx_hash=tx_hash, network=name, payer=payment.payer
        )
    else:
        headers[x402.PAYMENT_RESPONSE] = x402.settle_response(
            success=True, tx_hash=tx_hash, network=payment.network, payer=payment.payer
        )
    return headers


# -- meter and receipt ----------------------------------------------------------------------------


def metered(call: ChatCall, usage: Usage | None, decimals: int) -> dict[str, Any]:
    """The call-row fields that come from usage."""
    if usage is None:
        return {}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "upstream_cost": None if usage.upstream_cost is None else str(usage.upstream_cost),
        "usage_dialect": usage.dialect,
        "cost": to_atomic(call.prices.cost_usd(usage), decimals),
    }


def call_row(receipt_id: str, payment_id: str, call: ChatCall, **values: Any) -> dict[str, Any]:
    return {
        "id": receipt_id,
        "payment_id": payment_id,
        "model": call.model,
        "upstream_model": call.upstream_model,
        "stream": call.stream,
        "quote": call.quote.amount,
        **values,
    }


def respond(
    gw: Gateway,
    call: ChatCall,
    opened: Opened,
    payment: Verified,
    payment_id: str,
    receipt_id: str,
    headers: dict[str, str],
) -> Response:
    usage = usage_from_body(opened.first)
    gw.store.insert_call(
        call_row(
            receipt_id,
            payment_id,
            call,
            status="served",
            paid=payment.amount,
            upstream_latency_ms=opened.latency_ms,
            duration_ms=opened.latency_ms,
            finished_at=time.time(),
            **metered(call, usage, gw.settings.chain.decimals),
        )
    )
    media = opened.response.headers.get("content-type", "application/json")
    return Response(opened.first, status_code=200, media_type=media, headers=headers)


def relay_stream(
    gw: Gateway,
    call: ChatCall,
    opened: Opened,
    payment: Verified,
    payment_id: str,
    receipt_id: str,
    headers: dict[str, str],
) -> StreamingResponse:
    started = time.time()
    gw.store.insert_call(
        call_row(
            receipt_id, payment_id, call, status="streaming", paid=payment.amount, upstream_latency_ms=opened.latency_ms
        )
    )

    async def body() -> AsyncIterator[bytes]:
        tail = StreamTail()
        tail.feed(opened.first)
        complete = False
        try:
            yield opened.first
            async for chunk in opened.rest():
                tail.feed(chunk)
                yield chunk
            complete = opened.error is None
            summary = {"receipt": receipt_id, "usage": (u := tail.usage()) and u.as_dict()}
            yield b": tollway " + json.dumps(summary, separators=(",", ":")).encode() + b"\n\n"
        finally:
            usage = tail.usage()
            error = opened.error or tail.error()
            gw.store.update_call(
                receipt_id,
                status="served" if complete and error is None else "incomplete",
                error=error,
                duration_ms=(time.time() - started) * 1000,
                finished_at=time.time(),
                **metered(call, usage, gw.settings.chain.decimals),
            )
            with anyio.CancelScope(shield=True):
                await opened.response.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def record_failure(gw: Gateway, receipt_id: str, payment_id: str, call: ChatCall, exc: BaseException) -> None:
    reason = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
    try:
        gw.store.insert_call(
            call_row(receipt_id, payment_id, call, status="failed", error=reason, finished_at=time.time())
        )
    except Exception:  # recording must not mask the original error
        log.exception("could not record failed call %s", receipt_id)


# -- the 402 ------------------------------------------------------------------------------------


def with_challenge(
    exc: PaymentRequired, gw: Gateway, call: ChatCall, request: Request, proof: Proof | None
) -> PaymentRequired:
    """Attach a fresh quote for this request to a 402 (x402: every 402 carries one)."""
    q = call.quote
    token = gw.quotes.token(q.request_digest, q.amount, q.expires)
    offers = [s.offer(q.amount, gw.settings.max_timeout_seconds) for s in gw.schemes]
    offers = [replace(o, extra={**o.extra, "quote": token}) for o in offers]
    resource = {
        "url": (gw.settings.public_url or str(request.base_url)).rstrip("/") + request.url.path,
        "description": f"{call.model} chat completion, at most {q.max_tokens} output tokens",
        "mimeType": "application/json",
    }
    error = f"{exc.code}: {exc.message}"
    doc = x402.payment_required(error, resource, offers)
    body = doc
    if gw.v1_names:  # v2 clients read the header; v1 clients read the body
        body = x402.payment_required_v1(error, resource, offers, {net: n for n, net in gw.v1_names.items()})
    exc.challenge = {"headers": {x402.PAYMENT_REQUIRED: x402.b64json(doc)}, "body": body}
    return exc
