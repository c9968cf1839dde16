"""httpx transports that pay 402s: ``PayingTransport`` (async) and ``SyncPayingTransport``.

Both wrap an inner transport and share the I/O-free ``Payer``: every request carries the
wallet proof (so quotes come reduced by the wallet's credit); on a 402 they sign an allowed
offer within the spend limits — from credit when it covers the call — and retry once with
``PAYMENT-SIGNATURE``; a second 402 is returned as it is. A request body must be replayable
(bytes, as the OpenAI SDK sends).
"""

from __future__ import annotations

from decimal import Decimal

import httpx

from ..payments.signed import origin_of
from .payer import Payer, Pending

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


class PayingTransport(httpx.AsyncBaseTransport):
    def __init__(self, payer: Payer, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.payer = payer
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        origin, limit = _origin_and_limit(request)
        request.headers.update(self.payer.wallet_header(origin))
        response = await self.inner.handle_async_request(request)
        if response.status_code != 402:
            return response
        await response.aread()
        await response.aclose()
        pending = self.payer.prepare(response.headers, origin, max_usd=limit)
        try:
            paid = await self.inner.handle_async_request(_retry(request, pending))
        except BaseException:
            self.payer.abandon(pending)
            raise
        self.payer.conclude(pending, paid.status_code, paid.headers)
        return paid

    async def aclose(self) -> None:
        await self.inner.aclose()


class SyncPayingTransport(httpx.BaseTransport):
    def __init__(self, payer: Payer, inner: httpx.BaseTransport | None = None) -> None:
        self.payer = payer
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        origin, limit = _origin_and_limit(request)
        request.headers.update(self.payer.wallet_header(origin))
        response = self.inner.handle_request(request)
        if response.status_code != 402:
            return response
        response.read()
        response.close()
        pending = self.payer.prepare(response.headers, origin, max_usd=limit)
        try:
            paid = self.inner.handle_request(_retry(request, pending))
        except BaseException:
            self.payer.abandon(pending)
            raise
        self.payer.conclude(pending, paid.status_code, paid.headers)
        return paid

    def close(self) -> None:
        self.inner.close()
