"""Idempotent calls: x402's ``payment-identifier`` extension, and ``Idempotency-Key``.

A paid (or signed-in) call may carry an id — in its payment's ``extensions["payment-identifier"]
.info.id``, or an ``Idempotency-Key`` header. While the first request with an id runs, the same
id gets 409 ``request_in_progress``; once it has been served, the same id with the same payload
(the request body and its payment or sign-in header, byte for byte) gets the first answer again
— a non-streamed body up to ``idempotency_max_body_bytes``, else (and for a stream) its receipt —
and is never charged twice; the same id with another payload gets 409. An id whose request was
not served (refused, or the upstream failed: nothing charged) may be used again. Answers are
kept ``idempotency_ttl_seconds``. With ``payment_identifier_required``, a payment without an id
is refused (400).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import receipts, signin
from .errors import BadRequest, Conflict
from .gateway import Gateway, abandoned_payment_after
from .payments import mpp, x402

KEY = "payment-identifier"
HEADER = "idempotency-key"
ID = re.compile(r"^[A-Za-z0-9_-]{16,128}\Z")  # the extension's rule, for both
REPLAYED = "idempotent-replayed"
# The headers of an answer that a repeat gets again (the body is stored apart).
KEPT_HEADERS = (
    "content-type",
    "payment-receipt",
    "x-tollway-receipt",
    "x-tollway-cost",
    "x-tollway-credit",
    "x-tollway-cache",
    x402.PAYMENT_RESPONSE.lower(),
    x402.X_PAYMENT_RESPONSE.lower(),
)


def declaration(gw: Gateway) -> dict[str, Any]:
    """``extensions["payment-identifier"]`` of a 402 (no schema: the 402's header stays small)."""
    return {KEY: {"info": {"required": gw.settings.payment_identifier_required}}}


def request_id(request: Request) -> str | None:
    """The id a request carries (its payment's, else ``Idempotency-Key``), checked; None if none."""
    found = request.headers.get(HEADER)
    raw = request.headers.get(x402.PAYMENT_SIGNATURE)
    if raw:
        doc = x402.unb64json(raw)
        ext = doc.get("extensions") if isinstance(doc, dict) else None
        info = ext.get(KEY, {}).get("info") if isinstance(ext, dict) and isinstance(ext.get(KEY), dict) else None
        if isinstance(info, dict) and info.get("id") is not None:
            found = info["id"]
    if found is None:
        return None
    if not isinstance(found, str) or not ID.match(found):
        raise BadRequest(
            "a payment identifier (or Idempotency-Key) is 16 to 128 letters, digits, '-' or '_'",
            code="invalid_payment_identifier",
        )
    return found


async def once(gw: Gateway, request: Request, digest: str, run: Callable[[], Awaitable[Response]]) -> Response:
    """``run`` the call — unless its id says it already ran (or is running)."""
    paying = request.headers.get(x402.PAYMENT_SIGNATURE) or request.headers.get(x402.X_PAYMENT)
    if paying is None and mpp.carries_credential(request.headers):
        paying = request.headers["authorization"]
    proof = paying or request.headers.get(signin.KEY)
    key = request_id(request)
    if key is None:
        if paying and gw.settings.payment_identifier_required:
            raise BadRequest(
                "this gateway requires a payment identifier with every payment", code="payment_identifier_required"
            )
        return await run()
    if not proof:
        return await run()  # unpaid: a 402, nothing to repeat
    fingerprint = hashlib.sha256(f"{digest}|{proof}".encode()).hexdigest()
    # A claim left in progress is taken over only once its call cannot be running anywhere (its
    # payment is given back then too: ``Gateway.give_back_abandoned_payments``).
    now = time.time()
    stale_before = now - abandoned_payment_after(gw.settings, gw.chain.total)
    held = gw.store.claim_request(key, fingerprint, stale_before, now)
    if held is not None:
        return repeat(gw, held, fingerprint)
    try:
        response = await run()
    except BaseException:
        gw.store.release_request(key, now)  # not served, nothing charged: the id may pay a retry
        raise
    if response.status_code != 200:
        gw.store.release_request(key, now)
        return response
    body = getattr(response, "body", None)  # (a stream has none: its receipt is what a repeat gets)
    if body is not None and len(body) > gw.settings.idempotency_max_body_bytes:
        body = None
    headers = {k: v for k, v in response.headers.items() if k in KEPT_HEADERS}
    gw.store.finish_request(key, now, response.status_code, headers, body, response.headers.get("x-tollway-receipt"))
    return response


def repeat(gw: Gateway, held: dict[str, Any], fingerprint: str) -> Response:
    if held["fingerprint"] != fingerprint:
        raise Conflict("this payment identifier was used for another request", code="payment_identifier_reused")
    if held["state"] != "done":
        raise Conflict("a request with this payment identifier is in progress", code="request_in_progress")
    headers = {**json.loads(held["headers"] or "{}"), REPLAYED: "true"}
    if held["body"] is not None:
        return Response(held["body"], status_code=held["status"], headers=headers)
    row = gw.store.receipt(held["receipt_id"])
    headers.pop("content-type", None)
    return JSONResponse({"object": "tollway.receipt", **receipts.view(gw, row)} if row else {}, headers=headers)
