"""A chat-completion request as the gateway sees it: parsed, priced, and what to forward.

The forwarded body is the client's bytes unchanged unless the gateway must set a field: the
output cap when the client set none, the upstream's model id, and ``stream_options.include_usage``
on streams (usage is how the call is metered). The prompt is never touched.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .errors import BadRequest, NotFound
from .payments.base import Quote
from .pricing import Prices, output_token_cap, prompt_token_bound
from .quotes import request_digest


@dataclass(frozen=True)
class ChatCall:
    body: dict[str, Any]
    model: str
    upstream_model: str
    stream: bool
    prices: Prices
    quote: Quote
    forward: bytes  # what goes upstream


@contextlib.contextmanager
def python_recursion_limit(limit: int = 1000) -> Iterator[None]:
    """Parse untrusted JSON under Python's default recursion limit. The eth libraries raise it
    to 100,000 at import, past what the C stack holds: deeply nested JSON would crash the process
    instead of raising RecursionError. (The event loop runs one request's parse at a time.)"""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(min(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def parse_chat(raw: bytes, settings: Settings, prices: dict[str, Prices], now: float | None = None) -> ChatCall:
    try:
        with python_recursion_limit():
            body = json.loads(raw)
            digest = request_digest(body)  # (encoding it also refuses lone surrogates such as \ud800)
    except (ValueError, RecursionError) as exc:
        raise BadRequest("request body is not valid JSON (UTF-8)", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required", code="missing_model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", code="invalid_messages")
    if model not in prices:
        raise NotFound(
            f"model {json.dumps(model)[:200]} is not offered here; see GET /v1/models", code="model_not_found"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", code="invalid_stream")

    conf = settings.models[model]
    max_tokens, must_set = output_token_cap(body, settings.default_max_tokens, conf.max_tokens)
    prompt_bound = prompt_token_bound(raw, body, settings.image_token_allowance)
    p = prices[model]
    amount = p.bound(prompt_bound, max_tokens)
    now = time.time() if now is None else now
    quote = Quote(
        model=model,
        amount=max(amount, 1),
        request_digest=digest,
        expires=int(now) + settings.quote_ttl_seconds,
        prompt_bound=prompt_bound,
        max_tokens=max_tokens,
    )

    upstream_model = conf.upstream_model or model
    changes: dict[str, Any] = {}
    if must_set:
        changes["max_tokens"] = max_tokens
    if upstream_model != model:
        changes["model"] = upstream_model
    opts = body.get("stream_options")
    if stream and not (isinstance(opts, dict) and opts.get("include_usage") is True):
        changes["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    forward = json.dumps({**body, **changes}, ensure_ascii=False).encode() if changes else raw
    return ChatCall(body, model, upstream_model, stream, p, quote, forward)
