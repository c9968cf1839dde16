"""What a request asks of routing, in OpenRouter's words: the ``provider`` object and the
``:nitro`` / ``:floor`` model variants.

tollway applies them to its own upstreams, by name (case-insensitive): ``only`` and ``ignore``
filter, ``order`` puts the named first (and, with ``allow_fallbacks: false``, only those),
``sort`` ranks by live stats (``latency``: time to first byte, ``throughput``: output tokens/s)
or ``price`` (what the request is expected to cost on each upstream, at its own prices and
expected cache: the default ranking too, without stickiness); ``max_price`` leaves out an upstream
whose price for the model is above it. Names tollway does not
know are left to an upstream that routes between providers itself (OpenRouter), which gets the
``provider`` object as sent — with ``max_price`` set to the prices tollway charges, so it cannot
pick an endpoint dearer than what the payer pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import BadRequest
from .pricing import per_million

SORTS = ("price", "latency", "throughput")
VARIANTS = {":nitro": "throughput", ":floor": "price"}
PRICE_FIELDS = ("prompt", "completion", "request")  # max_price: USD per million tokens; request: per call


@dataclass(frozen=True)
class Preferences:
    order: tuple[str, ...] = ()
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    allow_fallbacks: bool = True
    sort: str | None = None
    max_price: dict[str, Decimal] = field(default_factory=dict)
    require_parameters: bool = False  # only a model whose known supported_parameters cover the request's
    byok: bool = False  # the call brings its own provider key: only an upstream that takes one (``byok``)
    surface: str = "chat"  # the API the call is for: only an upstream that speaks it

    @property
    def explicit(self) -> bool:
        """The payer chose an order: it wins over a conversation's stickiness."""
        return bool(self.order) or self.sort is not None


NONE = Preferences()


def _names(provider: dict[str, Any], key: str) -> tuple[str, ...]:
    value = provider.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or len(value) > 64:
        raise BadRequest(f"'provider.{key}' must be a list of provider names", code="invalid_provider")
    return tuple(v.lower() for v in value)


def _sort(value: Any) -> str | None:
    if isinstance(value, dict):  # OpenRouter's {"by": ..., "partition": ...}
        value = value.get("by")
    if value is None:
        return None
    if value not in SORTS:
        raise BadRequest(f"'provider.sort' must be one of {', '.join(SORTS)}", code="invalid_provider")
    return str(value)


def _max_price(value: Any) -> dict[str, Decimal]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("'provider.max_price' must be an object", code="invalid_provider")
    out = {}
    for key in PRICE_FIELDS:
        if key in value:
            v = value[key]
            try:
                price = Decimal(str(v)) if isinstance(v, int | float | str) and not isinstance(v, bool) else None
            except InvalidOperation:
                price = None
            if price is None or not price.is_finite() or price < 0:
                raise BadRequest(f"'provider.max_price.{key}' must be a number >= 0", code="invalid_provider")
            out[key] = price
    return out


def preferences(body: dict[str, Any], variant: str | None, surface: str = "chat", byok: bool = False) -> Preferences:
    """The routing a request of an API (``surface``) asks for (raises ``BadRequest`` on a malformed
    ``provider``); ``byok``: it brings its own provider key."""
    provider = body.get("provider")
    if provider is None:
        return Preferences(sort=VARIANTS[variant] if variant else None, surface=surface, byok=byok)
    if not isinstance(provider, dict):
        raise BadRequest("'provider' must be an object", code="invalid_provider")
    fallbacks, required = provider.get("allow_fallbacks", True), provider.get("require_parameters", False)
    for name, value in (("allow_fallbacks", fallbacks), ("require_parameters", required)):
        if not isinstance(value, bool):
            raise BadRequest(f"'provider.{name}' must be a boolean", code="invalid_provider")
    only = _names(provider, "only")
    return Preferences(
        order=_names(provider, "order"),
        only=frozenset(only) if "only" in provider and provider["only"] is not None else None,
        ignore=frozenset(_names(provider, "ignore")),
        allow_fallbacks=fallbacks,
        sort=_sort(provider.get("sort")) or (VARIANTS[variant] if variant else None),
        max_price=_max_price(provider.get("max_price")),
        require_parameters=required,
        surface=surface,
        byok=byok,
    )


# OpenRouter's names of request parameters (a model's ``supported_parameters`` lists those it takes)
PARAMETERS = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "top_a",
        "stop",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "reasoning",
        "include_reasoning",
        "verbosity",
    }
)


def unsupported(body: dict[str, Any], supported: list[str] | None) -> list[str]:
    """The request's parameters a model does not support (none when its list is unknown); a JSON
    schema response format needs ``structured_outputs``."""
    if supported is None:
        return []
    asked = {k for k in body if k in PARAMETERS}
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        asked.add("structured_outputs")
    if "max_completion_tokens" in asked and "max_tokens" in supported:
        asked.discard("max_completion_tokens")  # (the same cap, by its other name)
    return sorted(asked - set(supported))


def split_variant(model: str, offered: Any) -> tuple[str, str | None]:
    """``model`` without a ``:nitro`` / ``:floor`` suffix, and the suffix — when the model without
    it is ``offered`` and the model with it is not."""
    for suffix in VARIANTS:
        if model.endswith(suffix) and model not in offered and model[: -len(suffix)] in offered:
            return model[: -len(suffix)], suffix
    return model, None


def over_max_price(prefs: Preferences, per_token: dict[str, Decimal]) -> str | None:
    """The first price of the model above the payer's ``max_price``, if one is."""
    for key in PRICE_FIELDS:
        if key in prefs.max_price:
            ours = per_token[key] if key == "request" else per_million(per_token[key])
            if ours > prefs.max_price[key]:
                return key
    return None


def upstream_max_price(per_token: dict[str, Decimal]) -> dict[str, float]:
    """What an upstream that routes between providers may charge: tollway's own prices (USD per
    million tokens; request per call). A payer's lower ``max_price`` never gets this far: a model
    priced above it here is refused (``over_max_price``)."""
    return {k: float(per_token[k] if k == "request" else per_million(per_token[k])) for k in PRICE_FIELDS}
