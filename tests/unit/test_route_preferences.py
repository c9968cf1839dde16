"""Routing preferences (OpenRouter's ``provider`` object and model variants), live stats, and the
order the router tries upstreams in."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import httpx
import pytest

from tollway.config import UpstreamSettings
from tollway.errors import BadRequest
from tollway.routing import Preferences, over_max_price, preferences, split_variant, upstream_max_price
from tollway.stats import LiveStats
from tollway.upstream.attempts import Attempt, decode_attempts, encode_attempts
from tollway.upstream.client import CookielessClient, Upstream
from tollway.upstream.router import Router

PER_TOKEN = {"prompt": Decimal("0.000001"), "completion": Decimal("0.000002"), "request": Decimal(0)}


def test_preferences_follow_openrouter():
    p = preferences(
        {"provider": {"order": ["B", "a"], "ignore": ["c"], "allow_fallbacks": False, "sort": {"by": "latency"}}},
        None,
    )
    assert p == Preferences(order=("b", "a"), ignore=frozenset({"c"}), allow_fallbacks=False, sort="latency")
    assert preferences({}, ":nitro").sort == "throughput" and preferences({}, ":floor").sort == "price"
    assert preferences({"provider": {"sort": "latency"}}, ":nitro").sort == "latency"  # (the object wins)
    assert preferences({"provider": {"only": []}}, None).only == frozenset()  # an empty list allows nothing
    assert preferences({"provider": {"max_price": {"prompt": 1, "completion": "2.5"}}}, None).max_price == {
        "prompt": Decimal(1),
        "completion": Decimal("2.5"),
    }


@pytest.mark.parametrize(
    "provider",
    [
        "a",
        ["a"],
        {"order": "a"},
        {"only": [1]},
        {"ignore": [""]},
        {"order": ["x"] * 65},
        {"allow_fallbacks": "no"},
        {"sort": "speed"},
        {"sort": {"by": "cost"}},
        {"max_price": 3},
        {"max_price": {"prompt": -1}},
        {"max_price": {"prompt": "NaN"}},
        {"max_price": {"prompt": "lots"}},
        {"max_price": {"completion": True}},
        {"max_price": {"prompt": [1]}},
    ],
)
def test_malformed_preferences_are_a_400(provider):
    with pytest.raises(BadRequest) as err:
        preferences({"provider": provider}, None)
    assert err.value.code == "invalid_provider"


def test_variants_are_split_only_off_offered_models():
    offered = {"m": 1, "n:nitro": 1}
    assert split_variant("m:nitro", offered) == ("m", ":nitro")
    assert split_variant("m:floor", offered) == ("m", ":floor")
    assert split_variant("n:nitro", offered) == ("n:nitro", None)  # a model so named is that model
    assert split_variant("x:nitro", offered) == ("x:nitro", None)


def test_max_price_is_per_million_tokens_and_per_call():
    assert over_max_price(Preferences(max_price={"prompt": Decimal(1)}), PER_TOKEN) is None  # $1/M = $1/M
    assert over_max_price(Preferences(max_price={"completion": Decimal("1.99")}), PER_TOKEN) == "completion"
    assert over_max_price(Preferences(max_price={"request": Decimal(0)}), PER_TOKEN) is None
    # An upstream that routes between providers itself may charge at most tollway's prices.
    assert upstream_max_price(PER_TOKEN) == {"prompt": 1.0, "completion": 2.0, "request": 0.0}


def test_attempts_round_trip():
    tried = [Attempt("a", "upstream_unavailable", 12.34), Attempt("b", "served", 3.0)]
    assert decode_attempts(encode_attempts(tried)) == [Attempt("a", "upstream_unavailable", 12.3), tried[1]]
    assert encode_attempts([]) is None and decode_attempts(None) == []


def row(i, at, upstream="a", *, status="served", attempts=None, first=100.0, total=600.0, stream=True, **more):
    return {
        "id": f"c{i:05d}",
        "model": "m",
        "upstream": upstream,
        "stream": stream,
        "status": status,
        "attempts": attempts
        if isinstance(attempts, str)  # (as encode_attempts made them)
        else json.dumps(attempts if attempts is not None else [[upstream, "served", first]]),
        "upstream_latency_ms": first,
        "added_ms": more.get("added", 1.5),
        "duration_ms": total,
        "prompt_tokens": more.get("prompt", 100),
        "completion_tokens": more.get("completion", 50),
        "cached_tokens": more.get("cached"),
        "expected_cached_tokens": more.get("expected"),
        "finished_at": at,
    }


def test_live_stats_count_attempts_speed_and_cache():
    now = 1_000_000.0
    stats = LiveStats()
    rows = [row(i, now - 60 + i, first=100.0 + i) for i in range(9)]
    rows.append(row(9, now - 30, "b", attempts=[["a", "upstream_timeout", 5000], ["b", "served", 80]], first=80.0))
    rows.append(row(10, now - 20, None, status="failed", attempts=[["a", "upstream_error", 10], ["b", "x", 10]]))
    rows.append(row(11, now - 10, cached=60, expected=80))
    rows.append(row(12, now - 3000, first=9999.0))  # older than the 30-minute samples, within the day
    stats.add(sorted(rows, key=lambda r: r["finished_at"]))
    stats.publish(now)
    a, b = stats.figures("a", "m"), stats.figures("b", "m")
    assert a.calls == 10 and b.calls == 1
    assert a.uptime["5m"] == round(100 * 10 / 12, 4)  # a failed twice in 12 attempts in the last 5 minutes
    assert a.uptime["1d"] == round(100 * 11 / 13, 4)
    assert b.uptime["30m"] == 50.0
    assert a.latency["p50"] == 0.103  # seconds to the first byte, of the last 30 minutes only
    assert a.latency["p99"] == 0.108
    assert a.throughput["p50"] == round(50 / 0.497, 4)  # tokens over the time after the first byte
    assert a.cache_hit_rate == round(60 / 100, 4) and a.cache_survival == 0.75
    assert a.added == {"p50": 1.5, "p75": 1.5, "p90": 1.5, "p99": 1.5}
    assert stats.figures("zzz", "m").uptime["5m"] is None
    stats.publish(now + 2 * 86400)  # all aged out: nothing is kept
    assert stats.figures("a", "m").calls == 0 and not stats._series


def test_live_stats_keep_bounded_samples():
    stats = LiveStats()
    stats.add(row(i, 1000.0 + i / 100) for i in range(5000))
    stats.publish(1100.0)
    series = stats._series[("a", "m")]
    assert len(series.latency) == 1000 and len(series.minutes) <= 2
    assert stats._after == (1000.0 + 4999 / 100, "c04999")  # the next pass reads after the last call read


class FakeStats(LiveStats):
    def __init__(self, latency: dict[str, float], speed: dict[str, float]) -> None:
        super().__init__()
        now = 1e9
        for i, (name, first) in enumerate(latency.items()):
            self.add([row(i, now, name, first=first * 1000, total=first * 1000 + 50_000 / speed[name])])
        self.publish(now)


def router(*names: str, stats: LiveStats | None = None, openrouter: str | None = None) -> Router:
    ups = [
        Upstream(UpstreamSettings(name=n, url=f"http://{n}.test/v1", provider_routing=n == openrouter), None)  # type: ignore[arg-type]
        for n in names
    ]
    return Router(ups, sticky_idle=60, cooldown=5, stats=stats)


def order(r: Router, prefs: Preferences, key: str = "k") -> list[str]:
    return [u.name for u in r.candidates("m", key, prefs)]


def test_the_router_applies_the_preferences():
    r = router("a", "b", "c")
    assert order(r, Preferences()) == ["a", "b", "c"]
    assert order(r, Preferences(order=("c", "b"))) == ["c", "b", "a"]
    assert order(r, Preferences(order=("c", "b"), allow_fallbacks=False)) == ["c", "b"]
    assert order(r, Preferences(only=frozenset({"b", "c"}))) == ["b", "c"]
    assert order(r, Preferences(ignore=frozenset({"a"}))) == ["b", "c"]
    assert order(r, Preferences(allow_fallbacks=False)) == ["a"]
    assert order(r, Preferences(only=frozenset({"nobody"}))) == []
    assert order(r, Preferences(only=frozenset())) == []
    r._failed(
        "a", time.monotonic(), down=True
    )  # an upstream cooling down after failures is tried last, whatever the order
    assert order(r, Preferences(order=("a", "b"))) == ["b", "c", "a"]


def test_names_we_do_not_know_are_left_to_an_upstream_that_routes_itself():
    r = router("local", "or", openrouter="or")
    assert order(r, Preferences(only=frozenset({"anthropic"}))) == ["or"]
    assert order(r, Preferences(order=("anthropic",), allow_fallbacks=False)) == ["or"]
    assert order(r, Preferences(order=("anthropic",))) == ["local", "or"]
    assert order(r, Preferences(only=frozenset({"local"}))) == ["local"]


def test_sort_ranks_by_live_figures_and_wins_over_stickiness():
    stats = FakeStats({"slow": 0.5, "fast": 0.05, "mid": 0.2}, {"slow": 200.0, "fast": 20.0, "mid": 100.0})
    r = router("new", "slow", "fast", "mid", stats=stats)
    assert order(r, Preferences(sort="latency")) == ["fast", "mid", "slow", "new"]  # (no figures: last)
    assert order(r, Preferences(sort="throughput")) == ["slow", "mid", "fast", "new"]
    assert order(r, Preferences(sort="price")) == ["new", "slow", "fast", "mid"]  # one price per model here
    r._succeeded("mid", time.monotonic(), "convo")
    assert order(r, Preferences(), key="convo")[0] == "mid"
    assert order(r, Preferences(sort="latency"), key="convo")[0] == "fast"


def test_an_upstream_that_asks_to_be_left_alone_is_tried_last_that_long():
    ok = {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}
    answers = {
        "busy": httpx.Response(429, headers={"retry-after": "7"}),
        "down": httpx.Response(503),
        "ok": httpx.Response(200, json=ok),
    }
    client = CookielessClient(transport=httpx.MockTransport(lambda req: answers[req.url.host.split(".")[0]]))
    ups = [Upstream(UpstreamSettings(name=n, url=f"http://{n}.test/v1"), client) for n in ("busy", "down", "ok")]
    r = Router(ups, sticky_idle=60, cooldown=0.5)
    opened = asyncio.run(r.send(["m"], lambda: "k", lambda u, model: b"{}", False, {}))
    assert [(a.upstream, a.outcome) for a in opened.attempts] == [
        ("busy", "upstream_unavailable"),
        ("down", "upstream_unavailable"),
        ("ok", "served"),
    ]
    cooling = {h["name"]: h["cooling_seconds"] for h in r.health()}
    assert 6.5 <= cooling["busy"] <= 7.0  # its Retry-After, not the 0.5 s cooldown
    assert cooling["down"] <= 0.5
    assert order(r, Preferences()) == ["ok", "busy", "down"]  # (the cooling ones last, in configuration order)


def test_by_default_the_lowest_expected_cost_goes_first():
    r = router("a", "b", "c")
    costs = lambda m, names: {"c": 1.0, "b": 2.0, "a": 3.0}  # noqa: E731  (the request's expected cost, by upstream)
    assert [u.name for u in r.candidates("m", "k", Preferences(), costs)] == ["c", "b", "a"]
    assert [u.name for u in r.candidates("m", "k", Preferences(order=("a",)), costs)] == ["a", "c", "b"]
    r._succeeded("a", time.monotonic(), "convo")  # a conversation's own upstream still comes first
    assert [u.name for u in r.candidates("m", "convo", Preferences(), costs)] == ["a", "c", "b"]
    ties = lambda m, names: dict.fromkeys(names, 1.0)  # noqa: E731
    assert [u.name for u in r.candidates("m", "k", Preferences(), ties)] == ["a", "b", "c"]  # (configuration order)
