"""Every error the gateway answers with, and nothing else.

    GatewayError                 500  internal   (only for our own faults)
    ├── BadRequest               400  invalid_request
    │   ├── PaymentMalformed     400  invalid_payload / invalid_x402_version / ...
    │   └── TooLarge             413  body_too_large
    ├── Unauthorized             401  unauthorized (prove the wallet, or the admin token)
    ├── Forbidden                403  forbidden
    ├── NotFound                 404  not_found
    ├── Conflict                 409  request_in_progress / payment_identifier_reused / credit_not_final
    ├── TooManyRequests          429  free_quota_exhausted / free_tier_exhausted (+ Retry-After)
    ├── PaymentRequired          402  payment_required  (carries the challenge)
    │   └── PaymentInvalid       402  an x402 reason (insufficient_funds, ...)
    │       └── PreconditionFailed 412 the payment needs something first (permit2_allowance_required)
    ├── UpstreamError            502  upstream_error
    │   ├── UpstreamRefused      403  upstream_refused: it would not take this request (its moderation)
    │   └── UpstreamUnavailable  503  upstream_unavailable (+ Retry-After)
    │       └── UpstreamDown     503  upstream_unavailable / upstream_timeout: it did not answer at all
    │           └── UpstreamUnreachable 503 upstream_unavailable: no connection could be made
    ├── ClientGone               499  client_closed_request (it hung up before it could be answered)
    ├── NotConfigured            503  not_configured (a feature this deployment lacks)
    └── ChainUnavailable         503  chain_unavailable    (+ Retry-After)

Each carries its HTTP status and a stable machine-readable ``code``; ``app.py`` turns
them into responses in one handler. Third-party exceptions are translated into these
where they enter (upstream client, chain client), never further in.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

MAX_MESSAGE = 500  # characters of an error message: it may quote client input

# Error types in OpenAI's vocabulary, by status: SDKs show ``error.message``, clients branch on these.
OPENAI_TYPES = {
    401: "authentication_error",
    402: "insufficient_quota",  # OpenAI's word for "pay first"
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    """``{"error": {"message", "type", "code"}}``, as OpenAI-compatible clients read errors."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code}}


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, without NUL: what the gateway reflects of its input (or
    an upstream's) stays small, and can be stored (PostgreSQL's text holds no NUL)."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class GatewayError(Exception):
    status = 500
    code = "internal"
    retry_after: int | None = None  # seconds, for outages (sent as Retry-After)
    attempts: tuple[Any, ...] = ()  # every upstream tried before the call ended so (upstream.attempts.Attempt)
    challenge: Any = None  # a 402's fresh quote: {"headers", "body"}, attached by the pipeline

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None):
        message = truncate(message, MAX_MESSAGE)
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """OpenAI-style error body, so OpenAI SDKs surface the message."""
        return error_body(self.status, self.message, self.code)


class BadRequest(GatewayError):
    status = 400
    code = "invalid_request"


class TooLarge(BadRequest):
    status = 413
    code = "body_too_large"


class PaymentMalformed(BadRequest):
    """The payment header could not be decoded or has the wrong shape."""

    code = "invalid_payload"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    code = "conflict"


class PaymentRequired(GatewayError):
    """402: the call needs (another) payment. ``challenge`` is filled in by the pipeline."""

    status = 402
    code = "payment_required"
    debt: int = 0  # what the payer owes from a failed settlement (the next 402 asks for it too)
    # scheme → what its fresh offer adds (a channel's state, for the client to resynchronise)
    offer_extra: Mapping[str, dict[str, Any]] = MappingProxyType({})
    bare_error: bool = False  # the 402's ``error`` is the code alone (a client compares it whole)


class PaymentInvalid(PaymentRequired):
    """A proof was decoded but does not pay for this call; ``code`` is the reason."""

    code = "invalid_payment"


class PreconditionFailed(PaymentInvalid):
    """412: a payment that could pay once the payer does something first (the x402 upto spec's
    ``permit2_allowance_required``: approve Permit2)."""

    status = 412


class TooManyRequests(GatewayError):
    status = 429
    code = "too_many_requests"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"
    asked_to_wait: int | None = None  # seconds the upstream asked to be left alone (its own Retry-After)


class UpstreamRefused(UpstreamError):
    """The upstream refused this request (a 403: OpenRouter's moderation flagged it): another
    upstream may take it, and it says nothing of the upstream's health."""

    status = 403
    code = "upstream_refused"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"
    retry_after = 1


class UpstreamDown(UpstreamUnavailable):
    """The upstream did not answer at all (refused, unreachable, timed out): it is down, not busy."""


class UpstreamUnreachable(UpstreamDown):
    """No connection could be made to the upstream: no request's content had anything to do with it."""


class ClientGone(GatewayError):
    """The client hung up before it could be answered (before its request was read, or before the
    next upstream was asked): no answer reaches it, and it is no fault of ours (the status is
    nginx's for it, kept in the call log and metrics)."""

    status = 499
    code = "client_closed_request"


class NotConfigured(GatewayError):
    status = 503
    code = "not_configured"


class ChainUnavailable(GatewayError):
    status = 503
    code = "chain_unavailable"
    retry_after = 2


class LedgerUnavailable(GatewayError):
    """The database dropped the connection (a restart, a fail-over, an idle timeout): the next
    statement opens another."""

    status = 503
    code = "ledger_unavailable"
    retry_after = 2
