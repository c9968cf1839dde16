"""The routing decision's cost: ``Router.candidates`` over 20 upstreams serving 300 models (200 each),
with live figures for 50 models per upstream and one upstream holding the prompt's prefix.

    .venv/bin/python scripts/bench_routing.py

Prints p50/p99 per decision for the default (effective price: the request's expected cost on every
upstream — its prefixes looked up there, each upstream's own price and cache survival — then
stickiness; half the upstreams price the models themselves), ``sort: latency`` and
``order``/``only``/``ignore`` (issue 11's budget: < 50 µs). The request is parsed (and its prompt's
prefixes hashed) before the clock starts: that is the call's, not the routing decision's.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from types import SimpleNamespace

from tollway.cache import PrefixMemory
from tollway.chat import encode, parse_chat
from tollway.config import ModelPrice, Price, Settings, UpstreamSettings
from tollway.pipeline import expected_costs
from tollway.pricing import Prices
from tollway.routing import Preferences
from tollway.stats import LiveStats
from tollway.upstream.client import Upstream
from tollway.upstream.router import Router

MODELS = [f"vendor{i}/model{i}" for i in range(300)]
CALLS = 3000


def live_stats(now: float) -> LiveStats:
    stats, rows = LiveStats(), []
    for j in range(20):
        for m in MODELS[:50]:
            first = 100.0 + j
            attempts = json.dumps([[f"p{j}", "served", first, m]])
            rows.append(
                {
                    **dict.fromkeys(("cached_tokens", "expected_cached_tokens")),
                    "id": f"{j}-{m}",
                    "model": m,
                    "upstream": f"p{j}",
                    "stream": True,
                    "status": "served",
                    "attempts": attempts,
                    "upstream_latency_ms": first,
                    "added_ms": 1.0,
                    "duration_ms": 900.0,
                    "prompt_tokens": 100,
                    "completion_tokens": 50,
                    "finished_at": now,
                }
            )
    stats.add(sorted(rows, key=lambda r: r["id"]))
    stats.publish(now)
    return stats


def main() -> None:
    now = time.time()
    price = ModelPrice(prompt=Decimal("0.000001"), completion=Decimal("0.000002"))
    own = Price(prompt=Decimal("0.0000009"), completion=Decimal("0.000003"))  # (half the upstreams)
    settings = Settings(models=dict.fromkeys(MODELS, price))
    prices = {m: Prices.of(price, 6) for m in MODELS}
    served = [MODELS[j * 5 : j * 5 + 200] for j in range(20)]
    ups = [
        Upstream(
            UpstreamSettings(
                name=f"p{j}",
                url=f"http://p{j}.test/v1",
                models=served[j],
                prices=dict.fromkeys(served[j], own) if j % 2 else {},
            ),
            None,  # type: ignore[arg-type]
        )
        for j in range(20)
    ]
    router = Router(ups, sticky_idle=600, cooldown=5, stats=live_stats(now))
    messages = [{"role": "system", "content": "You are a careful assistant. " * 30}, {"role": "user", "content": "hi"}]
    calls = {m: parse_chat(encode({"model": m, "messages": messages}), settings, prices) for m in MODELS}
    gw = SimpleNamespace(
        router=router,
        prefixes=PrefixMemory(300),
        upstream_prices={m: {u.name: Prices.of(own, 6) for u in ups if m in u.prices} for m in MODELS},
        upstream_byok_prices={},
    )
    gw.prefixes.remember("p7", calls[MODELS[150]].prefixes(), 400)
    cases = {
        "default (effective price, stickiness)": (Preferences(), "costs"),
        "sort: latency": (Preferences(sort="latency"), None),
        "order + only + ignore": (
            Preferences(order=("p3", "p9"), only=frozenset(f"p{j}" for j in range(15)), ignore=frozenset({"p1"})),
            None,
        ),
    }
    for label, (prefs, ranked) in cases.items():
        times = []
        for i in range(CALLS):
            model = MODELS[150 + i % 40]
            started = time.perf_counter()
            costs = expected_costs(gw, calls[model]) if ranked else None  # type: ignore[arg-type]
            router.candidates(model, f"conversation-{i % 100}", prefs, costs)
            times.append(time.perf_counter() - started)
        times.sort()
        p50, p99 = times[CALLS // 2] * 1e6, times[int(CALLS * 0.99)] * 1e6
        print(f"{label:40} p50 {p50:6.1f} µs   p99 {p99:6.1f} µs")


if __name__ == "__main__":
    main()
