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


# -- what one payer's requests can make routing do to every other payer's (routing review) ------------------

COSTS = lambda m, names: {"cheap": 1.0, "dear": 30.0}  # noqa: E731  (the request's expected cost, by upstream)


def answering(cheap: httpx.Response):
    """The cheap upstream answers ``cheap``; the dear one serves."""
    return lambda req: cheap if req.url.host.startswith("cheap") else httpx.Response(200, json=OK_BODY)


def send(r: Router, prefs: Preferences | None = None, key: str = "k", stream: bool = False):
    return r.send(["m"], lambda: key, lambda u, m: b"{}", stream, {}, prefs=prefs or Preferences(), costs=COSTS)


def first_for_others(r: Router) -> str:
    return r.candidates("m", "someone-else", Preferences(), COSTS)[0].name


TOO_LARGE = {"error": {"message": "Request too large for gpt-4o on tokens per min (TPM): Limit 30000"}}


@pytest.mark.parametrize(
    "cheap",
    [
        httpx.Response(500),
        httpx.Response(200, text="<html>no answer</html>"),
        httpx.Response(403, json={"error": {"message": "Your input was flagged"}}),
        httpx.Response(429, headers={"retry-after": "60"}, json=TOO_LARGE),
        httpx.Response(200, text=": OPENROUTER PROCESSING\n\n" * 3),
    ],
    ids=["5xx", "200 no answer", "moderation 403", "429 too large", "a stream that never answers"],
)
def test_a_payer_restricted_to_an_upstream_does_not_cool_it_for_everyone_for_free(cheap):
    """A payer restricted to the cheap upstream (``provider.only``) whose calls it fails pays nothing
    (the payment is released), and it cooled the cheap upstream for every payer: they paid 30×."""
    r = mock_router(answering(cheap), byok=False)
    only_cheap = Preferences(only=frozenset({"cheap"}))
    for _ in range(3):
        with pytest.raises(UpstreamError):
            asyncio.run(send(r, only_cheap, stream=b"PROCESSING" in cheap.content))
    assert first_for_others(r) == "cheap", r.health()


def test_a_free_calls_failures_cool_nothing():
    """A free call served elsewhere paid for nothing there either."""
    r = mock_router(answering(httpx.Response(500)), byok=False)
    opened = asyncio.run(r.send(["m"], lambda: "k", lambda u, m: b"{}", False, {}, costs=COSTS, paying=False))
    assert opened.upstream == "dear" and first_for_others(r) == "cheap"


def test_a_moderation_refusal_fails_over_and_says_so_when_nothing_else_serves():
    """A 403 (OpenRouter's moderation) is the request's: another upstream is asked, the refusal cools
    nothing, and alone it reaches the client as a 403 that quotes the upstream's reason."""
    flagged = httpx.Response(403, json={"error": {"message": "Your input was flagged"}})
    r = mock_router(answering(flagged), byok=False)
    opened = asyncio.run(send(r))
    assert opened.upstream == "dear" and first_for_others(r) == "cheap"
    with pytest.raises(UpstreamError) as refused:
        asyncio.run(send(r, Preferences(only=frozenset({"cheap"}))))
    assert (refused.value.status, refused.value.code) == (403, "upstream_refused")
    assert "flagged" in refused.value.message


def test_a_403_that_is_no_moderation_is_the_upstreams_failure():
    """An upstream that answers every call 403 (its key, its region, a firewall) is cooled like any
    failing one, and the client is told only the status: it was taken for the request's fault, so
    tried first on every call and never cooled, its text passed on."""
    r = mock_router(answering(httpx.Response(403, text="<html>Access denied</html>")), byok=False)
    assert asyncio.run(send(r)).upstream == "dear" and first_for_others(r) == "dear"
    with pytest.raises(UpstreamError) as refused:
        asyncio.run(send(r, Preferences(only=frozenset({"cheap"}))))
    assert (refused.value.status, refused.value.code) == (502, "upstream_error")
    assert "Access" not in refused.value.message


def test_a_failure_served_elsewhere_cools_the_upstream_one_step_a_burst():
    """An upstream failing calls that another then served is tried last (a real failure, paid for
    there); calls of one burst, sent before the first failure was counted, add one step, not one
    each (five at once made a 60 s cooldown); a success sent before a failure does not end it."""

    async def burst(r: Router, gate: asyncio.Event, n: int) -> None:
        async def one():
            return await send(r)

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0.05)
        gate.set()
        for t in tasks:
            assert (await t).upstream == "dear"

    async def main():
        gate = asyncio.Event()

        async def answer(req):
            if req.url.host.startswith("cheap"):
                await gate.wait()
                return httpx.Response(500)
            return httpx.Response(200, json=OK_BODY)

        client = CookielessClient(transport=httpx.MockTransport(answer))
        ups = [Upstream(UpstreamSettings(name=n, url=f"http://{n}.test/v1"), client) for n in ("cheap", "dear")]
        r = Router(ups, sticky_idle=60, cooldown=5)
        await burst(r, gate, 5)
        health = {h["name"]: h for h in r.health()}["cheap"]
        assert health["failures"] == 1 and 4.0 <= health["cooling_seconds"] <= 5.0, health
        assert first_for_others(r) == "dear"
        r._succeeded("cheap", time.monotonic() - 1.0, "")  # (a slow call, sent before the failure)
        assert first_for_others(r) == "dear"
        r._succeeded("cheap", time.monotonic(), "")
        assert first_for_others(r) == "cheap"

    asyncio.run(main())


def test_one_payers_conversation_does_not_steer_anothers():
    """The conversation key was the model and session id (or first messages) alone: another payer
    naming the victim's session, restricted to the dear upstream, moved the victim's calls there."""
    from tollway.upstream.router import conversation_key

    r = mock_router(answering(httpx.Response(200, json=OK_BODY)), byok=False)
    key = lambda payer: conversation_key(payer, "m", {}, [{"role": "user", "content": "hi"}], {"x-session-id": "s1"})  # noqa: E731
    assert key("0xAbC") == key("0xabc") != key("0xdef")
    asyncio.run(send(r, Preferences(only=frozenset({"dear"})), key=key("0xattacker")))
    assert r.candidates("m", key("0xvictim"), Preferences(), COSTS)[0].name == "cheap"
    assert r.candidates("m", key("0xattacker"), Preferences(), COSTS)[0].name == "dear"  # (its own: its cache)


def test_what_one_payer_sent_is_not_expected_cached_for_another():
    """``expected_cached_tokens`` is on each receipt: shared, it told a payer whether anyone had sent
    a prompt lately, even through an upstream that caches nothing (a prompt oracle)."""
    from tollway.cache import PrefixMemory, prefixes_of

    memory = PrefixMemory(ttl=60)
    prompt = prefixes_of("m", [{"role": "system", "content": "a secret plan"}, {"role": "user", "content": "go"}])
    memory.remember("0xAlice", "up", prompt, 40)
    assert memory.expect("0xalice", "up", prompt) == 40
    assert memory.expect("0xmallory", "up", prompt) == 0
    assert memory.expected_by("0xmallory", ["up"], prompt[:1]) == {}


def test_one_slow_call_does_not_move_latency_sorted_payers():
    """``sort: latency`` ranked by an average weighted 0.3 to the newest call: one slow call (a
    payer's own long answer) moved every latency-sorted payer to the dear upstream. A median of the
    latest calls' does not move for one, and follows a real change within a few."""
    stats = LiveStats()
    now = time.time()
    for i in range(5):
        stats.add([row(i, now - 60 + i, "cheap", first=100.0), row(10 + i, now - 60 + i, "dear", first=300.0)])
    stats.add([row(20, now - 30, "cheap", first=20_000.0)])  # one slow call
    stats.publish(now)
    r = mock_router(answering(httpx.Response(200, json=OK_BODY)), byok=False)
    r.stats = stats
    latency = Preferences(sort="latency")
    assert r.candidates("m", "k", latency, COSTS)[0].name == "cheap", stats.figures("cheap", "m").recent
    stats.add([row(21 + i, now - 20 + i, "cheap", first=20_000.0) for i in range(2)])  # three in a row: it is slow
    stats.publish(now)
    assert r.candidates("m", "k", latency, COSTS)[0].name == "dear"


def test_what_counts_of_a_failure_counted_late():
    """A failure counts once its call is served elsewhere, which may be long after it was sent: not
    against an upstream that served a call sent after it, nor against the upstream that failed one
    model of a fallback list and served the next; within a burst, its Retry-After still holds."""
    r = mock_router(answering(httpx.Response(200, json=OK_BODY)), byok=False)
    now = time.monotonic()
    r._succeeded("cheap", now - 1.0, "")
    r._failed("cheap", now - 2.0, down=False)  # (sent before the call it served)
    assert first_for_others(r) == "cheap"
    r._failed("cheap", now - 0.3, down=False)
    r._failed("cheap", now - 0.5, down=False, asked=30)  # (of that burst, and it asked for 30 s)
    health = {h["name"]: h for h in r.health()}["cheap"]
    assert health["failures"] == 1 and health["cooling_seconds"] >= 29, health

    r._succeeded("cheap", now - 0.2, "")  # (a call sent after the failing one was, served once it was counted)
    assert first_for_others(r) == "cheap", r.health()

    def fallback(req):
        return httpx.Response(500) if b'"x"' in req.content else httpx.Response(200, json=OK_BODY)

    client = CookielessClient(transport=httpx.MockTransport(fallback))
    ups = [
        Upstream(UpstreamSettings(name="cheap", url="http://cheap.test/v1"), client),
        Upstream(UpstreamSettings(name="dear", url="http://dear.test/v1", models=["y"]), client),
    ]
    r = Router(ups, sticky_idle=60, cooldown=5)
    to = lambda u, m: f'{{"model": "{m}"}}'.encode()  # noqa: E731
    # The cheap one fails a model only it serves, then serves the next of the list: it is up.
    opened = asyncio.run(r.send(["x", "y"], lambda: "k", to, False, {}, prefs=Preferences(only=frozenset({"cheap"}))))
    assert (opened.upstream, opened.model) == ("cheap", "y") and r.health()[0]["healthy"], r.health()
    # ... or the dear one serves the next model: no equal alternative took the call the cheap one failed
    # (one such call a minute cooled the cheap upstream for every model and every payer).
    dear_for_y = lambda m, names: {"cheap": 1.0 if m == "x" else 99.0, "dear": 30.0}  # noqa: E731
    opened = asyncio.run(r.send(["x", "y"], lambda: "k2", to, False, {}, costs=dear_for_y))
    assert [a.upstream for a in opened.attempts] == ["cheap", "dear"] and opened.model == "y"
    assert r.health()[0]["healthy"], r.health()


def test_free_callers_are_kept_apart_too():
    """Every free call's payer is ``free``: scoped by it, free callers shared one conversation and
    one memory of prompts (the oracle again, between free callers)."""
    from tollway.metering import Paid
    from tollway.payments.base import Verified

    def paid(payer: str, proof: dict) -> Paid:
        payment = Verified("s", "n", "a", payer, "p", 0, "lock", proof)
        return Paid(payment, None, "id", payer, None, None)  # type: ignore[arg-type]

    alice, mallory = paid("free", {"free": "id-alice", "day": 1}), paid("free", {"free": "id-mallory", "day": 1})
    assert alice.who != mallory.who and alice.free and not paid("0xabc", {}).free
    assert paid("0xabc", {}).who == "0xabc"
