"""A generation request (a chat completion; Messages and Responses: ``dialects.py``) as the gateway
sees it: parsed once, bounded, priced, and what to forward.

The quote bounds the call: what goes upstream is exactly what was priced.

- The body is parsed once, strictly (duplicate keys, ``NaN``/``Infinity`` and numbers that overflow
  to infinity are refused), and re-serialised from that parse: no upstream can read a field the
  price did not. Re-serialising keeps every string and the order of keys and messages, so prompt
  caches upstream keep hitting.
- Every output-cap field the request carries is lowered to the priced cap; when it carries none,
  the upstream's own cap field is added (``UpstreamSettings.max_tokens_field``).
- ``n``/``best_of`` multiply the priced output; a ``models`` fallback list is quoted at its dearest
  member; fields whose cost cannot be bounded here (server tools, audio or video, priority tiers,
  predicted outputs, one-hour cache writes without a price) are refused with a 400 that names them.
- ``stream_options.include_usage`` is set on streams: usage is how a call is metered.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from .cache import Prefixes, prefixes_of
from .config import ModelPrice, Settings
from .errors import BadRequest, NotFound
from .jsonbytes import dumps, python_recursion_limit
from .payments.base import Quote
from .pricing import CAP_FIELDS, MAX_AMOUNT, Prices, asked_cap, prompt_token_bound
from .quotes import request_digest
from .routing import NONE as NO_PREFERENCES
from .routing import Preferences, over_max_price, preferences, split_variant, unsupported, upstream_max_price

IMAGE_PARTS = ("image_url", "input_image", "image")
PRICED_PARTS = ("text", "input_text", "refusal", *IMAGE_PARTS)
ALLOWED_TIERS = ("auto", "default", "flex")  # priority and scale tiers cost more than the list price
UNPRICED_FIELDS = {
    "plugins": "plugins (web search, file parsing) are billed by the upstream per call",
    "web_search_options": "web search is billed by the upstream per call",
    "prediction": "predicted outputs bill rejected prediction tokens beyond the output cap",
    "audio": "audio output is not priced here",
}


@dataclass(frozen=True)
class Api:
    """What sets a generation API apart (chat; Messages and Responses in ``dialects.py``): where
    its prompt is, what it refuses, the output-cap field it is served with."""

    surface: str  # its name (an upstream's ``surfaces``)
    path: str  # the gateway's path, which its quotes are bound to (but for chat's)
    prompt: Callable[[dict[str, Any]], list[Any]]  # the prompt's items (messages), in order; validates them
    refuse: Callable[[dict[str, Any], list[Any]], None]  # refuses what the quote cannot bound
    cap_field: str | None = None  # the cap field added when the request sets none (None: the upstream's)
    prompt_allowance: Callable[[dict[str, Any]], int] = lambda body: 0  # tokens the provider adds unseen


@dataclass(frozen=True)
class ChatCall:
    """A request — a generation (chat, Messages, Responses), or an embeddings request
    (``surface``) — parsed and bounded. Its price depends on the output cap it is served with: a
    cap the request sets itself, else ``default_cap`` for schemes that pay the bound (``exact``)
    and ``metered_cap`` for those that pay the metered cost (``upto``, credit) — so
    ``quote(cap)`` prices it, and
    ``forward(cap_field, cap)`` is the body an upstream gets with that cap."""

    body: dict[str, Any]  # as forwarded, but for the cap field an upstream may need added
    model: str
    upstream_model: str
    stream: bool
    prices: Prices
    digest: str  # of the request as the client sent it
    prompt_bound: int
    choices: int  # completions generated (n / best_of)
    asked_cap: int | None  # the output cap the request sets itself, if any (lowered in ``body``)
    default_cap: int
    metered_cap: int
    expires: int  # when its quotes expire
    origin: str  # the gateway's (tollway's messages name it)
    long_cache: bool = False  # the request asks for one-hour cache writes
    wants_usage: bool = True  # a stream's client asked for the usage chunk (tollway always asks for it)
    received: float = 0.0  # UNIX time the request arrived
    route: Preferences = NO_PREFERENCES  # the routing it asks for (``provider``, ``:nitro``/``:floor``)
    # What an upstream that routes between providers itself (OpenRouter) may charge: provider.max_price
    upstream_max_price: dict[str, float] = field(default_factory=dict)
    # The models to fall back to, in order (OpenRouter's `models`): this request as each serves it.
    # The quote covers the dearest of them all; the call is billed at the model that served it.
    fallbacks: tuple[ChatCall, ...] = ()
    surface: str = "chat"  # the API: "chat", "messages", "responses" (generations), "embeddings" (no output)
    cap_field: str | None = None  # the output-cap field the API reads (None: the upstream's, for chat)
    prompt: list[Any] = field(default_factory=list, compare=False, repr=False)  # its prompt's items (Api.prompt)
    _memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def cap(self, metered: bool) -> int:
        """The output cap a payment of this kind is priced and served with."""
        return self.asked_cap or (self.metered_cap if metered else self.default_cap)

    @property
    def members(self) -> tuple[ChatCall, ...]:
        """This request as each model that may serve it serves it, in the order they are tried."""
        return (self, *self.fallbacks)

    def at(self, now: float, quote_ttl: int) -> ChatCall:
        """This request as parsing it at ``now`` makes it (``priced.py``): received then, its
        quotes expiring ``quote_ttl`` later, nothing worked out of it yet."""
        fallbacks = tuple(f.at(now, quote_ttl) for f in self.fallbacks)
        return replace(self, received=now, expires=int(now) + quote_ttl, fallbacks=fallbacks, _memo={})

    def member(self, model: str) -> ChatCall:
        return next(m for m in self.members if m.model == model)

    def prefixes(self) -> Prefixes:
        """Its prompt's message prefixes, hashed (``cache.py``), once."""
        found = self._memo.get("prefixes")
        if found is None:
            found = self._memo["prefixes"] = prefixes_of(self.model, self.prompt)
        return found  # type: ignore[no-any-return]

    def quote(self, cap: int | None = None) -> Quote:
        """The price of this request served with output ``cap`` (default: the bound-paying one), by
        the dearest model that may serve it."""
        cap = cap or self.cap(metered=False)
        found = self._memo.get(cap)
        if found is None:
            output = cap * self.choices
            amount = max(
                *(m.prices.bound(self.prompt_bound, output, long_cache=self.long_cache) for m in self.members), 1
            )
            if amount > MAX_AMOUNT:
                raise BadRequest("this request could cost more than can be paid in one call", code="quote_too_large")
            found = self._memo[cap] = Quote(
                self.model, amount, self.digest, self.expires, self.prompt_bound, cap, self.choices, self.origin
            )
        return found  # type: ignore[no-any-return]

    def forward(
        self, cap_field: str, cap: int, routes_providers: bool = False, own_price: dict[str, Decimal] | None = None
    ) -> bytes:
        """The bytes to send to an upstream whose output-cap field is ``cap_field``, served with
        ``cap``. An upstream that ``routes_providers`` (OpenRouter) gets the ``provider`` object,
        with ``max_price`` at most tollway's prices (its ``own_price`` for the model, if it has
        one); any other gets none (a vendor's API may refuse a field it does not know)."""
        cap_field = self.cap_field or cap_field
        most = self.upstream_max_price if own_price is None or not routes_providers else upstream_max_price(own_price)
        key = ("body", cap_field, cap, routes_providers, tuple(most.values()))
        out = self._memo.get(key)
        if out is None:
            # The cap paid for goes in the upstream's own cap field, and in no other: a field it
            # ignores (llama.cpp's n_predict on a vendor's API) would leave its own default to bound
            # what it generates and bills, and a vendor may refuse two (max_tokens with
            # max_completion_tokens). (Embeddings have no output; a cap below the one asked for is a
            # free call's: see free_tier.py.)
            body = self.body
            others = [f for f in CAP_FIELDS if f in body and f != cap_field]
            if self.surface != "embeddings" and (others or body.get(cap_field) != cap):
                body = {k: v for k, v in body.items() if k not in others} | {cap_field: cap}
            if routes_providers:
                provider = {**(body.get("provider") or {}), "max_price": most}
                if self.route.sort and "sort" not in provider:  # (a :nitro / :floor variant)
                    provider["sort"] = self.route.sort
                body = {**body, "provider": provider}
            elif "provider" in body:
                body = {k: v for k, v in body.items() if k != "provider"}
            out = self._memo[key] = encode(body)
        return out  # type: ignore[no-any-return]


def encode(body: dict[str, Any]) -> bytes:
    return dumps(body)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise BadRequest(f"duplicate key {json.dumps(dup)[:80]} in the request body", code="duplicate_key")
    return doc


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest("numbers must be finite", code="invalid_number")
    return value


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not JSON", code="invalid_number")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, finite numbers, bounded nesting."""
    try:
        with python_recursion_limit():
            return json.loads(raw, object_pairs_hook=_no_duplicates, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest("request body is not valid JSON (UTF-8)", code="invalid_json") from exc


def _members(
    ids: list[str],
    settings: Settings,
    prices: dict[str, Prices],
    shared: dict[str, Any],
    sent_as: dict[str, str],
    most: dict[str, dict[str, float]],
    now: float | None,
    **fields: Any,
) -> ChatCall:
    """The request as each of the models ``ids`` serves it — ``shared`` with the model's upstream
    id, at its prices — the first with the others as its fallbacks (a ``models`` list); its quotes
    expire ``quote_ttl_seconds`` after ``now``."""
    now = time.time() if now is None else now

    def member(m: str, **more: Any) -> ChatCall:
        return ChatCall(
            body={**shared, "model": sent_as[m]},
            model=m,
            upstream_model=sent_as[m],
            prices=prices[m],
            expires=int(now) + settings.quote_ttl_seconds,
            received=now,
            upstream_max_price=most[m],
            **fields,
            **more,
        )

    return member(ids[0], fallbacks=tuple(member(m) for m in ids[1:]))


def read_request(raw: bytes, byok: bool, api: str | None = None) -> tuple[dict[str, Any], str]:
    """The request body (a JSON object) and its digest — what its quote, sign-in and idempotency
    key are bound to. The digest names the ``api`` (but for chat: a quote for an embedding pays
    no chat call with the same body) and whether the call brings its own provider key (priced
    apart: its quote pays no plain call)."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    try:
        with python_recursion_limit():  # (encoding it also refuses lone surrogates such as \ud800)
            digest = request_digest(body if api is None else {api: body})
    except (ValueError, RecursionError) as exc:
        raise BadRequest("request body is not valid JSON (UTF-8)", code="invalid_json") from exc
    return body, request_digest({"x-provider-key": digest}) if byok else digest


def chat_messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", code="invalid_messages")
    return messages


def parse_chat(raw: bytes, settings: Settings, prices: dict[str, Prices], **kw: Any) -> ChatCall:
    return parse_generation(CHAT, raw, settings, prices, **kw)


def parse_generation(
    api: Api,
    raw: bytes,
    settings: Settings,
    prices: dict[str, Prices],
    *,
    origin: str = "",
    now: float | None = None,
    byok: bool = False,
) -> ChatCall:
    """A request of a generation ``api``, parsed and priced at ``prices`` (the BYOK fee's, for a
    call that brings its own provider key: ``byok``)."""
    body, digest = read_request(raw, byok, api=None if api is CHAT else api.path)
    items = api.prompt(body)
    ids, variant = _models(body, prices)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", code="invalid_stream")

    api.refuse(body, items)
    route = preferences(body, variant, surface=api.surface, byok=byok)
    ids = _within_max_price(ids, settings, route)
    if route.require_parameters:
        ids = _supporting(ids, body, settings)
    confs = {m: settings.models[m] for m in ids}
    long_cache = _long_cache(body, items)
    for m in ids:
        if long_cache and prices[m].cache_write_1h is None:
            raise BadRequest(
                f'cache_control ttl "1h" is not priced for {json.dumps(m)[:80]} (use the default 5-minute cache)',
                code="unpriced_parameter",
            )
    choices = _choices(body, settings.max_choices)
    asked = None
    for m in ids:
        asked = asked_cap(body, confs[m].max_tokens)  # (within every model's own cap)
    model_caps = [c.max_tokens for c in confs.values() if c.max_tokens]
    default_cap = min([settings.default_max_tokens, *model_caps])
    metered_cap = min([settings.metered_max_tokens, *model_caps])

    shared = {k: v for k, v in body.items() if k != "models"}  # (tollway falls back itself)
    for f in CAP_FIELDS:
        if f in shared:
            shared[f] = asked
    opts = body.get("stream_options")
    wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    if stream and not wants_usage and api is CHAT:  # (the other APIs always report a stream's usage)
        shared["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}

    # Priced on the largest body any upstream may get: the longest cap field, with the largest cap,
    # and the provider object an OpenRouter upstream gets — for the model whose body is longest.
    sent_as = {m: confs[m].upstream_model or m for m in ids}
    most = {m: upstream_max_price(confs[m].per_token()) for m in ids}
    bounds = []
    for m in ids:
        widest = {**shared, "model": sent_as[m]}
        widest["max_completion_tokens"] = asked or max(default_cap, metered_cap)  # (an upstream's own cap field)
        widest["provider"] = {
            **(body.get("provider") or {}),
            "max_price": longest_max_price(settings, m, most[m]),
            "sort": "throughput",
        }
        image_tokens = settings.image_token_allowance if confs[m].image_tokens is None else confs[m].image_tokens
        bounds.append(prompt_token_bound(encode(widest), _images(items), image_tokens) + api.prompt_allowance(body))
    _tiers_within_max_price(confs, route, max(bounds))
    call = _members(
        ids,
        settings,
        prices,
        shared,
        sent_as,
        most,
        now,
        stream=stream,
        digest=digest,
        prompt_bound=max(bounds),
        choices=choices,
        asked_cap=asked,
        default_cap=default_cap,
        metered_cap=metered_cap,
        origin=origin,
        long_cache=long_cache,
        wants_usage=wants_usage,
        route=route,
        surface=api.surface,
        cap_field=api.cap_field,
        prompt=items,
    )
    call.quote(call.cap(metered=True))  # refuses a request too large to pay, whatever the scheme
    return call


def own_prices(settings: Settings, model: str) -> list[dict[str, Decimal]]:
    """The prices (per token) upstreams serve ``model`` at where they price it themselves."""
    return [u.prices[model].per_token() for u in settings.upstreams or [settings.upstream] if model in u.prices]


def longest_max_price(settings: Settings, model: str, most: dict[str, float]) -> dict[str, float]:
    """Of the ``provider.max_price`` objects an upstream may get for ``model`` (``most``, or an
    upstream's own prices), the longest: the prompt bound counts its bytes."""
    found = [most, *(upstream_max_price(p) for p in own_prices(settings, model))]
    return max(found, key=lambda d: len(encode(d))) if len(found) > 1 else most


def _supporting(ids: list[str], body: dict[str, Any], settings: Settings) -> list[str]:
    """``provider.require_parameters``: the models known to support every parameter the request
    sets (a model whose ``supported_parameters`` are unknown is not ruled out); a 400 if none is."""
    missing = {m: unsupported(body, settings.models[m].supported_parameters) for m in ids}
    kept = [m for m in ids if not missing[m]]
    if not kept:
        raise BadRequest(
            f"'provider.require_parameters': {ids[0]!r} here does not support {', '.join(missing[ids[0]])}",
            code="no_route",
        )
    return kept


def _tiers_within_max_price(confs: dict[str, ModelPrice], route: Preferences, prompt_bound: int) -> None:
    """A prompt as long as ``prompt_bound`` may reach a model's long-context tier, and be charged at it:
    a 400 if that tier is priced above the payer's ``provider.max_price``."""
    if not route.max_price:
        return
    for m, conf in confs.items():
        reached = conf.tiers and prompt_bound >= conf.tiers[0].min_prompt_tokens
        field_ = over_max_price(route, conf.tier_at(prompt_bound)) if reached else None
        if field_ is not None:
            raise BadRequest(
                f"a prompt this long is priced at {json.dumps(m)[:80]}'s long-context tier, whose {field_} price is"
                f" above 'provider.max_price.{field_}'",
                code="no_route",
            )


def _within_max_price(ids: list[str], settings: Settings, route: Preferences) -> list[str]:
    """The models not priced above the payer's ``provider.max_price`` at every upstream (they are
    not tried; the router leaves out the upstreams above it); a 400 if none is left."""
    dear = {m: over_max_price(route, settings.models[m].per_token()) for m in ids}
    for m in ids:
        if dear[m] is not None and any(over_max_price(route, p) is None for p in own_prices(settings, m)):
            dear[m] = None
    kept = [m for m in ids if dear[m] is None]
    if not kept:
        field_ = next(iter(dear.values()))
        raise BadRequest(
            f"this model's {field_} price here is above 'provider.max_price.{field_}' (USD per million tokens"
            f"{', per call' if field_ == 'request' else ''}); see GET /v1/models",
            code="no_route",
        )
    return kept


MAX_MODELS = 8  # in a `models` fallback list


def _models(body: dict[str, Any], prices: dict[str, Prices]) -> tuple[list[str], str | None]:
    """The models that may serve the request, in order — ``model``, then the ``models`` fallback
    list (OpenRouter's; without ``model`` its first is the model) — and the first's variant
    (``:nitro``, ``:floor``). Each must be offered here."""
    listed = body.get("models")
    if listed is not None and (
        not isinstance(listed, list)
        or not 1 <= len(listed) <= MAX_MODELS
        or not all(isinstance(m, str) and m for m in listed)
    ):
        raise BadRequest(f"'models' must be a list of 1 to {MAX_MODELS} model ids", code="invalid_models")
    model = body.get("model", listed[0] if listed else None)
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required", code="missing_model")
    model, variant = split_variant(model, prices)
    ids = list(dict.fromkeys([model, *(listed or [])]))
    for m in ids:
        if m not in prices:
            raise NotFound(
                f"model {json.dumps(m)[:80]} is not offered here; see GET /v1/models", code="model_not_found"
            )
    return ids, variant


def refuse_fields(body: dict[str, Any], unpriced: dict[str, str]) -> None:
    """Refuse each field of ``unpriced`` (name → why) the request sets."""
    for name, why in unpriced.items():
        if body.get(name) is not None:
            raise BadRequest(f"'{name}' is not accepted here: {why}", code="unpriced_parameter")


def refuse_tier(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    refuse_choice(body, "service_tier", allowed, "other tiers cost more than the list price")


def refuse_choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], why: str) -> None:
    """Refuse a field the request sets to another value than those ``allowed`` (the list price's)."""
    value = body.get(name)
    if value is not None and value not in allowed:
        raise BadRequest(f"'{name}' may be one of {', '.join(allowed)}: {why}", code="unpriced_parameter")


def refuse_tools(body: dict[str, Any], allowed: tuple[str | None, ...], kind: str) -> None:
    """Refuse tools other than those the client runs itself (``allowed`` types): a server-side
    tool is billed by the upstream per use."""
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", code="invalid_tools")
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") not in allowed:
            found = tool.get("type") if isinstance(tool, dict) else None
            raise BadRequest(
                f"only {kind} tools are accepted here, not {json.dumps(found)[:40]}: "
                "server-side tools are billed by the upstream per use",
                code="unpriced_parameter",
            )


def refuse_parts(items: list[Any], priced: tuple[str, ...]) -> None:
    """Refuse content of a type not in ``priced`` anywhere in the prompt (a content part, or one
    inside a tool result)."""
    for part in _parts(items):
        if part.get("type") not in priced:
            raise BadRequest(
                f"content of type {json.dumps(part.get('type'))[:40]} is not priced here "
                f"(accepted: {', '.join(p for p in priced if p)})",
                code="unpriced_parameter",
            )


def _parts(items: list[Any]) -> Iterator[dict[str, Any]]:
    """The content parts of a prompt's items (a message's content, a Responses tool output), with
    those nested one level deeper (an Anthropic tool result's)."""
    for item in items:
        if not isinstance(item, dict):
            continue
        for key in ("content", "output"):
            content = item.get(key)
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict):
                    yield part
                    inner = part.get("content")
                    yield from (p for p in (inner if isinstance(inner, list) else ()) if isinstance(p, dict))


def refuse_unpriced(body: dict[str, Any], messages: list[Any]) -> None:
    """Refuse what could cost more than the quote bounds (see the module docstring)."""
    refuse_fields(body, UNPRICED_FIELDS)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise BadRequest("only text output is priced here ('modalities': ['text'])", code="unpriced_parameter")
    refuse_tier(body, ALLOWED_TIERS)
    refuse_tools(body, ("function",), "function")
    refuse_parts(messages, PRICED_PARTS)


# A request with tools: the provider adds a tool-use system prompt the body does not show (an
# Anthropic model's, through any API, is ~350 tokens: docs, 2025). Its quote allows this much more.
TOOL_PROMPT_TOKENS = 1000


def tool_prompt(body: dict[str, Any]) -> int:
    return TOOL_PROMPT_TOKENS if body.get("tools") or body.get("functions") else 0  # (functions: the old name)


CHAT = Api("chat", "/v1/chat/completions", chat_messages, refuse_unpriced, prompt_allowance=tool_prompt)


def _images(items: list[Any]) -> int:
    return sum(1 for part in _parts(items) if part.get("type") in IMAGE_PARTS)


def _choices(body: dict[str, Any], most: int) -> int:
    """How many completions the call generates: ``n`` (and ``best_of``, which servers generate
    in full and then pick from)."""
    count = 1
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadRequest(f"'{name}' must be a positive integer", code="invalid_request")
        if value > most:
            raise BadRequest(f"'{name}' may be at most {most} here", code="unpriced_parameter")
        count = max(count, value)
    return count


def _long_cache(body: dict[str, Any], items: list[Any]) -> bool:
    """Whether a ``cache_control`` mark (on the request, a message, a content part or a tool)
    asks for a one-hour TTL; TTLs other than "5m" and "1h" are refused."""
    tools = body.get("tools")
    holders = [body, *items, *(tools if isinstance(tools, list) else ())]
    marked = [h for h in holders if isinstance(h, dict)] + list(_parts(items))
    found = False
    for node in marked:
        mark = node.get("cache_control")
        if isinstance(mark, dict) and "ttl" in mark:
            if mark["ttl"] not in ("5m", "1h"):
                raise BadRequest('cache_control ttl must be "5m" or "1h"', code="unpriced_parameter")
            found = found or mark["ttl"] == "1h"
    return found


MAX_INPUTS = 2048  # strings (or token lists) in one embeddings request


def _embedding_input(value: Any) -> None:
    """OpenAI's ``input``: a string, a list of strings, or token ids (a list of integers, or a
    list of such lists); not empty."""
    ok = isinstance(value, str) and value != ""
    if isinstance(value, list) and 1 <= len(value) <= MAX_INPUTS:
        ok = (
            all(isinstance(v, str) and v for v in value)
            or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or all(
                isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
                for v in value
            )
        )
    if not ok:
        raise BadRequest(
            f"'input' must be a non-empty string, a list of 1 to {MAX_INPUTS} strings, or token ids (a list of"
            " integers, or of such lists)",
            code="invalid_input",
        )


def parse_embeddings(
    raw: bytes,
    settings: Settings,
    prices: dict[str, Prices],
    *,
    origin: str = "",
    now: float | None = None,
    byok: bool = False,
) -> ChatCall:
    """An embeddings request (OpenAI's ``POST /v1/embeddings``), parsed and priced like a chat
    request with no output: its input is bounded by the bytes of the body forwarded (a token is
    at least one byte of it, a token id at least one digit and a comma)."""
    body, digest = read_request(raw, byok, api="/v1/embeddings")
    ids, variant = _models(body, prices)
    _embedding_input(body.get("input"))
    route = preferences(body, variant, surface="embeddings", byok=byok)
    ids = _within_max_price(ids, settings, route)
    shared = {k: v for k, v in body.items() if k not in ("models", "stream")}  # (an embedding is never streamed)
    sent_as = {m: settings.models[m].upstream_model or m for m in ids}
    most = {m: upstream_max_price(settings.models[m].per_token()) for m in ids}
    provider = body.get("provider") or {}
    bound = max(
        len(
            encode(
                {
                    **shared,
                    "model": sent_as[m],
                    "provider": {**provider, "max_price": longest_max_price(settings, m, most[m])},
                }
            )
        )
        for m in ids
    )
    call = _members(
        ids,
        settings,
        prices,
        shared,
        sent_as,
        most,
        now,
        stream=False,
        digest=digest,
        prompt_bound=bound,
        choices=1,
        asked_cap=None,
        default_cap=0,
        metered_cap=0,
        origin=origin,
        route=route,
        surface="embeddings",
    )
    call.quote(0)  # refuses a request too large to pay
    return call
