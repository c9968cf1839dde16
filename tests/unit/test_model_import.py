"""Pricing models from an OpenRouter-style catalogue (``model_import.py``), from a saved copy.

The fixture (``tests/data/openrouter-models.json``, written here) follows the shape OpenRouter's API
reference gives for ``GET /api/v1/models`` (``ModelsListResponse``,
https://openrouter.ai/docs/agent-sdk/typescript/api-reference/models/modelslistresponse): ``data``,
a list of models with ``id``, ``name``, ``created``, ``context_length``, ``architecture``,
``pricing`` (USD per token as decimal strings — ``prompt``, ``completion``, ``request``, ``image``,
``input_cache_read``, ``input_cache_write``, ``internal_reasoning``; ``-1`` where the router prices
per call), ``top_provider`` (``max_completion_tokens``) and ``supported_parameters``; plus entries
tollway must leave out."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tollway.config import ModelPrice, Settings, UpstreamSettings
from tollway.model_import import CatalogueError, Catalogues, models_of, read

CATALOGUE = Path(__file__).parent.parent / "data" / "openrouter-models.json"
DOC = json.loads(CATALOGUE.read_text())


def test_every_priceable_model_is_imported_with_the_markup():
    models = models_of(DOC, UpstreamSettings(name="or", markup=Decimal("0.1")), 2500)
    assert set(models) == {"vendor/alpha", "vendor/thinker", "vendor/vision", "mock/echo"}
    alpha = models["vendor/alpha"]
    assert alpha.prompt == Decimal("0.0000011") and alpha.completion == Decimal("0.0000022")
    assert alpha.cache_read == Decimal("0.00000011") and alpha.cache_write is None  # (the prompt price)
    assert alpha.max_tokens == 4096 and alpha.context_length == 128000 and alpha.name == "Vendor: Alpha"
    assert alpha.supported_parameters == ["max_tokens", "temperature", "tools"]
    # Reasoning tokens are counted as completion tokens: the dearer price covers them.
    assert models["vendor/thinker"].completion == Decimal("0.000022") and models["vendor/thinker"].max_tokens is None
    # An image costs 0.005 USD there: 10,000 prompt tokens' worth here.
    assert models["vendor/vision"].image_tokens == 10_000


def test_only_the_listed_models_when_not_importing_all():
    u = UpstreamSettings(name="or", models=["vendor/alpha", "vendor/nowhere"], import_all=False)
    assert set(models_of(DOC, u, 2500)) == {"vendor/alpha"}


@pytest.mark.parametrize("doc", [[], {"data": {}}, {"models": []}, "x"])
def test_what_is_not_a_catalogue_is_refused(doc):
    with pytest.raises(CatalogueError):
        models_of(doc, UpstreamSettings(), 2500)


def test_configured_prices_win_and_a_catalogue_that_cannot_be_read_keeps_the_last(tmp_path):
    saved = tmp_path / "models.json"
    saved.write_text(CATALOGUE.read_text())
    configured = {"mock/echo": ModelPrice(prompt=Decimal("0.000001"), completion=Decimal("0.000002"))}
    settings = Settings(
        models=configured, upstreams=[UpstreamSettings(name="or", url="http://x/v1", catalogue=str(saved))]
    )
    catalogues = Catalogues(settings)

    async def load() -> dict[str, ModelPrice]:
        async with httpx.AsyncClient() as http:
            return await catalogues.load(http)

    models = asyncio.run(load())
    assert models["mock/echo"] == configured["mock/echo"] and "vendor/alpha" in models
    assert catalogues.served["or"] == {"vendor/alpha", "vendor/thinker", "vendor/vision", "mock/echo"}
    saved.write_text("{not json")
    assert asyncio.run(load()) == models  # (a warning is logged)
    saved.unlink()
    assert asyncio.run(load()) == models


def test_reading_a_catalogue_over_http_is_bounded():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/big":
            return httpx.Response(200, content=b" " * (65 * 1024 * 1024))
        if request.url.path == "/gone":
            return httpx.Response(404)
        return httpx.Response(200, json=DOC)

    async def go(path: str):
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            return await read(f"https://catalogue.test{path}", http)

    assert asyncio.run(go("/api/v1/models")) == DOC
    for path in ("/big", "/gone"):
        with pytest.raises(CatalogueError):
            asyncio.run(go(path))
