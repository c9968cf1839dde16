"""A gateway that prices its models from an upstream's OpenRouter-style catalogue: offered at the
imported price plus the markup, charged at it, and refreshed while it runs."""

from __future__ import annotations

import json
import shutil
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import httpx

from conftest import gateway_settings
from support import (
    CHAT,
    ServerThread,
    eventually,
    exact_offer,
    exact_payment,
    payment_header,
    payment_required,
    wait_receipt,
)
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.config import UpstreamSettings
from tollway.mock_upstream import MockOptions
from tollway.mock_upstream import create_app as create_mock
from tollway.pricing import to_atomic

CATALOGUE = Path(__file__).parent.parent / "data" / "openrouter-models.json"


def offered(gw_url: str) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{gw_url}/v1/models").json()["data"]}


def test_imported_models_are_offered_charged_and_refreshed(devnet, chain, tmp_path):
    saved = tmp_path / "openrouter-models.json"
    shutil.copy(CATALOGUE, saved)
    mock = create_mock(MockOptions(models=["mock/echo", "vendor/alpha", "vendor/thinker", "vendor/new"]))
    with ServerThread(mock) as upstream:
        settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
        or_like = UpstreamSettings(name="or", url=upstream.url + "/v1", catalogue=str(saved), markup=Decimal("0.25"))
        settings = settings.model_copy(update={"upstreams": [or_like], "catalogue_refresh_seconds": 0.3})
        with ServerThread(create_app(settings)) as gw:
            models = offered(gw.url)
            assert set(models) == {"mock/echo", "mock/echo-large", "vendor/alpha", "vendor/thinker", "vendor/vision"}
            alpha = models["vendor/alpha"]
            assert alpha["name"] == "Vendor: Alpha" and alpha["context_length"] == 128000
            assert alpha["pricing"]["prompt"] == "0.00000125" and alpha["pricing"]["completion"] == "0.0000025"
            assert models["mock/echo"]["pricing"]["prompt"] == "0.000001"  # the configured price stands

            payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
            with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw.url, timeout=30) as http:
                body = {"model": "vendor/alpha", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 8}
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                doc = wait_receipt(gw.url, r.headers["x-tollway-receipt"])
                usage = doc["usage"]
                usd = usage["prompt_tokens"] * Fraction("0.00000125") + usage["completion_tokens"] * Fraction(
                    "0.0000025"
                )
                assert int(doc["cost"]["atomic"]) == to_atomic(usd, 6)

                # The catalogue changes: a new model, alpha dearer, thinker gone.
                changed = json.loads(CATALOGUE.read_text())
                entries = [e for e in changed["data"] if isinstance(e, dict) and e["id"] != "vendor/thinker"]
                next(e for e in entries if e["id"] == "vendor/alpha")["pricing"]["prompt"] = "0.000002"
                entries.append({"id": "vendor/new", "pricing": {"prompt": "0.000001", "completion": "0.000001"}})
                saved.write_text(json.dumps({"data": entries}))
                eventually(lambda: "vendor/new" in offered(gw.url), what="the refreshed catalogue")
                models = offered(gw.url)
                assert "vendor/thinker" not in models and models["vendor/alpha"]["pricing"]["prompt"] == "0.0000025"
                gone = http.post("/v1/chat/completions", json={**body, "model": "vendor/thinker"})
                assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
                r = http.post("/v1/chat/completions", json={**body, "model": "vendor/new"})
                assert r.status_code == 200, r.text


def test_two_upstreams_importing_one_model_each_bill_their_own_price(devnet, chain, tmp_path):
    """The same catalogue through two upstreams at different markups: the model is quoted (and
    listed) at the dearer, each upstream lists and bills its own, and routing takes the cheaper."""
    models = ["mock/echo", "vendor/alpha"]
    with (
        ServerThread(create_mock(MockOptions(models=models))) as a,
        ServerThread(create_mock(MockOptions(models=models))) as b,
    ):
        settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
        dear = UpstreamSettings(name="dear", url=a.url + "/v1", catalogue=str(CATALOGUE), markup=Decimal("1"))
        cheap = UpstreamSettings(name="cheap", url=b.url + "/v1", catalogue=str(CATALOGUE), markup=Decimal("0.1"))
        settings = settings.model_copy(update={"upstreams": [dear, cheap]})
        with ServerThread(create_app(settings)) as gw:
            assert offered(gw.url)["vendor/alpha"]["pricing"]["prompt"] == "0.000002"  # (1e-6 at +100%)
            doc = httpx.get(f"{gw.url}/v1/models/vendor/alpha/endpoints").json()["data"]["endpoints"]
            assert {e["provider_name"]: e["pricing"]["prompt"] for e in doc} == {
                "dear": "0.000002",
                "cheap": "0.0000011",
            }
            payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
            with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw.url, timeout=30) as http:
                for upstream, prompt, completion in [
                    (None, "0.0000011", "0.0000022"),
                    ("dear", "0.000002", "0.000004"),
                ]:
                    body = {"model": "vendor/alpha", "messages": [{"role": "user", "content": f"hi {upstream}"}]}
                    if upstream:
                        body["provider"] = {"order": [upstream]}
                    r = http.post("/v1/chat/completions", json={**body, "max_tokens": 8})
                    assert r.status_code == 200, r.text
                    receipt = wait_receipt(gw.url, r.headers["x-tollway-receipt"])
                    assert receipt["upstream"] == (upstream or "cheap")
                    u = receipt["usage"]
                    usd = u["prompt_tokens"] * Fraction(prompt) + u["completion_tokens"] * Fraction(completion)
                    assert int(receipt["cost"]["atomic"]) == to_atomic(usd, 6)


def test_a_model_with_a_long_context_tier_is_never_charged_below_what_its_upstream_bills(devnet, chain, tmp_path):
    """OpenRouter prices long prompts of some models higher (``pricing.overrides``: Claude Sonnet
    4.5 bills $6/$22.50 per M instead of $3/$15 from 200,000 prompt tokens). Here the tier starts
    at 50 prompt tokens and the mock upstream bills as the catalogue says: a short call is charged
    at the base prices (not the tier's), one whose prompt reaches the tier at the tier's, and
    neither below what the upstream bills."""
    base = {"prompt": "0.000001", "completion": "0.00001"}
    tier = {"prompt": "0.000002", "completion": "0.000015"}
    entry = {"id": "vendor/long", "pricing": {**base, "overrides": [{"min_prompt_tokens": 50, **tier}]}}
    saved = tmp_path / "catalogue.json"
    saved.write_text(json.dumps({"data": [entry]}))
    with ServerThread(create_mock(MockOptions(models=["vendor/long"]))) as upstream:
        settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
        or_like = UpstreamSettings(name="or", url=upstream.url + "/v1", catalogue=str(saved), markup=Decimal(0))
        settings = settings.model_copy(update={"upstreams": [or_like]})
        with ServerThread(create_app(settings)) as gw:
            assert offered(gw.url)["vendor/long"]["pricing"]["prompt"] == "0.000001"  # (the base tier's)
            payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
            with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw.url, timeout=30) as http:
                for words, prices in [(3, base), (80, tier)]:
                    mock = {
                        "dialect": "openrouter",
                        "cost_prices": {k: float(v) for k, v in prices.items()},  # (its bill: at the call's tier)
                        "reply": "x " * 600,
                    }
                    prompt = " ".join(f"w{i}" for i in range(words))
                    body = {"model": "vendor/long", "messages": [{"role": "user", "content": prompt}], "mock": mock}
                    r = http.post("/v1/chat/completions", json={**body, "max_tokens": 400})
                    assert r.status_code == 200, r.text
                    doc = wait_receipt(gw.url, r.headers["x-tollway-receipt"])
                    usage = r.json()["usage"]
                    assert (usage["prompt_tokens"] >= 50) == (prices is tier) and usage["completion_tokens"] == 400
                    usd = usage["prompt_tokens"] * Fraction(prices["prompt"])
                    usd += usage["completion_tokens"] * Fraction(prices["completion"])
                    billed = to_atomic(Fraction(str(usage["upstream_cost"])), 6)
                    assert int(doc["cost"]["atomic"]) == to_atomic(usd, 6) >= billed > 0


def test_attack_a_prompt_reaching_a_tier_above_max_price_is_refused_before_anything_is_spent(devnet, chain, tmp_path):
    """Who pays for a refusal: a long prompt whose long-context tier is above the payer's
    ``provider.max_price`` is refused while the request is read — with a genuine payment attached
    (for another request), nothing is reserved, the upstream is asked nothing, no transaction is
    sent; that payment then pays its own request, once."""
    entry = {"id": "vendor/long", "pricing": {"prompt": "0.000001", "completion": "0.00001"}}
    entry["pricing"]["overrides"] = [{"min_prompt_tokens": 50, "prompt": "0.00001"}]
    saved = tmp_path / "catalogue.json"
    saved.write_text(json.dumps({"data": [entry]}))
    mock = create_mock(MockOptions(models=["vendor/long"]))
    with ServerThread(mock) as upstream:
        settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
        or_like = UpstreamSettings(name="or", url=upstream.url + "/v1", catalogue=str(saved), markup=Decimal(0))
        with ServerThread(create_app(settings.model_copy(update={"upstreams": [or_like]}))) as gw:
            payer = chain.fund()
            before = chain.balance(payer.address)
            short = {"model": "vendor/long", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            required = payment_required(httpx.post(gw.url + CHAT, json=short))
            paid = payment_header(exact_payment(payer, required, exact_offer(required)))
            words = " ".join(f"w{i}" for i in range(200))
            long = {**short, "messages": [{"role": "user", "content": words}], "provider": {"max_price": {"prompt": 2}}}
            refused = httpx.post(gw.url + CHAT, json=long, headers=paid)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_route", refused.text
            assert mock.state.mock.last_request is None  # (the upstream was asked nothing)
            assert chain.balance(payer.address) == before
            served = httpx.post(gw.url + CHAT, json=short, headers=paid)  # (the proof was not taken)
            assert served.status_code == 200, served.text
            assert httpx.post(gw.url + CHAT, json=short, headers=paid).status_code != 200  # (and pays once)
            eventually(lambda: chain.balance(payer.address) == before - int(exact_offer(required)["amount"]))


def test_a_catalogue_price_of_thousands_of_digits_is_left_out_and_the_gateway_starts(devnet, tmp_path):
    """ "1e5000" was imported, and the check that leaves out an imported model whose quote the
    ledger cannot hold (``doctor.amounts_fit``) names that quote — past Python's 4,300-digit limit
    on printing an int: a ValueError, and the gateway did not start."""
    entries = [
        {"id": "vendor/alpha", "pricing": {"prompt": "0.000001", "completion": "0.000002"}},
        {"id": "vendor/huge", "pricing": {"prompt": "1e5000", "completion": "0.000002"}},
    ]
    saved = tmp_path / "catalogue.json"
    saved.write_text(json.dumps({"data": entries}))
    with ServerThread(create_mock(MockOptions(models=["vendor/alpha", "vendor/huge"]))) as upstream:
        settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
        or_like = UpstreamSettings(name="or", url=upstream.url + "/v1", catalogue=str(saved))
        settings = settings.model_copy(update={"upstreams": [or_like]})
        with ServerThread(create_app(settings)) as gw:
            models = offered(gw.url)
    assert "vendor/alpha" in models and "vendor/huge" not in models
