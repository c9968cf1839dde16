"""Which upstream serves a call: the payer's routing preferences, conversation stickiness,
health, and fail-over.

The candidates for a model are the upstreams that serve it and that the request allows
(``routing.py``: OpenRouter's ``provider`` object; a payer's own key goes only to ``byok``
upstreams, nor above its ``max_price``), ranked by its ``order`` or ``sort`` (live figures,
``stats.py``; ``price``: what the request is expected to cost on each), else by that expected cost
(ties in configuration order) with the conversation's last upstream first: calls of one conversation go
back to the upstream that served it last (that is where its prompt cache is), for
``sticky_idle_seconds`` after its last call — unless that upstream fails. A conversation is its
session key (``x-session-id`` header, ``session_id`` or ``prompt_cache_key`` field) or else its
model + first system + first user message, of one payer.

Fail-over happens only before the first byte reaches the client: ``Upstream.send`` returns once
the upstream has committed, so any failure before that moves on to the next candidate, then to
the next model of a ``models`` fallback list. An upstream that fails is tried last for a cooldown
that doubles with consecutive failures (or for its own ``Retry-After``); one that did not answer
at all is probed in the background, and tried again as soon as it answers. Every attempt is kept
(``attempts.py``) for the receipt and the live figures.

What one payer's request can make an upstream do must not steer every other payer's calls. Any
failure a request's content may cause — an error status (a 429 "request too large" too), a 200 that
is no answer, a timeout, a dropped connection — cools an upstream only once another upstream served
the call the same model (an equal alternative), for a paying call: never from a call that failed
everywhere it was allowed to go, nor from a free one (a free try). Only an upstream no connection
could be made to cools (and is taken for down) at once; one that timed out or dropped a call no
other served is probed, and taken for down only if the probe fails too. A refusal of the request
itself (4xx, moderation's 403) never cools; the calls of one burst, sent before a failure was
counted, add one step to the cooldown, not one each; a failure of a call sent before the upstream
last served one counts for nothing; and a success of a call sent after the last failure's ends a
cooldown early.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from ..errors import (
    ClientGone,
    GatewayError,
    UpstreamDown,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from ..jsonbytes import dumps
from ..routing import NONE as NO_PREFERENCES
from ..routing import Preferences, over_max_price
from ..stats import LiveStats
from .attempts import Attempt
from .client import Opened, Upstream

log = logging.getLogger("tollway.upstream")
# (a model, upstreams) → what the request is expected to cost on each of those upstreams
Costs = Callable[[str, list[str]], Mapping[str, float]]
MAX_CONVERSATIONS = 100_000
MAX_COOLDOWN = 60.0
NO_FAILURE = (0, 0.0, 0.0, 0.0)


def conversation_key(
    payer: str, model: str, body: dict[str, Any], messages: list[Any], headers: Mapping[str, str]
) -> str:
    """What ties a call to the conversation it continues: its payer's session, else its payer's
    prompt's first system and user messages (``messages``: the prompt's items). The payer's: a
    session id or a prompt is no secret, and another payer's calls must not steer this one's."""
    session = headers.get("x-session-id") or body.get("session_id") or body.get("prompt_cache_key")
    if isinstance(session, str) and session:
        return f"{payer.lower()}|{model}|s|{session}"
    first = {}
    for m in messages:
        if isinstance(m, dict) and m.get("role") in ("system", "developer", "user") and m["role"] not in first:
            first["user" if m["role"] == "user" else "system"] = m.get("content")
    digest = hashlib.sha256(dumps(first, sort_keys=True)).hexdigest()[:32]
    return f"{payer.lower()}|{model}|m|{digest}"


class Router:
    def __init__(
        self, upstreams: list[Upstream], *, sticky_idle: float, cooldown: float, stats: LiveStats | None = None
    ) -> None:
        if not upstreams:
            raise ValueError("no upstream configured")
        self.upstreams = upstreams
        self.stats = stats or LiveStats()
        self.sticky_idle = sticky_idle
        self.cooldown = cooldown
        self._sticky: OrderedDict[str, tuple[str, float]] = OrderedDict()
        # name → (consecutive failures, failed until, when the last was counted, when its call was sent)
        self._failures: dict[str, tuple[int, float, float, float]] = {}
        self._down: dict[str, float] = {}  # name → until when it is taken for down (it did not answer at all)
        self._served: dict[str, float] = {}  # name → when the latest call it served was sent
        self._checking: dict[str, asyncio.Task[None]] = {}  # name → its probe after a timeout no one else served

    def named(self, name: str) -> Upstream:
        return next(u for u in self.upstreams if u.name == name)

    def healthy(self, u: Upstream, now: float) -> bool:
        return self._failures.get(u.name, NO_FAILURE)[1] <= now

    def health(self) -> list[dict[str, Any]]:
        """Each upstream: whether it is in a cooldown after failures, and for how long still."""
        now = time.monotonic()
        out = []
        for u in self.upstreams:
            failures, until, *_ = self._failures.get(u.name, NO_FAILURE)
            out.append(
                {
                    "name": u.name,
                    "healthy": until <= now,
                    "failures": failures,
                    "cooling_seconds": round(max(until - now, 0.0), 1),
                }
            )
        return out

    def down_for(self, model: str) -> float:
        """Seconds until an upstream serving ``model`` may be up again: 0 unless every one of them
        failed to answer at all just now (no connection could be made, or it timed out and did not
        answer a probe either) — an upstream that answers with errors is up, and only tried later."""
        now = time.monotonic()
        waits = [max(self._down.get(u.name, 0.0) - now, 0.0) for u in self.upstreams if u.serves(model)]
        return min(waits, default=0.0)

    def candidates(
        self, model: str, key: str, prefs: Preferences = NO_PREFERENCES, costs: Costs | None = None
    ) -> list[Upstream]:
        """The upstreams to try, in order: those the request allows (``routing.py``), healthy ones
        first, ranked by its ``sort`` or ``order``, else (and among the rest) by effective price —
        what the request is expected to cost on each (``costs(model, names)``: its prompt at the cache
        price as far as the upstream is expected to hold it cached, at the upstream's own prices;
        ``pipeline.expected_costs``); ties keep configuration order. Without an order, a
        conversation's last upstream comes first (its prompt cache is there)."""
        now = time.monotonic()
        allowed = self._allowed([u for u in self.upstreams if u.serves(model)], prefs, model)
        if costs is not None and len(allowed) > 1:  # (first: an order or sort the request sets comes on top)
            expected = costs(model, [u.name for u in allowed])
            allowed.sort(key=lambda u: expected[u.name])
        if prefs.sort in ("latency", "throughput"):
            allowed.sort(key=lambda u: self._rank(u.name, model, prefs.sort))  # (stable: ties keep their order)
        if prefs.order:
            rank = {name: i for i, name in enumerate(prefs.order)}
            allowed.sort(key=lambda u: rank.get(u.lower_name, len(rank)))
        ordered = sorted(allowed, key=lambda u: not self.healthy(u, now)) if self._failures else allowed
        sticky = self._sticky.get(key)
        if sticky and not prefs.explicit and now - sticky[1] <= self.sticky_idle:
            home = next((u for u in ordered if u.name == sticky[0]), None)
            if home is not None and self.healthy(home, now):
                ordered.remove(home)
                ordered.insert(0, home)
        if not prefs.allow_fallbacks and not prefs.order:
            return ordered[:1]  # (OpenRouter's meaning: the primary only)
        return ordered

    def _allowed(self, serving: list[Upstream], prefs: Preferences, model: str) -> list[Upstream]:
        """``only``, ``ignore``, ``max_price`` (an upstream's own price for the model) and (without
        fallbacks) ``order``. A list that names none of our upstreams is for an upstream that routes
        between providers itself: it keeps only those."""
        allowed = [
            u
            for u in serving
            if u.lower_name not in prefs.ignore
            and (u.byok or not prefs.byok)
            and prefs.surface in u.surfaces
            and not (prefs.max_price and model in u.prices and over_max_price(prefs, u.prices[model]))
        ]
        for names in (prefs.only, None if prefs.allow_fallbacks or not prefs.order else frozenset(prefs.order)):
            if names is not None:
                ours = {u.lower_name for u in serving}
                if names & ours:
                    allowed = [u for u in allowed if u.lower_name in names]
                else:
                    allowed = [u for u in allowed if u.routes_providers]
        return allowed

    def _rank(self, name: str, model: str, sort: str) -> float:
        """Lower first: the recent time to first byte, or minus the recent output speed (the median
        of the latest calls': ``stats.RECENT_SAMPLES``); an upstream without figures yet after those
        with."""
        recent = self.stats.figures(name, model).recent
        if sort == "latency":
            return recent.get("latency", math.inf)
        return -recent["throughput"] if "throughput" in recent else math.inf

    async def send(
        self,
        models: Sequence[str],
        conversation: Callable[[], str],
        body: Callable[[Upstream, str], bytes],
        stream: bool,
        headers: Mapping[str, str],
        max_usd: Fraction | None = None,
        prefs: Preferences = NO_PREFERENCES,
        api_key: str | None = None,
        costs: Costs | None = None,
        deadline: float | None = None,
        paying: bool = True,
        gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> Opened:
        """Send to the best candidate, failing over before the first byte: every upstream of the
        first model, then of the next (a ``models`` fallback list). ``body(upstream, model)`` is
        the request as that upstream takes it for that model (its output-cap field, provider
        routing). ``conversation()`` is the key the call sticks to (``conversation_key``), asked
        only where there are upstreams to choose between; ``api_key`` a payer's own provider key,
        sent in place of the upstream's; ``deadline`` (the event loop's clock) when the call's time
        is up: the upstream then being asked is left, its attempt kept, and no other is asked.
        ``paying``: whether the call is paid for (a free call's failures cool nothing); ``gone()``
        whether its client has hung up: no other upstream is asked for a client that left (it would
        be charged for an answer asked for after it had gone)."""
        key = conversation() if len(self.upstreams) > 1 else ""  # ("": no conversation to remember)
        last: UpstreamError | None = None
        attempts: list[Attempt] = []
        failed_here: list[tuple[Upstream, str, float, UpstreamError]] = []  # (upstream, model, sent, error)
        for model in models:
            for upstream in self.candidates(model, key, prefs, costs):
                if attempts and gone is not None and await gone():  # (only before a fail-over: never on the way)
                    left = ClientGone("the client hung up before an upstream answered")
                    left.attempts = tuple(attempts)
                    raise left
                started, sent = time.perf_counter(), time.monotonic()
                try:
                    async with asyncio.timeout_at(deadline):
                        opened = await upstream.send(
                            body(upstream, model), stream, headers, max_usd, api_key, prefs.surface
                        )
                except TimeoutError:  # (a timeout of the call's content, maybe: it cools nothing)
                    attempts.append(
                        Attempt(upstream.name, "upstream_timeout", (time.perf_counter() - started) * 1000, model)
                    )
                    late = UpstreamUnavailable(
                        "the upstream did not answer in the call's time", code="upstream_timeout"
                    )
                    late.attempts = tuple(attempts)
                    raise late from None
                except GatewayError as exc:
                    attempts.append(Attempt(upstream.name, exc.code, (time.perf_counter() - started) * 1000, model))
                    if not isinstance(exc, UpstreamError):  # it refused the request itself: no other is asked,
                        exc.attempts = tuple(attempts)  # and the call ends with the upstreams it was tried on
                        raise
                    if isinstance(exc, UpstreamUnreachable):  # (no request's content does that)
                        self._failed(upstream.name, sent, down=True)
                    else:
                        failed_here.append((upstream, model, sent, exc))
                    last = exc
                    log.warning("upstream %s failed before answering (%s): %s", upstream.name, exc.code, exc.message)
                    continue
                attempts.append(Attempt(upstream.name, "served", opened.latency_ms, model))
                opened.model, opened.attempts = model, attempts
                self._succeeded(upstream.name, sent, key)
                # (a payer's own key's answer — its rate limit, say — is no sign of the upstream's health)
                if api_key is None and paying:
                    for other, failed, at, failure in failed_here:
                        if failed == model and not isinstance(failure, UpstreamRefused):  # (an equal one took it)
                            self._failed(other.name, at, down=False, asked=failure.asked_to_wait)
                return opened
        for other, _, at, failure in failed_here:
            if isinstance(failure, UpstreamDown):  # (it timed out, or dropped the connection: is it there at all?)
                self._check(other, at)
        if last is None:
            raise UpstreamError(f"no upstream serves model '{models[0][:80]}'", code="no_upstream")
        last.attempts = tuple(attempts)
        raise last

    def _check(self, upstream: Upstream, sent: float) -> None:
        """Probe ``upstream`` (in the background, once at a time) after a call sent then timed out on
        it and no other served it: taken for down only if it does not answer a probe either — what
        no request's content has a say in."""
        if upstream.name in self._checking:
            return

        async def check() -> None:
            try:
                if not await upstream.probe():
                    self._failed(upstream.name, sent, down=True)
            finally:
                self._checking.pop(upstream.name, None)

        self._checking[upstream.name] = asyncio.get_running_loop().create_task(check())

    async def probe(self, every: float) -> None:
        """Every ``every`` seconds, ask each upstream taken for down (it did not answer at all)
        whether it answers now: one that does is tried again at once, without waiting out its
        cooldown — and requests for its models get quotes again."""
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for upstream in [u for u in self.upstreams if self._down.get(u.name, 0.0) > now]:
                if await upstream.probe():
                    log.info("upstream %s answers again", upstream.name)
                    self._down.pop(upstream.name, None)
                    self._failures.pop(upstream.name, None)

    def _failed(self, name: str, sent: float, *, down: bool, asked: int | None = None) -> None:
        """Try ``name`` last for a cooldown that doubles with each failure in a row — or, when it
        said how long to stay away (a 429's or 503's ``Retry-After``), for that long (at most
        ``MAX_COOLDOWN``). A call ``sent`` before the last failure was counted is of the same burst:
        it adds no step."""
        if sent < self._served.get(name, 0.0):  # (it has served a call sent after this one: it is up)
            return
        count, until, counted, failed = self._failures.get(name, NO_FAILURE)
        now = time.monotonic()
        if sent >= counted:  # (else: of the burst the last failure counted)
            count, counted, failed = count + 1, now, sent
            until = now + min(self.cooldown * 2 ** (count - 1), MAX_COOLDOWN)
        if asked is not None:
            until = now + min(float(asked), MAX_COOLDOWN)
        self._failures[name] = (count, until, counted, failed)
        if down:
            self._down[name] = max(until, self._down.get(name, 0.0))

    def _succeeded(self, name: str, sent: float, key: str) -> None:
        """``name`` served a call ``sent`` then: its failures end, unless the call of the last was sent
        after that (a slow call of before it says nothing of now); ``key``'s conversation goes back
        to it."""
        if sent > self._served.get(name, 0.0):
            self._served[name] = sent
        if sent >= self._failures.get(name, NO_FAILURE)[3]:
            self._failures.pop(name, None)
            self._down.pop(name, None)
        if not key:  # (no conversation to remember)
            return
        self._sticky[key] = (name, time.monotonic())
        self._sticky.move_to_end(key)
        if len(self._sticky) > MAX_CONVERSATIONS:
            self._sticky.popitem(last=False)
