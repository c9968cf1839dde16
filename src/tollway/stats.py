"""Live figures per upstream and model — uptime, latency, throughput, prompt-cache hits — read
from the ledger (so they count every replica's calls) into memory, where routing reads them in
microseconds.

Every ``stats_refresh_seconds`` the gateway reads the calls that finished since it last looked,
in the order they finished (at most ``BATCH`` rows a pass; a backlog is read over several). Each
call adds, per upstream it tried (its ``attempts``), a success or a failure to that upstream's
minute; the upstream that served it adds its time to first byte, its output speed and the time
the gateway itself added. A pass reads only calls that finished ``LAG`` seconds ago or earlier: a
call is committed a moment after its
finish time is taken (on any replica), and one read past would never be read (a call whose
commit took longer than that is left out of the figures).

What is kept is bounded: per upstream and model, one counter per minute of the last day and the
newest ``MAX_SAMPLES`` latency and throughput samples of the last 30 minutes.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

from .upstream.attempts import decode_attempts

log = logging.getLogger("tollway.stats")

UPTIME_WINDOWS = {"5m": 300, "30m": 1800, "1d": 86400}
SAMPLE_SECONDS = 1800  # latency and throughput percentiles are of the last 30 minutes
MAX_SAMPLES = 1000  # per upstream and model, of each: the newest are kept
LAG = 5.0
BATCH = 5000
PERCENTILES = (50, 75, 90, 99)
# What routing ranks by (``sort``): the median of the latest samples, so that a change shows within a
# few calls where the 30-minute percentiles would take hundreds — and no one call (a payer's slowest,
# say) moves it: an average weighted to the latest moved every latency-sorted payer with one.
RECENT_SAMPLES = 5


# Attempts that failed for the request's own fault (the upstream refused it, or the payer's own key).
CLIENT_FAULTS = frozenset({"upstream_rejected_request", "upstream_refused", "provider_key_refused"})


@dataclass
class Minute:
    served: int = 0
    failed: int = 0
    prompt_tokens: int = 0  # of calls that reported their cached tokens
    cached_tokens: int = 0
    expected_cached: int = 0  # tokens tollway expected the upstream to have cached ...
    survived: int = 0  # ... and of those, how many it did


class Series:
    """One upstream serving one model."""

    def __init__(self) -> None:
        self.minutes: OrderedDict[int, Minute] = OrderedDict()
        self.latency: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (finished at, seconds)
        self.throughput: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (finished at, tokens/s)
        self.added: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (finished at, ms the gateway added)

    def sample(self, figure: str, at: float, value: float) -> None:
        getattr(self, figure).append((at, value))

    def recent(self) -> dict[str, float]:
        """Latency and throughput: the median of the newest ``RECENT_SAMPLES`` of each (of 30 minutes)."""
        out = {}
        for figure in ("latency", "throughput"):
            samples: deque[tuple[float, float]] = getattr(self, figure)
            if samples:
                out[figure] = statistics.median(v for _, v in islice(reversed(samples), RECENT_SAMPLES))
        return out

    def minute(self, at: float) -> Minute:
        m = int(at // 60)
        got = self.minutes.get(m)
        if got is None:
            got = self.minutes[m] = Minute()
        return got

    def prune(self, now: float) -> None:
        oldest = int((now - UPTIME_WINDOWS["1d"]) // 60)
        while self.minutes and next(iter(self.minutes)) < oldest:
            self.minutes.popitem(last=False)
        for samples in (self.latency, self.throughput, self.added):
            while samples and samples[0][0] < now - SAMPLE_SECONDS:
                samples.popleft()


@dataclass(frozen=True)
class Figures:
    """What is published of one upstream serving one model (None: nothing to tell yet)."""

    uptime: dict[str, float | None]  # percent of attempts served, by window
    latency: dict[str, float] | None  # seconds to the first byte, by percentile
    throughput: dict[str, float] | None  # output tokens per second, by percentile
    added: dict[str, float] | None  # milliseconds the gateway itself took before the answer started
    calls: int  # served in the last 30 minutes
    recent: dict[str, float]  # latency and throughput of the latest samples (what routing ranks by)
    cache_hit_rate: float | None  # cached / prompt tokens, of calls that reported them (30 min)
    cache_survival: float | None  # of the tokens tollway expected cached, the share that were (30 min)

    def as_dict(self) -> dict[str, Any]:
        return {
            "uptime_last_5m": self.uptime["5m"],
            "uptime_last_30m": self.uptime["30m"],
            "uptime_last_1d": self.uptime["1d"],
            "latency_last_30m": self.latency,
            "throughput_last_30m": self.throughput,
            "gateway_added_ms_last_30m": self.added,
            "calls_last_30m": self.calls,
            "cache_hit_rate_last_30m": self.cache_hit_rate,
            "cache_survival_last_30m": self.cache_survival,
        }


NOTHING = Figures({w: None for w in UPTIME_WINDOWS}, None, None, None, 0, {}, None, None)


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    ordered = sorted(values)
    if not ordered:
        return None
    last = len(ordered) - 1
    return {f"p{p}": round(ordered[min(last, round(p / 100 * last))], 4) for p in PERCENTILES}


def ratio(part: int, whole: int, scale: float = 1.0) -> float | None:
    return round(scale * part / whole, 4) if whole else None


class LiveStats:
    def __init__(self) -> None:
        self._series: dict[tuple[str, str], Series] = {}
        self._figures: dict[tuple[str, str], Figures] = {}
        # Where the next pass reads from: the (finished_at, id) of the last call read. A day's
        # uptime fills in as the process lives.
        self._after: tuple[float, str] = (time.time() - SAMPLE_SECONDS, "")

    def figures(self, upstream: str, model: str) -> Figures:
        return self._figures.get((upstream, model), NOTHING)

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Count finished calls (rows of ``Store.finished_calls``, in the order they finished)."""
        for row in rows:
            self._after = (row["finished_at"], row["id"])
            self._count(row, row["finished_at"])

    def _count(self, row: Mapping[str, Any], at: float) -> None:
        model = row["model"]
        for attempt in decode_attempts(row["attempts"]):
            if attempt.outcome in CLIENT_FAULTS:  # (the request's own fault, not the upstream's: no uptime lost)
                continue
            minute = self._series_of(attempt.upstream, attempt.model or model).minute(at)
            if attempt.served:
                minute.served += 1
            else:
                minute.failed += 1
        upstream = row["upstream"]
        if upstream is None or row["status"] == "failed":
            return
        series = self._series_of(upstream, model)
        first = row["upstream_latency_ms"]
        if first is not None:
            series.sample("latency", at, first / 1000)
        if row["added_ms"] is not None:
            series.sample("added", at, row["added_ms"])
        tokens, total = row["completion_tokens"], row["duration_ms"]
        # (a throughput needs tokens generated after the first — one token arrives with the first
        # byte — counted, not estimated: else one-token streams would make an upstream look fastest)
        if tokens and tokens > 1 and total is not None and row["status"] == "served":
            generating = (total - (first or 0) if row["stream"] else total) / 1000
            if generating > 0:
                series.sample("throughput", at, tokens / generating)
        minute = series.minute(at)
        if row["cached_tokens"] is not None and row["prompt_tokens"]:
            minute.prompt_tokens += row["prompt_tokens"]
            minute.cached_tokens += row["cached_tokens"]
        expected = row["expected_cached_tokens"] or 0
        if expected > 0:
            minute.expected_cached += expected
            minute.survived += min(row["cached_tokens"] or 0, expected)

    def _series_of(self, upstream: str, model: str) -> Series:
        key = (upstream, model)
        got = self._series.get(key)
        if got is None:
            got = self._series[key] = Series()
        return got

    def publish(self, now: float | None = None) -> None:
        """Compute what ``figures`` answers, dropping what has aged out."""
        now = time.time() if now is None else now
        figures: dict[tuple[str, str], Figures] = {}
        for key, series in list(self._series.items()):
            series.prune(now)
            if not series.minutes and not series.latency:
                del self._series[key]
                continue
            figures[key] = self._figures_of(series, now)
        self._figures = figures

    @staticmethod
    def _figures_of(series: Series, now: float) -> Figures:
        uptime: dict[str, float | None] = {}
        for name, seconds in UPTIME_WINDOWS.items():
            since = int((now - seconds) // 60)
            recent = [m for k, m in series.minutes.items() if k >= since]
            uptime[name] = ratio(sum(m.served for m in recent), sum(m.served + m.failed for m in recent), 100.0)
        since = int((now - SAMPLE_SECONDS) // 60)
        recent = [m for k, m in series.minutes.items() if k >= since]
        return Figures(
            uptime=uptime,
            latency=percentiles(s for _, s in series.latency),
            throughput=percentiles(s for _, s in series.throughput),
            added=percentiles(s for _, s in series.added),
            calls=sum(m.served for m in recent),
            recent=series.recent(),
            cache_hit_rate=ratio(sum(m.cached_tokens for m in recent), sum(m.prompt_tokens for m in recent)),
            cache_survival=ratio(sum(m.survived for m in recent), sum(m.expected_cached for m in recent)),
        )

    def refresh(self, store: Any) -> int:
        """One pass: read what finished since the last, and publish. The rows read."""
        rows = store.finished_calls(self._after, time.time() - LAG, BATCH)
        self.add(rows)
        self.publish()
        return len(rows)

    async def run(self, in_thread: Callable[[Callable[[], int]], Awaitable[int]], store: Any, every: float) -> None:
        """Refresh every ``every`` seconds, ``in_thread`` (another thread, with its own ledger
        connection): a pass reads up to ``BATCH`` rows, which must not hold up the event loop.
        Routing reads ``figures``, which a pass replaces whole."""
        while True:
            try:
                await in_thread(partial(self.refresh, store))
            except Exception:  # (a failed pass is retried; the figures only age meanwhile)
                log.exception("live stats: reading the ledger failed")
            await asyncio.sleep(every)
