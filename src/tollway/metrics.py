"""Prometheus metrics for the operator (``GET /metrics``, behind the admin token). Nothing per payer.

Events of this process since it started: calls by model, HTTP status and reason, and each
upstream's time to first byte. Read from the ledger at each scrape (so every replica reports the
same): payments by state, the settlement lag, what vouchers owe that is not claimed yet, prompt-cache
hit rates over 5 minutes — and the gateway's event counters (cost over quote, …).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .gateway import Gateway

CONTENT_TYPE = CONTENT_TYPE_LATEST
CACHE_WINDOW = 300.0  # seconds the cache hit rate is computed over

EVENTS = CollectorRegistry()  # this process's (one registry per process: a test runs several gateways in one)
CALLS = Counter(
    "tollway_calls",
    "Calls answered, by model, HTTP status and reason code (ok: served)",
    ["model", "status", "code"],
    registry=EVENTS,
)
FIRST_BYTE = Histogram(
    "tollway_upstream_first_byte_seconds",
    "From asking an upstream to its first byte (its whole answer, when not streamed), by upstream",
    ["upstream"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    registry=EVENTS,
)


def call(model: str, status: int, code: str | None) -> None:
    CALLS.labels(model, str(status), code or "ok").inc()


def first_byte(upstream: str, seconds: float) -> None:
    FIRST_BYTE.labels(upstream).observe(seconds)


class Ledger:
    """What the ledger says, read at each scrape."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        store = self.gw.store
        payments = GaugeMetricFamily("tollway_payments", "Payments in the ledger, by state", labels=["state"])
        for state, n in sorted(store.count_by_state().items()):
            payments.add_metric([state], n)
        yield payments
        yield GaugeMetricFamily(
            "tollway_settlement_lag_seconds",
            "How long the oldest payment still settling has been (0: none)",
            value=store.settlement_lag(time.time()),
        )
        yield GaugeMetricFamily(
            "tollway_channels_unclaimed",
            "What batch-settlement vouchers owe that is not claimed yet (atomic units of the asset)",
            value=store.unclaimed_total(),
        )
        hits = GaugeMetricFamily(
            "tollway_cache_hit_ratio",
            f"Cached share of prompt tokens over the last {CACHE_WINDOW:g} s, by model (calls that report it)",
            labels=["model"],
        )
        for row in store.cache_stats(time.time() - CACHE_WINDOW, per_upstream=False):
            if row["prompt_tokens_reporting"]:
                hits.add_metric([row["model"]], row["cached_tokens"] / row["prompt_tokens_reporting"])
        yield hits
        events = CounterMetricFamily("tollway_events", "Events the operator should know of", labels=["event"])
        for name, n in sorted(self.gw.counters.items()):
            events.add_metric([name], n)
        yield events


def exposition(gw: Gateway) -> bytes:
    """The text an operator's Prometheus scrapes."""
    ledger = CollectorRegistry()
    ledger.register(Ledger(gw))
    return generate_latest(EVENTS) + generate_latest(ledger)
