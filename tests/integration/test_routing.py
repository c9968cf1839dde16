"""Routing a paid call by the payer's preferences (OpenRouter's ``provider`` object, ``:nitro``),
every upstream tried on the receipt, live stats per upstream (``/v1/models/{id}/endpoints``)
and usage rankings (``/v1/rankings``) — through real gateways, mocks and anvil."""

from __future__ import annotations

import csv
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import httpx
import pytest
from starlette.applications import Starlette

from conftest import gateway_settings
from support import ADMIN, ServerThread, eventually, free_port, receipt, wait_receipt
from tollway import stats
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.config import UpstreamSettings
from tollway.mock_upstream import MockOptions
from tollway.mock_upstream import create_app as create_mock
from tollway.payments.x402 import unb64json
from tollway.pricing import to_atomic

MESSAGES = [{"role": "user", "content": "route me"}]


@dataclass
class Routed:
    gw: ServerThread
    slow: Starlette
    fast: Starlette


@pytest.fixture(scope="module")
def routed(devnet, tmp_path_factory):
    """A gateway over three upstreams: "slow" (answers after 150 ms), "fast" (which routes
    between providers itself, as OpenRouter does) and "gone" (nothing listens there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "LAG", 0.0)  # (the figures count a call as soon as it is committed)
        slow, fast = create_mock(MockOptions(latency=0.15)), create_mock()
        with ServerThread(slow) as slow_server, ServerThread(fast) as fast_server:
            settings = gateway_settings(devnet, "", tmp_path_factory.mktemp("routing") / "l.sqlite3")
            settings = settings.model_copy(
                update={
                    "upstreams": [
                        UpstreamSettings(name="slow", url=slow_server.url + "/v1"),
                        UpstreamSettings(name="fast", url=fast_server.url + "/v1", provider_routing=True),
                        UpstreamSettings(name="gone", url=f"http://127.0.0.1:{free_port()}/v1", connect_timeout=0.5),
                    ],
                    "failure_cooldown_seconds": 0.2,
                    "stats_refresh_seconds": 0.1,
                }
            )
            with ServerThread(create_app(settings)) as gw:
                yield Routed(gw, slow, fast)


@pytest.fixture
def http(routed, chain, devnet):
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=routed.gw.url, timeout=30) as client:
        yield client


def call(http: httpx.Client, **extra) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", json={"model": "mock/echo", "messages": MESSAGES, "max_tokens": 8, **extra}
    )


def served_by(gw_url: str, r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return wait_receipt(gw_url, r.headers["x-tollway-receipt"])["upstream"]


def test_the_provider_object_chooses_among_our_upstreams(routed, http):
    assert served_by(routed.gw.url, call(http)) == "slow"  # configuration order
    assert served_by(routed.gw.url, call(http, provider={"order": ["FAST"]})) == "fast"
    assert served_by(routed.gw.url, call(http, provider={"only": ["slow"]})) == "slow"
    assert served_by(routed.gw.url, call(http, provider={"ignore": ["slow"]})) == "fast"
    nitro = call(http, model="mock/echo:nitro")
    assert served_by(routed.gw.url, nitro) in ("slow", "fast")
    assert receipt(routed.gw.url, nitro.headers["x-tollway-receipt"])["model"] == "mock/echo"


def test_preferences_nothing_here_can_meet_are_refused_before_any_payment(routed):
    gw = routed.gw
    for provider, code in [
        ({"only": ["vendor-x"], "ignore": ["fast"]}, "no_route"),
        ({"sort": "fastest"}, "invalid_provider"),
        ({"max_price": {"completion": 0}}, "no_route"),
        ("fast", "invalid_provider"),
    ]:
        r = httpx.post(
            f"{gw.url}/v1/chat/completions", json={"model": "mock/echo", "messages": MESSAGES, "provider": provider}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (provider, r.text)
        assert "payment-required" not in r.headers
    # Names we do not know are for the upstream that routes between providers itself.
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "mock/echo", "messages": MESSAGES, "provider": {"only": ["vendor-x"]}},
    )
    assert r.status_code == 402


def test_only_the_upstream_that_routes_between_providers_gets_the_provider_object(routed, http):
    served_by(routed.gw.url, call(http, provider={"order": ["slow"], "data_collection": "deny"}))
    assert "provider" not in routed.slow.state.mock.last_request
    served_by(routed.gw.url, call(http, provider={"order": ["fast"], "data_collection": "deny"}))
    sent = routed.fast.state.mock.last_request["provider"]
    assert sent["order"] == ["fast"] and sent["data_collection"] == "deny"
    assert sent["max_price"] == {"prompt": 1.0, "completion": 2.0, "request": 0.0}  # tollway's own prices


def test_failed_attempts_are_on_the_receipt_and_fallbacks_can_be_refused(routed, http):
    gw = routed.gw
    r = call(http, provider={"order": ["gone"], "allow_fallbacks": False})
    assert r.status_code == 503, r.text  # not served elsewhere (a call not served is not charged: money holes)
    time.sleep(0.3)  # gone's cooldown passes (meanwhile it would be tried last)
    r = call(http, provider={"order": ["gone", "fast"]})
    doc = wait_receipt(gw.url, r.headers["x-tollway-receipt"])
    assert doc["upstream"] == "fast"
    assert [(a["upstream"], a["outcome"]) for a in doc["attempts"]] == [
        ("gone", "upstream_unavailable"),
        ("fast", "served"),
    ]
    assert all(a["ms"] >= 0 for a in doc["attempts"])
    eventually(lambda: endpoints(gw)["gone"]["uptime_last_5m"] == 0.0, what="gone's failures counted")


def endpoints(gw) -> dict[str, dict]:
    doc = httpx.get(f"{gw.url}/v1/models/mock/echo/endpoints").json()["data"]
    assert doc["id"] == "mock/echo"
    return {e["provider_name"]: e for e in doc["endpoints"]}


def test_live_stats_are_published_and_sort_by_them(routed, http):
    gw = routed.gw
    for _ in range(3):
        served_by(routed.gw.url, call(http, provider={"only": ["slow"]}))
        served_by(routed.gw.url, call(http, provider={"only": ["fast"]}))
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "mock/echo", "messages": MESSAGES, "stream": True, "provider": {"only": ["fast"]}},
        ) as s:
            assert s.status_code == 200
            s.read()

    def figures_in() -> bool:
        e = endpoints(gw)
        return all(e[n]["calls_last_30m"] >= 3 and e[n]["latency_last_30m"] for n in ("slow", "fast"))

    eventually(figures_in, what="live figures of both upstreams")
    e = endpoints(gw)
    assert e["slow"]["latency_last_30m"]["p50"] >= 0.15 > e["fast"]["latency_last_30m"]["p50"]
    assert e["fast"]["throughput_last_30m"]["p50"] > 0
    assert 0 < e["fast"]["gateway_added_ms_last_30m"]["p50"] < e["slow"]["latency_last_30m"]["p50"] * 1000
    assert 0 < e["fast"]["uptime_last_5m"] <= 100 and e["fast"]["status"] == "ok"
    assert e["fast"]["pricing"]["completion"] == "0.000002"
    assert served_by(routed.gw.url, call(http, provider={"sort": "latency"})) == "fast"
    assert httpx.get(f"{gw.url}/v1/models/nope/endpoints").status_code == 404


def test_rankings_share_usage_by_model(routed, http):
    gw = routed.gw
    served_by(routed.gw.url, call(http))
    served_by(routed.gw.url, call(http, model="mock/echo-large"))
    doc = httpx.get(f"{gw.url}/v1/rankings").json()
    day = {r["model"]: r for r in doc["windows"]["day"]}
    assert day["mock/echo"]["calls"] >= 1 and day["mock/echo-large"]["calls"] >= 1
    assert abs(sum(r["token_share"] for r in day.values()) - 1) < 0.01
    assert doc["windows"]["week"][0]["tokens"] >= doc["windows"]["week"][-1]["tokens"]
    rows = list(csv.DictReader(io.StringIO(httpx.get(f"{gw.url}/v1/rankings?format=csv").text)))
    assert {(r["window"], r["model"]) for r in rows} >= {("day", "mock/echo"), ("week", "mock/echo-large")}
    assert httpx.get(f"{gw.url}/v1/rankings?format=xml").status_code == 400
    assert "payer" not in str(doc) and httpx.get(f"{gw.url}/v1/rankings", headers=ADMIN).json() == doc


def test_a_models_list_falls_back_to_the_next_model_and_bills_it(devnet, chain, tmp_path):
    with ServerThread(create_mock()) as large_only:
        settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
        upstreams = [
            UpstreamSettings(name="echo", url=f"http://127.0.0.1:{free_port()}/v1", models=["mock/echo"]),
            UpstreamSettings(name="large", url=large_only.url + "/v1", models=["mock/echo-large"]),
        ]
        with ServerThread(create_app(settings.model_copy(update={"upstreams": upstreams}))) as gw:
            body = {"model": "mock/echo", "models": ["mock/echo-large"], "messages": MESSAGES, "max_tokens": 8}
            quoted = httpx.post(f"{gw.url}/v1/chat/completions", json=body)
            alone = httpx.post(
                f"{gw.url}/v1/chat/completions", json={**body, "model": "mock/echo-large", "models": None}
            )
            assert quoted.status_code == alone.status_code == 402

            def exact(r: httpx.Response) -> int:
                return next(
                    int(o["amount"])
                    for o in unb64json(r.headers["payment-required"])["accepts"]
                    if o["scheme"] == "exact"
                )

            assert exact(quoted) >= exact(alone)  # the quote covers the dearer model

            payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
            with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw.url, timeout=30) as http:
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                doc = wait_receipt(gw.url, r.headers["x-tollway-receipt"])
            assert doc["model"] == "mock/echo-large" and doc["upstream"] == "large"
            assert [(a["upstream"], a["model"], a["outcome"]) for a in doc["attempts"]] == [
                ("echo", "mock/echo", "upstream_unavailable"),
                ("large", "mock/echo-large", "served"),
            ]
            prices = settings.models["mock/echo-large"]
            u = doc["usage"]
            usd = prices.request + u["prompt_tokens"] * prices.prompt + u["completion_tokens"] * prices.completion
            assert int(doc["cost"]["atomic"]) == to_atomic(Fraction(usd), 6)


def exact_amount(r: httpx.Response) -> int:
    """The amount a 402 asks of an ``exact`` payment."""
    offers = unb64json(r.headers["payment-required"])["accepts"]
    return next(int(o["amount"]) for o in offers if o["scheme"] == "exact")


def test_an_upstream_that_answers_again_is_tried_again_at_once(devnet, chain, tmp_path):
    port = free_port()
    settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
    flaky = UpstreamSettings(name="flaky", url=f"http://127.0.0.1:{port}/v1", connect_timeout=0.5)
    settings = settings.model_copy(update={"upstreams": [flaky], "failure_cooldown_seconds": 60, "probe_seconds": 0.1})
    with ServerThread(create_app(settings)) as gw:
        payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw.url, timeout=30) as http:
            assert call(http).status_code == 503  # it does not answer: down for a minute ...
            unpaid = {"model": "mock/echo", "messages": MESSAGES}
            assert httpx.post(f"{gw.url}/v1/chat/completions", json=unpaid).status_code == 503  # (no quote)
            with ServerThread(create_mock(), port=port):  # ... unless it answers a probe
                eventually(
                    lambda: httpx.post(f"{gw.url}/v1/chat/completions", json=unpaid).status_code == 402,
                    timeout=5,
                    what="the upstream probed and quoted again",
                )
                health = httpx.get(f"{gw.url}/healthz", headers=ADMIN).json()["upstreams"]
                assert health == [{"name": "flaky", "healthy": True, "failures": 0, "cooling_seconds": 0.0}]
                assert served_by(gw.url, call(http)) == "flaky"


def test_without_an_order_the_upstream_holding_the_prompts_prefix_is_cheapest(routed, http):
    system = {"role": "system", "content": "A long shared agent prompt. " * 40}
    first = call(http, messages=[system, {"role": "user", "content": "one"}], provider={"order": ["fast"]})
    assert served_by(routed.gw.url, first) == "fast"
    # A new conversation (another first user message: no stickiness) with the same system prompt:
    # its prefix is cached on fast, so its effective price is lowest there, though slow comes first.
    other = call(http, messages=[system, {"role": "user", "content": "two"}])
    assert served_by(routed.gw.url, other) == "fast"
    fresh = [{"role": "user", "content": f"never seen {time.time()}"}]
    assert served_by(routed.gw.url, call(http, messages=fresh)) == "slow"  # (cached nowhere: configuration order)


def test_sort_by_latency_follows_a_change_within_a_few_calls(routed, http):
    gw = routed.gw
    for _ in range(3):
        served_by(gw.url, call(http, provider={"only": ["slow"]}))
        served_by(gw.url, call(http, provider={"only": ["fast"]}))
    time.sleep(0.5)  # (figures refresh every 0.1 s here)
    assert served_by(gw.url, call(http, provider={"sort": "latency"})) == "fast"
    options = routed.fast.state.mock.options
    try:
        options.latency = 0.4  # fast becomes the slower one ...
        for _ in range(5):
            served_by(gw.url, call(http, provider={"only": ["fast"]}))
        time.sleep(0.5)
        assert served_by(gw.url, call(http, provider={"sort": "latency"})) == "slow"  # ... five calls later
    finally:
        options.latency = 0.0


def test_an_upstream_that_hangs_holds_only_its_own_connections(devnet, chain, tmp_path):
    """Every upstream has a pool of its own ``max_connections``: calls hung on one (it takes
    requests and never answers) leave the others' connections free — with one pool for all, they
    took every connection, and a healthy upstream's calls waited for one and failed."""
    with socket.socket() as hung:  # (listening, never accepting: requests go in, no answer comes out)
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        fast = create_mock()
        with ServerThread(fast) as fast_server:
            settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
            upstreams = [
                UpstreamSettings(
                    name="hung", url=f"http://127.0.0.1:{hung.getsockname()[1]}/v1", max_connections=2, read_timeout=4
                ),
                UpstreamSettings(name="fast", url=fast_server.url + "/v1", max_connections=2, read_timeout=2),
            ]
            with ServerThread(create_app(settings.model_copy(update={"upstreams": upstreams}))) as gw:
                payers = [
                    Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)]) for _ in range(5)
                ]

                def call_on(name: str, payer: Payer) -> httpx.Response:
                    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw.url, timeout=30) as client:
                        return call(client, provider={"only": [name], "allow_fallbacks": False})

                with ThreadPoolExecutor(4) as pool:
                    hanging = [pool.submit(call_on, "hung", p) for p in payers[:4]]
                    time.sleep(1.0)  # (they hold every connection "hung" may have, and wait for more)
                    assert served_by(gw.url, call_on("fast", payers[4])) == "fast"
                    assert all(h.result().status_code >= 500 for h in hanging)
