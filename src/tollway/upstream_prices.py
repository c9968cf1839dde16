"""Prices by upstream. An upstream may serve a model at a price of its own — ``upstreams.prices``,
or what its catalogue imports for a model not priced in ``[models]`` — and the calls it serves are
billed at that price. A model's price in ``[models]`` (what its 402s quote, what GET /v1/models
shows) is raised, field by field, to the dearest of the upstreams that serve it, so a quote covers
whichever serves the call; an upstream with no price of its own for such a model serves it at the
model's configured price. Routing ranks upstreams by what a request is expected to cost on each
(``pipeline.expected_costs``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any

from .config import ModelPrice, Price, PriceTier, Settings, UpstreamSettings, upstream_list

FIELDS = ("prompt", "completion", "request", "cache_read", "cache_write")


def serves(u: UpstreamSettings, model: str, imported: Collection[str]) -> bool:
    return not u.models or model in u.models or model in imported


def dearest(base: ModelPrice, prices: list[Price]) -> ModelPrice:
    """``base`` raised, field by field, to the dearest of ``prices`` (a one-hour cache write is
    priced only where every one prices it) — and so is each long-context tier any of them has, at
    every threshold any of them names."""
    every = (base, *prices)
    raised: dict[str, object] = _raised([p.per_token() for p in every], [p.cache_write_1h for p in every])
    thresholds = sorted({t.min_prompt_tokens for p in every for t in p.tiers})
    raised["tiers"] = [
        PriceTier(
            min_prompt_tokens=n, **_raised(at := [p.tier_at(n) for p in every], [a.get("cache_write_1h") for a in at])
        )
        for n in thresholds
    ]
    return base.model_copy(update=raised)


def _raised(per_token: list[dict[str, Decimal]], one_hour: list[Decimal | None]) -> dict[str, Any]:
    raised: dict[str, Any] = {f: max(p[f] for p in per_token) for f in FIELDS}
    raised["cache_write_1h"] = None if None in one_hour else max(one_hour)  # type: ignore[type-var]
    return raised


def by_upstream(
    settings: Settings, imported: Mapping[str, Mapping[str, ModelPrice]], configured: Collection[str]
) -> Settings:
    """The settings with each upstream's own prices filled in — its ``prices``, then its imports of
    models not in ``configured`` — for every model any upstream prices itself (the others that
    serve it at the model's price), and each such model's price raised to the dearest."""
    ups = upstream_list(settings)
    own = {
        u.name: {
            **{m: p.price() for m, p in imported.get(u.name, {}).items() if m not in configured},
            **u.prices,
        }
        for u in ups
    }
    models = dict(settings.models)
    for model in sorted({m for prices in own.values() for m in prices}):
        base = models.get(model)
        if base is None:  # (priced by its upstreams alone: offered at the first one's price)
            first = next(own[u.name][model] for u in ups if model in own[u.name])
            base = ModelPrice(**first.model_dump())
        for u in ups:
            if serves(u, model, imported.get(u.name, {})):
                own[u.name].setdefault(model, base.price())
        models[model] = dearest(base, [own[u.name][model] for u in ups if model in own[u.name]])
    priced = [u.model_copy(update={"prices": own[u.name]}) for u in ups]
    if settings.upstreams:
        return settings.model_copy(update={"models": models, "upstreams": priced})
    return settings.model_copy(update={"models": models, "upstream": priced[0] if priced else settings.upstream})
