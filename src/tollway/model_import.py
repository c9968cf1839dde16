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
``context_length`` and ``supported_parameters``. Entries the gateway cannot price are left out:
a negative price (OpenRouter's ``-1``: priced by the router per call), a missing or malformed one.
"""

from __future__ import annotations

import json
import logging
import math
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from .bounded import read_bounded
from .config import ModelPrice, Settings, UpstreamSettings, upstream_list

log = logging.getLogger("tollway.catalogue")

MAX_CATALOGUE_BYTES = 64 * 1024 * 1024
FETCH_TIMEOUT = 30.0


class CatalogueError(Exception):
    pass


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
    return price


def model_price(entry: Any, markup: Decimal, image_token_allowance: int) -> ModelPrice | None:
    """One catalogue entry as tollway prices it, or None if it cannot be priced."""
    try:
        pricing = entry["pricing"]
        prompt, completion = _price(pricing, "prompt"), _price(pricing, "completion")
        if prompt is None or completion is None:
            return None
        reasoning = _price(pricing, "internal_reasoning")
        if reasoning is not None:
            completion = max(completion, reasoning)
        request, image = _price(pricing, "request") or Decimal(0), _price(pricing, "image") or Decimal(0)
        cache_read, cache_write = _price(pricing, "input_cache_read"), _price(pricing, "input_cache_write")
        if min(p for p in (prompt, completion, request, image, cache_read, cache_write) if p is not None) < 0:
            return None  # (OpenRouter's -1: priced by the router as it routes)
        factor = 1 + markup
        top = entry.get("top_provider") or {}
        image_tokens = None
        if image > 0:
            per_prompt = math.ceil(image / prompt) if prompt > 0 else None
            if per_prompt is None:
                return None  # (an image price with free prompt tokens: nothing to price it by)
            image_tokens = max(per_prompt, image_token_allowance)
        params = entry.get("supported_parameters")
        return ModelPrice(
            prompt=prompt * factor,
            completion=completion * factor,
            request=request * factor,
            cache_read=None if cache_read is None else cache_read * factor,
            cache_write=None if cache_write is None else cache_write * factor,
            max_tokens=top.get("max_completion_tokens") or None,
            image_tokens=image_tokens,
            name=entry.get("name") if isinstance(entry.get("name"), str) else None,
            context_length=entry.get("context_length") or None,
            supported_parameters=params if isinstance(params, list) else None,
            # (nothing to pay: served as the free tier serves, within its quotas — not as a paid model
            # whose quote of 0 holds nothing, which any signed-in wallet could call without end)
            free=prompt == completion == request == image == 0,
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
        price = model_price(entry, u.markup, image_token_allowance)
        if price is None:
            skipped += 1
        else:
            out[model_id] = price
    if skipped:
        log.info("catalogue of upstream %s: %d models left out (no price tollway can charge)", u.name, skipped)
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
            return json.loads(body)
        return json.loads(Path(source).read_bytes())
    except (OSError, ValueError, httpx.HTTPError) as exc:
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
