"""httpx transports that pay 402s: ``PayingTransport`` (async) and ``SyncPayingTransport``.

Both wrap an inner transport and share the I/O-free ``Payer`` and ``Exchange``: on a 402 the
call whose turn it is to use the wallet's credit signs in (``SIGN-IN-WITH-X``; one call at a
time does, so calls in parallel never race for the credit) and is served if the credit covers
it; otherwise an allowed offer is signed within the spend limits — ``upto`` before ``exact`` —
and sent in ``PAYMENT-SIGNATURE``; a payment refused because the credit or the quote moved
meanwhile is paid again with the fresh quote (three attempts in all). A 401 that declares a
sign-in (``/v1/credit``, receipts, withdrawals) is answered with one. A request body must be
replayable (bytes, as the OpenAI SDK sends).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx

from ..errors import PaymentMalformed
from ..payments.signed import origin_of
from ..payments.x402 import PAYMENT_RESPONSE, unb64json
from .payer import Exchange, Payer, PaymentRefused, Pending, digits

MAX_USD = "tollway.max_usd"  # request extension: the most this call may pay (lowers the per-call limit)


def _origin_and_limit(request: httpx.Request) -> tuple[str, Decimal | None]:
    limit = request.extensions.get(MAX_USD)
    return origin_of(str(request.url)), None if limit is None else Decimal(limit.numerator) / limit.denominator


def _retry(request: httpx.Request, pending: Pending) -> httpx.Request:
    headers = httpx.Headers(request.headers)
    headers.update(pending.headers)
    return httpx.Request(
        request.method, request.url, headers=headers, content=request.content, extensions=request.extensions
    )


MAX_402_BODY = 1 << 16  # bytes of a 402 read (and dropped) before its paid retry: a hostile one may never end


async def _drop(response: httpx.Response) -> None:
    """Read a 402 that its paid retry answers (so that its connection may be reused), up to a bound."""
    async for _ in response.aiter_raw():
        if response.num_bytes_downloaded > MAX_402_BODY:
            break
    await response.aclose()


def _drop_sync(response: httpx.Response) -> None:
    for _ in response.iter_raw():
        if response.num_bytes_downloaded > MAX_402_BODY:
            break
    response.close()


class PayingTransport(httpx.AsyncBaseTransport):
    def __init__(self, payer: Payer, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.payer = payer
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        exchange = Exchange(self.payer, *_origin_and_limit(request))
        try:
            request.headers.update(exchange.start())
            response = await self.inner.handle_async_request(request)
            while (pending := exchange.next(response.status_code, response.headers)) is not None:
                await _drop(response)
                response = await self.inner.handle_async_request(_retry(request, pending))
            return response
        finally:
            exchange.finish()

    async def aclose(self) -> None:
        await self.inner.aclose()


class SyncPayingTransport(httpx.BaseTransport):
    def __init__(self, payer: Payer, inner: httpx.BaseTransport | None = None) -> None:
        self.payer = payer
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        exchange = Exchange(self.payer, *_origin_and_limit(request))
        try:
            request.headers.update(exchange.start())
            response = self.inner.handle_request(request)
            while (pending := exchange.next(response.status_code, response.headers)) is not None:
                _drop_sync(response)
                response = self.inner.handle_request(_retry(request, pending))
            return response
        finally:
            exchange.finish()

    def close(self) -> None:
        self.inner.close()


REFUND_PATH = "/v1/channels/refund"


def refund_channel(payer: Payer, http: httpx.Client, amount: int | None = None) -> dict[str, Any]:
    """Take back from ``payer``'s batch-settlement channel with the gateway ``http`` talks to (its
    base URL) what it holds and was not charged, or ``amount`` of it: the gateway's settlement
    response (``transaction``, ``amount`` refunded). Raises ``PaymentRefused`` if it will not."""
    headers: dict[str, str] = {}
    offer: dict[str, Any] = {}
    for _ in range(3):  # the terms; the refund (or a count to resynchronise from); the refund
        answer = http.get(REFUND_PATH, headers=headers)
        if answer.status_code == 200:
            return _refunded(payer, offer, answer)
        asked = payer.refund_headers(answer.headers, amount) if answer.status_code == 402 else None
        if asked is None:
            break
        headers, offer = asked
    raise PaymentRefused(f"the refund was refused: {answer.status_code} {answer.text[:300]}")


def _refunded(payer: Payer, offer: dict[str, Any], answer: httpx.Response) -> dict[str, Any]:
    """The settlement response of a refund the gateway acknowledged (200), counted."""
    if not offer:
        raise PaymentRefused("the gateway acknowledged a refund before one was asked for")
    try:
        doc = unb64json(answer.headers.get(PAYMENT_RESPONSE) or "")
    except PaymentMalformed:
        doc = None
    if not isinstance(doc, dict):
        raise PaymentRefused("the gateway acknowledged the refund without a settlement response")
    amount = str(doc.get("amount") or "0")
    payer.refunded(offer, int(amount) if digits(amount) else 0)
    return doc
