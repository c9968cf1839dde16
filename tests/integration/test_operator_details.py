"""The smaller things an operator and a browser wallet rely on: plain prices, health per network
and upstream, receipts in ISO time, CORS, one log line per call, links that resolve."""

from __future__ import annotations

import logging
import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import httpx

from support import ADMIN, CHAT, chat_body, receipt
from tollway.client import AllowedAsset, Payer, SyncPayingTransport

ROOT = Path(__file__).resolve().parents[2]


def test_model_prices_are_plain_decimals(gateway):
    models = httpx.get(f"{gateway.url}/v1/models").json()["data"]
    figures = [v for m in models for key in ("pricing", "pricing_per_million") for v in m[key].values()]
    assert figures and all(re.fullmatch(r"\d+(\.\d+)?", v) for v in figures), figures
    echo = next(m for m in models if m["id"] == "mock/echo")
    assert echo["pricing"]["input_cache_read"] == "0.0000001"  # not 1E-7


def test_health_names_each_network_once_and_each_upstreams_state(gateway):
    doc = httpx.get(f"{gateway.url}/healthz", headers=ADMIN).json()
    assert doc["networks"] == ["eip155:31337"]
    assert [u["name"] for u in doc["upstreams"]] == ["default"] and "healthy" in doc["upstreams"][0]


def test_receipt_times_are_iso_and_in_order(gateway, chain, devnet, caplog):
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with (
        caplog.at_level(logging.INFO, logger="tollway.calls"),
        httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url, timeout=30) as http,
    ):
        r = http.post(CHAT, json=chat_body("what time is it", max_tokens=8))
    doc = receipt(gateway.url, r.headers["x-tollway-receipt"])
    created, finished = (datetime.fromisoformat(doc[k]) for k in ("created_at", "finished_at"))
    assert created.tzinfo is not None and created <= finished
    # and the call's one log line: who, what, how much, how long — nothing secret
    [line] = [rec.getMessage() for rec in caplog.records if doc["id"] in rec.getMessage()]
    for field in ("status=200", "model=mock/echo", "upstream=default", "scheme=exact", f"cost={doc['cost']['atomic']}"):
        assert field in line, line
    assert "ms=" in line and payer.account.key.hex() not in line


def test_browser_wallets_may_call_and_read_the_payment_headers(gateway):
    preflight = httpx.options(
        f"{gateway.url}{CHAT}",
        headers={
            "Origin": "https://wallet.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "payment-signature, x-payment, sign-in-with-x, authorization",
        },
    )
    assert preflight.status_code == 200
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in ("payment-signature", "x-payment", "sign-in-with-x", "authorization"))
    r = httpx.post(f"{gateway.url}{CHAT}", json=chat_body("cors"), headers={"Origin": "https://wallet.example"})
    assert r.status_code == 402
    exposed = r.headers["access-control-expose-headers"].lower()
    for header in (
        "payment-required",
        "payment-response",
        "x-payment-response",
        "www-authenticate",
        "payment-receipt",
        "x-tollway-receipt",
        "x-tollway-cost",
    ):
        assert header in exposed


def test_the_banner_lists_every_upstream():
    from tollway.cli import banner
    from tollway.config import Settings, UpstreamSettings

    settings = Settings(
        upstreams=[
            UpstreamSettings(name="router", url="https://openrouter.ai/api/v1"),
            UpstreamSettings(name="local", url="http://127.0.0.1:8080/v1"),
        ],
        models={"m": {"prompt": Decimal(1), "completion": Decimal(1)}},
    )
    text = banner(settings, None, None)
    assert "upstream: router https://openrouter.ai" in text and "upstream: local http://127.0.0.1:8080" in text


def test_the_readmes_links_resolve():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_the_anthropic_sdk_in_a_browser_passes_the_preflight(gateway):
    asked = "x-api-key, anthropic-version, anthropic-beta, anthropic-dangerous-direct-browser-access, payment-signature"
    preflight = httpx.options(
        f"{gateway.url}/v1/messages",
        headers={
            "Origin": "https://agent.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked,
        },
    )
    assert preflight.status_code == 200, preflight.text
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert all(h.strip() in allowed for h in asked.split(","))


def test_doctor_asks_an_upstream_with_its_key_in_the_header_it_reads():
    """An upstream that takes its key as ``x-api-key`` (Anthropic's API) is asked so by
    ``tollway doctor`` too, as its calls are — else a working setup was failed (401)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from support import ServerThread
    from tollway import doctor
    from tollway.config import ModelPrice, Settings, UpstreamSettings

    async def models(request: Request) -> JSONResponse:
        if request.headers.get("x-api-key") != "sk-ant-real" or "anthropic-version" not in request.headers:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return JSONResponse({"data": [{"id": "claude"}]})

    with ServerThread(Starlette(routes=[Route("/v1/models", models)])) as server:
        upstream = UpstreamSettings(url=server.url + "/v1", key_header="x-api-key", api_key="sk-ant-real")
        settings = Settings(upstream=upstream, models={"claude": ModelPrice(prompt="0.000003", completion="0.000015")})
        findings = asyncio.run(doctor.upstream_findings(settings))
    assert findings and all(f.level == "ok" for f in findings), [str(f) for f in findings]
