"""Live figures and routing against what a payer or an upstream can make them say: a payer's own
key's rate limit, requests an upstream refuses as malformed and one-token streams do not move
the figures everyone is routed by; cache figures stay within 0..1; a catalogue entry priced 0 is
served as the free tier serves, within its quotas. (Found by a review.)"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest
from test_route_preferences import row

from tollway.config import UpstreamSettings
from tollway.errors import GatewayError, UpstreamError
from tollway.routing import Preferences
from tollway.stats import LiveStats
from tollway.upstream.attempts import encode_attempts
from tollway.upstream.client import CookielessClient, Upstream
from tollway.upstream.router import Router
from tollway.usage import parse_usage


def mock_router(answer, names=("cheap", "dear"), byok=True):
    client = CookielessClient(transport=httpx.MockTransport(answer))
    ups = [Upstream(UpstreamSettings(name=n, url=f"http://{n}.test/v1", byok=byok), client) for n in names]
    return Router(ups, sticky_idle=60, cooldown=5)


OK_BODY = {
    "choices": [{"message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1},
}


# 1. A payer's own provider key being rate limited puts the shared upstream in a cooldown for everyone.
def test_a_payers_own_key_429_does_not_cool_the_shared_upstream_for_everyone():
    def answer(req):
        if req.headers.get("authorization") == "Bearer payer-own-key-123":
            return httpx.Response(429, headers={"retry-after": "60"})  # the payer's key's own quota
        return httpx.Response(200, json=OK_BODY)

    r = mock_router(answer)
    with pytest.raises(UpstreamError):
        asyncio.run(
            r.send(
                ["m"],
                lambda: "k",
                lambda u, m: b"{}",
                False,
                {},
                prefs=Preferences(byok=True, only=frozenset({"cheap"})),
                api_key="payer-own-key-123",
                costs=lambda m, names: {"cheap": 1.0, "dear": 9.0},
            )
        )
    health = {h["name"]: h for h in r.health()}
    # Every other payer (no key of their own) now goes to the dear upstream first for up to 60 s.
    others = [u.name for u in r.candidates("m", "k2", Preferences(), lambda m, names: {"cheap": 1.0, "dear": 9.0})]
    assert health["cheap"]["healthy"] and others[0] == "cheap", (health, others)


# 2. A request the upstream rejects as malformed (the request's own fault) lowers the published uptime.
@pytest.mark.parametrize("status", [400, 422])
def test_a_request_the_upstream_rejects_does_not_count_against_its_uptime(status):
    r = mock_router(lambda req: httpx.Response(status, json={"error": {"message": "bad param"}}), names=("cheap",))
    with pytest.raises(GatewayError) as err:
        asyncio.run(r.send(["m"], lambda: "k", lambda u, m: b"{}", False, {}))
    attempts = encode_attempts(err.value.attempts)
    stats = LiveStats()
    now = time.time()
    stats.add([row(0, now - 10, None, status="failed", attempts=attempts)])
    stats.add([row(1, now - 5, "cheap", first=100.0)])
    stats.publish(now)
    # 1 served, 1 refused-because-of-the-request: the upstream was up the whole time.
    assert stats.figures("cheap", "m").uptime["5m"] in (None, 100.0), stats.figures("cheap", "m").uptime


# 3. Throughput from a one-token stream: the single token came with the first byte, yet it is
# counted over the ~1 ms after it: 1000 tok/s — and a few such calls make an upstream win sort=throughput.
def test_one_token_streams_do_not_make_an_upstream_look_fastest():
    stats = LiveStats()
    now = 1_000_000.0
    # honest upstream: 20 real calls at 50 tok/s
    stats.add([row(i, now - 100 + i, "honest", first=300.0, total=300.0 + 1000.0, completion=50) for i in range(20)])
    # the other: slow for real (10 tok/s), then a payer sends 5 calls with max_tokens=1
    stats.add(
        [row(100 + i, now - 60 + i, "gamed", first=300.0, total=300.0 + 5000.0, completion=50) for i in range(20)]
    )
    stats.add([row(200 + i, now - 30 + i, "gamed", first=300.0, total=301.0, completion=1) for i in range(5)])
    stats.publish(now)
    g = stats.figures("gamed", "m")
    ups = [Upstream(UpstreamSettings(name=n, url=f"http://{n}.test/v1"), None) for n in ("honest", "gamed")]  # type: ignore[arg-type]
    r = Router(ups, sticky_idle=60, cooldown=5, stats=stats)
    first = r.candidates("m", "k", Preferences(sort="throughput"))[0].name
    assert g.recent["throughput"] < 100 and first == "honest", (g.recent, g.throughput, first)


# 4. An upstream reporting more cached tokens than prompt tokens: a hit rate above 100 %.
def test_cached_tokens_are_never_more_than_the_prompt():
    usage = parse_usage(
        {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 5000}}
    )
    assert usage is not None and usage.cached_tokens == 100


# 5. /v1/stats/cache "survival": cached tokens of every call over the expected of some.
def test_public_cache_survival_never_exceeds_one(tmp_path):
    from tollway.app import cache_windows
    from tollway.ledger import Store
    from tollway.ledger.store import C

    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    now = time.time()
    base = dict(
        model="m",
        upstream_model="m",
        upstream="a",
        stream=False,
        status="served",
        quote=10,
        paid=10,
        from_credit=0,
        created_at=now - 10,
        finished_at=now - 9,
        cost=5,
    )
    cols = {c.name for c in C.columns}
    rows = [
        # a conversation new to this replica (or after a restart): tollway expected nothing, the upstream cached 900
        dict(base, id="c1", prompt_tokens=1000, cached_tokens=900, expected_cached_tokens=0),
        # the next turn: tollway expected 1000, and 1000 were cached
        dict(base, id="c2", prompt_tokens=1100, cached_tokens=1000, expected_cached_tokens=1000),
    ]
    required = [
        c
        for c in C.columns
        if not c.nullable and c.name not in rows[0] and c.default is None and c.server_default is None
    ]
    for r_ in rows:
        for c in required:
            r_[c.name] = "x" if str(c.type).startswith("VARCHAR") else 0
    with store.engine.begin() as conn:
        conn.execute(C.insert(), [{k: v for k, v in r_.items() if k in cols} for r_ in rows])
    gw = SimpleNamespace(store=store, settings=SimpleNamespace(chain=SimpleNamespace(decimals=6)))
    doc = cache_windows(gw, False)
    survival = doc["windows"]["5m"][0]["survival"]
    store.close()
    # Of the 1000 tokens tollway expected cached, 1000 were: 1.0 (live stats say so too), not 1.9.
    assert survival <= 1.0, doc


# 7. An imported catalogue entry priced 0 (OpenRouter's ":free" variants) is offered as a paid model
# at 0: quotes of 0, so any signed-in wallet (credit 0) is served without limit, outside the free
# tier's daily quotas, on the operator's upstream account.
def test_an_imported_zero_price_is_not_an_unlimited_paid_model():
    from decimal import Decimal

    from tollway.model_import import models_of

    doc = {"data": [{"id": "vendor/model:free", "pricing": {"prompt": "0", "completion": "0"}}]}
    got = models_of(doc, UpstreamSettings(name="or", markup=Decimal("0.1")), 2500).get("vendor/model:free")
    assert got is None or got.free, got
