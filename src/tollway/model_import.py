"""Models and prices imported from an OpenRouter-style catalogue (the JSON of ``GET
/api/v1/models``), so that an operator need not price hundreds of models by hand.

An upstream with ``catalogue`` (a URL, or the path of a saved copy for a machine offline) offers
what the catalogue lists — every model (``import_all``) or those in its ``models`` — at the
catalogue's prices plus its ``markup``. A model priced in ``[models]`` keeps that price. The
gateway reads each catalogue as it starts and every ``catalogue_refresh_seconds``; a catalogue that
cannot be read keeps what was imported before.

From each entry: ``pricing`` (``prompt``, ``completion``, ``request``, ``input_cache_read``,
``input_cache_write``, ``internal_reasoning`` — reasoning tokens are counted as completion tokens,
so the dearer of the two prices them — and ``image``, per image: an image part is priced as that
many prompt tokens), ``top_provider.max_completion_tokens`` (the model's output cap), ``name``,
``context_length`` and ``supported_parameters``. A model whose long prompts cost more
(``pricing.overrides``: a tier's prices from its ``min_prompt_tokens`` on) keeps its tiers
(``ModelPrice.tiers``): a call is quoted at its prompt bound's tier and charged at its prompt's.
Entries the gateway cannot price are left out: a negative price (OpenRouter's ``-1``: priced by
the router per call), a missing or malformed one, one out of any real model's range, an override
it cannot read, or a price it does not know (``PRICED``, ``NEVER_INCURRED``) that is not 0 — and
an id that is not a plain model id (``MODEL_ID``): a catalogue's ids go into the gateway's own
pages, ``/llms.txt`` that agents read, the rankings' CSV and its logs, where a newline, a Markdown
link or a leading ``=`` would be the catalogue's words, not the gateway's.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from .bounded import read_bounded
from .config import ModelPrice, PriceTier, Settings, UpstreamSettings, upstream_list
from .jsonbytes import loads

log = logging.getLogger("tollway.catalogue")

MAX_CATALOGUE_BYTES = 64 * 1024 * 1024
# Letters, digits and . _ ~ / first, then : @ + - too, at most 256: every id OpenRouter, OpenAI,
# llama.cpp or Ollama lists (``vendor/model:variant``, ``ft:gpt-4o:org::id``, ``llama3:8b``).
MODEL_ID = re.compile(r"[A-Za-z0-9._~/][A-Za-z0-9._~/:@+-]{0,255}\Z")
FETCH_TIMEOUT = 30.0


class CatalogueError(Exception):
    pass


# What any real model costs lies within these, in USD per token (per image, per call): a price
# beyond them ("1e5000", "1e-100000000") would make integers too long to print and fractions too
# large to reckon with (``pricing.Prices``).
MAX_PRICE = Decimal(10**6)
MIN_PRICE = Decimal("1e-18")

# The ``pricing`` keys read into a price, and those no call through tollway incurs: it refuses web
# search, plugins and audio in or out (``chat.UNPRICED_FIELDS``, parts other than text and images).
# Any other key that is not 0 — ``image_output`` (tollway prices text output only), ``image_token``,
# ``discount`` — leaves its entry out: calls could cost more than they are charged.
PRICED = (
    "prompt",
    "completion",
    "request",
    "image",
    "internal_reasoning",
    "input_cache_read",
    "input_cache_write",
    "input_cache_write_1h",
)
NEVER_INCURRED = ("web_search", "audio", "audio_output", "input_audio_cache")


def _price(pricing: dict[str, Any], key: str) -> Decimal | None:
    value = pricing.get(key)
    if value is None:
        return None
    try:
        price = Decimal(str(value)) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
    except InvalidOperation:
        price = None
    if price is None or not price.is_finite():
        raise ValueError(f"{key} is not a price")
    if price and not MIN_PRICE <= price.copy_abs() <= MAX_PRICE:  # (copy_abs: exact, whatever the exponent)
        raise ValueError(f"{key} is out of range")
    return price


def _overrides(pricing: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Each long-context tier's threshold and what it prices otherwise than the base."""
    overrides = pricing.get("overrides") or []
    if not isinstance(overrides, list):
        raise ValueError("overrides is not a list")
    tiers = []
    for override in overrides:
        threshold = override.get("min_prompt_tokens")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError("an override without its min_prompt_tokens")
        tiers.append((threshold, {k: v for k, v in override.items() if k != "min_prompt_tokens"}))
    return sorted(tiers, key=lambda t: t[0])


@dataclass(frozen=True)
class _Prices:
    """A tier's prices, in USD (the cache ones None where it names none: those bill at the prompt's)."""

    prompt: Decimal
    completion: Decimal  # (reasoning tokens included)
    request: Decimal
    image: Decimal
    cache_read: Decimal | None
    cache_write: Decimal | None
    cache_write_1h: Decimal | None  # (Anthropic's one-hour cache writes)


def _tier_prices(tier: dict[str, Any]) -> _Prices:
    """A tier's prices; ValueError if it cannot be priced."""
    for key in tier:
        if key not in PRICED and key not in NEVER_INCURRED and _price(tier, key):
            raise ValueError(f"{key} is not priced here")
    prompt, completion = _price(tier, "prompt"), _price(tier, "completion")
    if prompt is None or completion is None:
        raise ValueError("no prompt or completion price")
    reasoning = _price(tier, "internal_reasoning")
    prices = _Prices(
        prompt=prompt,
        completion=completion if reasoning is None else max(completion, reasoning),
        request=_price(tier, "request") or Decimal(0),
        image=_price(tier, "image") or Decimal(0),
        cache_read=_price(tier, "input_cache_read"),
        cache_write=_price(tier, "input_cache_write"),
        cache_write_1h=_price(tier, "input_cache_write_1h"),
    )
    if any(p is not None and p < 0 for p in vars(prices).values()):
        raise ValueError("priced by the router as it routes")  # (OpenRouter's -1)
    return prices


def _times(price: Decimal | None, factor: Decimal) -> Decimal | None:
    return None if price is None else price * factor


def model_price(entry: Any, markup: Decimal, image_token_allowance: int) -> ModelPrice | None:
    """One catalogue entry as tollway prices it, or None if it cannot be priced."""
    try:
        base = {k: v for k, v in entry["pricing"].items() if k != "overrides"}
        p = _tier_prices(base)
        # (an override prices what it names; the rest is the base's — cache prices aside: PriceTier)
        overrides = [(n, named, _tier_prices({**base, **named})) for n, named in _overrides(entry["pricing"])]
        every = [p, *(t for _, _, t in overrides)]
        factor = 1 + markup
        top = entry.get("top_provider") or {}
        image_tokens = None
        images = [t for t in every if t.image > 0]
        if any(t.prompt == 0 for t in images):
            return None  # (an image price with free prompt tokens: nothing to price it by)
        if images:  # (in prompt tokens: as many as every tier's image price takes)
            image_tokens = max(image_token_allowance, *(math.ceil(t.image / t.prompt) for t in images))
        tiers = [
            PriceTier(
                min_prompt_tokens=n,
                prompt=t.prompt * factor,
                completion=t.completion * factor,
                request=t.request * factor,
                cache_read=_times(_price(named, "input_cache_read"), factor),
                cache_write=_times(_price(named, "input_cache_write"), factor),
                cache_write_1h=_times(_price(named, "input_cache_write_1h"), factor),
            )
            for n, named, t in overrides
        ]
        params = entry.get("supported_parameters")
        return ModelPrice(
            prompt=p.prompt * factor,
            completion=p.completion * factor,
            request=p.request * factor,
            cache_read=_times(p.cache_read, factor),
            cache_write=_times(p.cache_write, factor),
            cache_write_1h=_times(p.cache_write_1h, factor),
            tiers=tiers,
            max_tokens=top.get("max_completion_tokens") or None,
            image_tokens=image_tokens,
            name=entry.get("name") if isinstance(entry.get("name"), str) else None,
            context_length=entry.get("context_length") or None,
            supported_parameters=params if isinstance(params, list) else None,
            # (nothing to pay: served as the free tier serves, within its quotas — not as a paid model
            # whose quote of 0 holds nothing, which any signed-in wallet could call without end)
            free=all(t.prompt == t.completion == t.request == t.image == 0 for t in every),
        )
    except (KeyError, TypeError, AttributeError, ValueError, ValidationError):
        return None


def models_of(doc: Any, u: UpstreamSettings, image_token_allowance: int) -> dict[str, ModelPrice]:
    """The models an upstream's catalogue document offers, priced."""
    entries = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise CatalogueError("not a catalogue: no 'data' list")
    wanted = None if u.import_all else set(u.models)
    out: dict[str, ModelPrice] = {}
    skipped = 0
    for entry in entries:
        model_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(model_id, str) or not model_id or (wanted is not None and model_id not in wanted):
            continue
        price = model_price(entry, u.markup, image_token_allowance) if MODEL_ID.match(model_id) else None
        if price is None:
            skipped += 1
        else:
            out[model_id] = price
    if skipped:
        log.info(
            "catalogue of upstream %s: %d models left out (no price tollway can charge, or an odd id)", u.name, skipped
        )
    return out


async def read(source: str, http: httpx.AsyncClient) -> Any:
    """A catalogue document from a URL or a file."""
    try:
        if source.startswith(("http://", "https://")):
            async with http.stream("GET", source, timeout=FETCH_TIMEOUT) as r:
                if r.status_code != 200:
                    raise CatalogueError(f"GET {source} answered {r.status_code}")
                body = await read_bounded(
                    r.aiter_bytes(),
                    MAX_CATALOGUE_BYTES,
                    lambda: CatalogueError(f"{source} is larger than {MAX_CATALOGUE_BYTES} bytes"),
                )
            return loads(body)
        return loads(Path(source).read_bytes())
    # (RecursionError: nested too deep — parsed under Python's default limit, not the eth
    # libraries' 100,000, at which the C parser would overflow the stack and crash the process)
    except (OSError, ValueError, RecursionError, httpx.HTTPError) as exc:
        raise CatalogueError(f"{source}: {type(exc).__name__}: {exc}") from exc


async def _import(
    settings: Settings, http: httpx.AsyncClient, before: dict[str, dict[str, ModelPrice]]
) -> tuple[dict[str, frozenset[str]], dict[str, dict[str, ModelPrice]]]:
    served: dict[str, frozenset[str]] = {}
    priced: dict[str, dict[str, ModelPrice]] = {}
    for u in upstream_list(settings):
        if not u.catalogue:
            continue
        try:
            models = models_of(await read(u.catalogue, http), u, settings.image_token_allowance)
        except CatalogueError as exc:
            models = before.get(u.name, {})
            log.warning("catalogue of upstream %s not read (%s); keeping %d models", u.name, exc, len(models))
        priced[u.name] = models
        served[u.name] = frozenset(models)
    return served, priced


class Catalogues:
    """The imported models of every upstream with a catalogue, and the models they make with the
    configured ones: those first, then the imported (the first upstream's price where two import one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # as configured
        self.priced: dict[str, dict[str, ModelPrice]] = {}
        self.served: dict[str, frozenset[str]] = {}  # by upstream name

    @property
    def wanted(self) -> bool:
        return any(u.catalogue for u in upstream_list(self.settings))

    async def load(self, http: httpx.AsyncClient) -> dict[str, ModelPrice]:
        """Read every catalogue (again); the models on offer."""
        self.served, self.priced = await _import(self.settings, http, self.priced)
        models: dict[str, ModelPrice] = {}
        for by_upstream in reversed(list(self.priced.values())):
            models.update(by_upstream)
        return {**models, **self.settings.models}
