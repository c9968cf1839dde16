"""The Starlette application: routes, the one error handler, the lifespan. Nothing else."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, catalogue, credits, discovery, metrics, page, pipeline, receipts, refunds, signin
from .config import Settings
from .errors import (
    GatewayError,
    NotFound,
    Unauthorized,
    error_body,
)
from .gateway import Gateway
from .pricing import money

log = logging.getLogger("tollway")


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def chat_completions(request: Request) -> Response:
    return await pipeline.chat_completions(request, gateway(request))


async def embeddings(request: Request) -> Response:
    return await pipeline.embeddings(request, gateway(request))


async def messages(request: Request) -> Response:
    return await pipeline.messages(request, gateway(request))


async def responses(request: Request) -> Response:
    return await pipeline.responses(request, gateway(request))


async def channel_refund(request: Request) -> Response:
    return await refunds.refund(request, gateway(request))


async def channel_status(request: Request) -> Response:
    return await refunds.status(request, gateway(request))


async def credit_balance(request: Request) -> Response:
    return await credits.balance(request, gateway(request))


async def credit_withdraw(request: Request) -> Response:
    return await credits.withdraw(request, gateway(request))


async def credit_withdrawal(request: Request) -> Response:
    gw = gateway(request)
    return await credits.withdrawal(request, gw, operator=is_admin(request, gw))


async def models(request: Request) -> Response:
    return await catalogue.models(request, gateway(request))


async def model_endpoints(request: Request) -> Response:
    return await catalogue.endpoints(request, gateway(request))


async def rankings(request: Request) -> Response:
    return await catalogue.rankings(request, gateway(request))


def is_admin(request: Request, gw: Gateway) -> bool:
    """The request carries ``Authorization: Bearer <admin_token>`` (and one is configured)."""
    token = gw.settings.admin_token
    given = request.headers.get("authorization", "")
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def prometheus(request: Request) -> Response:
    """The operator's metrics (Prometheus text format), with the admin token. The ledger's figures
    are read in the gateway's reports thread (``Gateway.report``), not on the event loop that
    serves calls: payments by state counts every payment (~70 ms at a million, on SQLite), and
    each scrape would hold every call in flight that long."""
    gw = gateway(request)
    if not gw.settings.admin_token:
        raise NotFound("metrics are served to the operator only: set admin_token", code="not_found")
    if not is_admin(request, gw):
        raise Unauthorized("send the admin token: Authorization: Bearer <admin_token>", code="unauthorized")
    return Response(await gw.report(partial(metrics.exposition, gw)), media_type=metrics.CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    gw = gateway(request)
    doc = discovery.openapi(gw, gw.public_base(request))
    return JSONResponse(doc, headers={"cache-control": "max-age=300"})


async def llms_txt(request: Request) -> Response:
    gw = gateway(request)
    text = discovery.llms_txt(gw, gw.public_base(request))
    return Response(text, media_type="text/markdown; charset=utf-8", headers={"cache-control": "max-age=300"})


async def receipt(request: Request) -> Response:
    """A call's receipt, for its payer (signed in) or the operator (admin token) only: it shows
    the payer's wallet and credit."""
    gw = gateway(request)
    row = gw.store.receipt(request.path_params["receipt_id"][:64])
    if not is_admin(request, gw):
        await signin.require_owner(gw, request, None if row is None else row["payer"], "receipt")
    if row is None:
        raise NotFound("no such receipt", code="receipt_not_found")
    return JSONResponse(receipts.view(gw, row))


CACHE_WINDOWS = {"5m": 300, "1h": 3600, "24h": 86400}


async def cache_stats(request: Request) -> Response:
    """Prompt-cache hit rates, expected vs observed cached tokens and discount passed on, per model
    over recent windows (from the ledger, so across all replicas). Per upstream for the operator.
    Scans of the ledger: read in the reports thread; for anyone but the operator, at most every
    ``CACHE_STATS_SECONDS``."""
    gw = gateway(request)
    if is_admin(request, gw):
        return JSONResponse(await gw.report(partial(cache_windows, gw, True)))
    return JSONResponse(await gw.recent("cache_stats", CACHE_STATS_SECONDS, partial(cache_windows, gw, False)))


CACHE_STATS_SECONDS = 5.0


def cache_windows(gw: Gateway, per_upstream: bool) -> dict[str, Any]:
    now = time.time()
    windows: dict[str, list[dict[str, Any]]] = {}
    for name, seconds in CACHE_WINDOWS.items():
        rows = []
        for r in gw.store.cache_stats(now - seconds, per_upstream=per_upstream):
            reporting, expected = r["prompt_tokens_reporting"], r["expected_cached_tokens"]
            rows.append(
                {
                    **{
                        k: r[k]
                        for k in (
                            "model",
                            *(("upstream",) if per_upstream else ()),
                            "calls",
                            "calls_reporting_cache",
                            "prompt_tokens",
                            "cached_tokens",
                            "expected_cached_tokens",
                        )
                    },
                    "hit_rate": round(r["cached_tokens"] / reporting, 4) if reporting else None,
                    "survival": round(r["survived_tokens"] / expected, 4) if expected else None,
                    "discount_passed": money(r["discount_passed"], gw.settings.chain.decimals),
                }
            )
        windows[name] = rows
    return {"windows": windows}


async def healthz(request: Request) -> Response:
    """Liveness for anyone; for the operator (admin token) also payment counts, the settlement
    worker's last error and the event counters (e.g. ``cost_over_quote``) — the counts read off the
    event loop, as ``/metrics`` reads them."""
    gw = gateway(request)
    ok = gw.settler.last_error is None
    doc: dict[str, Any] = {"ok": ok, "version": __version__}
    if is_admin(request, gw):
        doc.update(
            networks=sorted({s.network for s in gw.schemes}),
            payments=await gw.report(gw.store.count_by_state),
            settlement_error=gw.settler.last_error,
            chain_probe_failures=gw.chain_failures,
            upstreams=gw.router.health(),
            events=dict(gw.counters),
        )
    return JSONResponse(doc, status_code=200 if ok else 503)


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    headers: dict[str, str] = {}
    body: Any = exc.body()
    if exc.challenge:
        headers.update(exc.challenge["headers"])
        body = exc.challenge["body"]
    if exc.retry_after:
        headers["retry-after"] = str(exc.retry_after)
    if exc.status >= 500:
        log.warning("%s %s → %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
    # ASCII-escaped: an error may quote client input that is not valid UTF-8 (lone surrogates).
    return Response(json.dumps(body), status_code=exc.status, headers=headers, media_type="application/json")


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, method not allowed) in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    message = f"{request.method} {request.url.path[:100]}: {exc.detail}"
    return JSONResponse(error_body(exc.status_code, message, code), status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A fault of ours, answered in the same shape (the server logs its traceback)."""
    return JSONResponse(error_body(500, "internal error", "internal"), status_code=500)


# What a browser wallet must send, and may read (CORS).
CORS_REQUEST_HEADERS = [
    "Content-Type",
    "Authorization",
    "PAYMENT-SIGNATURE",
    "X-PAYMENT",
    "SIGN-IN-WITH-X",
    "X-Tollway-Wallet",
    "Idempotency-Key",
    "X-Session-Id",
    "X-Provider-Key",
    # what the Anthropic SDK sends from a browser (its key header is ignored here: the payment pays)
    "anthropic-version",
    "anthropic-beta",
    "x-api-key",
    "anthropic-dangerous-direct-browser-access",
]
CORS_EXPOSED_HEADERS = [
    "PAYMENT-REQUIRED",
    "PAYMENT-RESPONSE",
    "X-PAYMENT-RESPONSE",
    "WWW-Authenticate",
    "Payment-Receipt",
    "Retry-After",
    "X-Tollway-Receipt",
    "X-Tollway-Cost",
    "X-Tollway-Credit",
    "X-Tollway-Cache",
]


class ChatFastPath:
    """``POST /v1/chat/completions`` from a client that is not a browser (no ``Origin``) and sends
    no deprecated header goes straight to the pipeline: the paid hot path skips Starlette's CORS,
    exception and routing layers (about a tenth of a paid call's CPU). Its errors are answered by
    the same handler as every other route's; anything else takes the full stack."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and get_route_path(scope) == "/v1/chat/completions"
            and not any(k in SLOW_PATH_HEADERS for k, _ in scope["headers"])
        ):
            request = IndexedRequest(scope, receive, send)
            try:
                response = await chat_completions(request)
            except GatewayError as exc:
                response = await gateway_error(request, exc)
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


SLOW_PATH_HEADERS = (b"origin", b"x-tollway-wallet")


class IndexedHeaders(Headers):
    """A request's headers, looked up in a dict made once: a paid call reads some sixteen, most of
    them absent, and Starlette's ``Headers`` scans the whole list for each (and raises for each
    absent one a ``get`` asks for). The first of repeated headers wins, as in Starlette."""

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope=scope)
        self._index: dict[bytes, bytes] = {}
        for key, value in self._list:
            self._index.setdefault(key, value)

    def __getitem__(self, key: str) -> str:
        value = self._index.get(key.lower().encode("latin-1"))
        if value is None:
            raise KeyError(key)
        return value.decode("latin-1")

    def __contains__(self, key: Any) -> bool:
        return key.lower().encode("latin-1") in self._index

    def get(self, key: str, default: Any = None) -> Any:
        value = self._index.get(key.lower().encode("latin-1"))
        return default if value is None else value.decode("latin-1")


class IndexedRequest(Request):
    """A Starlette request whose headers are ``IndexedHeaders`` (the paid hot path's)."""

    @property
    def headers(self) -> Headers:
        if not hasattr(self, "_headers"):
            self._headers = IndexedHeaders(self.scope)
        return self._headers


class DeprecatedWalletHeader:
    """Answers to a request that still sends ``X-Tollway-Wallet`` say it is deprecated (RFC 9745),
    pointing to the sign-in that replaces it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(k == b"x-tollway-wallet" for k, _ in scope["headers"]):
            return await self.app(scope, receive, send)

        async def deprecated(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *DEPRECATION_HEADERS]
            await send(message)

        await self.app(scope, receive, deprecated)


DEPRECATION_HEADERS = [
    (b"deprecation", signin.DEPRECATION.encode()),
    (
        b"link",
        b'<https://github.com/x402-foundation/x402/blob/main/specs/extensions/sign-in-with-x.md>; rel="deprecation"',
    ),
]


def create_app(settings: Settings, gateway: Gateway | None = None) -> Starlette:
    """The app. It opens (and closes) its gateway itself, unless one opened by the caller is given."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.gateway = gateway or await Gateway.open(settings)
        try:
            yield
        finally:
            if gateway is None:
                await app.state.gateway.close()

    cors = gateway.settings.cors_origins if gateway else settings.cors_origins
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=cors,
            allow_methods=["GET", "POST"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=600,
        )
    ]
    return Starlette(
        middleware=[Middleware(ChatFastPath), *(middleware if cors else []), Middleware(DeprecatedWalletHeader)],
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model_id:path}/endpoints", model_endpoints, methods=["GET"]),
            Route("/v1/rankings", rankings, methods=["GET"]),
            Route("/v1/receipts/{receipt_id}", receipt, methods=["GET"]),
            Route("/v1/credit", credit_balance, methods=["GET"]),
            Route("/v1/channels/refund", channel_refund, methods=["GET", "POST"]),
            Route("/v1/channels/{channel_id}", channel_status, methods=["GET"]),
            Route("/v1/credit/withdrawals", credit_withdraw, methods=["POST"]),
            Route("/v1/credit/withdrawals/{payout_id}", credit_withdrawal, methods=["GET"]),
            Route("/v1/stats/cache", cache_stats, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/llms.txt", llms_txt, methods=["GET"]),
            *(Route(path, page.serve, methods=["GET"]) for path in page.FILES),
        ],
        exception_handlers={GatewayError: gateway_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
