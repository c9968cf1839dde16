"""The gateway's long-lived parts, built once from settings and passed explicitly."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any, TypeVar

import httpx
from starlette.requests import Request

from . import doctor, free_tier, upstream_prices
from .bounded import Recently
from .cache import PrefixMemory
from .chat import ChatCall
from .claims import Claimer
from .config import CLOCK_SKEW_SECONDS, Settings, resolve_chain, upstream_list
from .errors import BadRequest, ChainUnavailable, UpstreamUnavailable
from .ledger import Store
from .ledger.models import PaymentState
from .ledger.store import Settlement, credit_account
from .model_import import Catalogues
from .payments import PREPAID, build_scheme
from .payments.base import Context, PaymentScheme, Verified
from .payments.batch import BatchSettlementEvm
from .payments.chain import Chain
from .payments.mpp import AUTHORIZATION, CREDENTIAL_TYPES, MppRail
from .payments.signed import origin_of
from .payments.x402 import V1_NETWORK_NAMES
from .priced import PricedRequests
from .pricing import Prices, to_atomic
from .quotes import QuoteSigner
from .settlement import Settler
from .stats import LiveStats
from .upstream.client import Upstream, make_http_client, make_paying_client
from .upstream.router import Router
from .usage import Usage

log = logging.getLogger("tollway")
CHAIN_PROBE_SECONDS = 3
CHAIN_DOWN_AFTER = 2  # failed probes in a row
HOUSEKEEPING_SECONDS = 10  # at most; a stream a crash left open is metered within its payment's validity
ABANDONED_AFTER_SECONDS = 5  # past max_call_seconds, a stream still open has lost its process
ALIVE_SECONDS = 3.0  # how often a process says its streams are alive (well within a sweep's interval)


def abandoned_payment_after(settings: Settings, rpc_seconds: float) -> float:
    """How long ago a payment still reserved for a call not streamed must have been reserved for
    the call to have lost its process: the longest such a call can run — two confirmations on
    chain (before the upstream is asked, and again after a slow answer), each at most two RPC
    exchanges (``eth_simulateV1``, then ``eth_call``), the first maybe waiting out a channel's
    deposit (``settle_margin_seconds``); the upstream's answer (``max_call_seconds``) — plus the
    clock skew allowed between replicas, and ``ABANDONED_AFTER_SECONDS``."""
    confirms = 2 * 2 * rpc_seconds + settings.settle_margin_seconds
    return settings.max_call_seconds + confirms + CLOCK_SKEW_SECONDS + ABANDONED_AFTER_SECONDS


def idempotency_kept(settings: Settings, rpc_seconds: float) -> float:
    """How long an idempotent request's claim or answer is kept: ``idempotency_ttl_seconds``, and
    at least as long as its call may run (a stream's answer is dated from its start)."""
    return max(settings.idempotency_ttl_seconds, abandoned_payment_after(settings, rpc_seconds))


UNSEEN = object()  # (not a stream's signs of life)
MAX_REMEMBERED_BASES = 64  # (a Host header is the client's to choose: the memory of them stays small)


T = TypeVar("T")


@dataclass
class Gateway:
    settings: Settings  # with the chain's id and by-chain defaults resolved
    store: Store
    chain: Chain  # the request path's chain client; settlement has its own
    schemes: list[PaymentScheme]
    settler: Settler
    router: Router
    prefixes: PrefixMemory  # prompt prefixes recently sent to each upstream (expected cache hits)
    quotes: QuoteSigner
    prices: dict[str, Prices]
    v1_names: dict[str, str]  # x402 v1 network name → CAIP-2 id, for networks served in v1
    chain_id: int
    network: str  # CAIP-2 id of the chain payments are taken on
    token: str  # the asset payments and credit are in
    counters: Counter[str]  # events the operator should know of (private health document)
    _clients: tuple[httpx.AsyncClient, ...]
    _worker_chain: Chain
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    unmeterable: set[str] = field(default_factory=set)  # abandoned streams whose scheme is not enabled here
    sighted: dict[str, Any] = field(default_factory=dict)  # streams that looked abandoned at the last sweep → signs
    live: dict[str, float] = field(default_factory=dict)  # the streams this process relays: id → its limit (monotonic)
    chain_failures: int = 0  # consecutive failed probes of the chain RPC (request path)
    claimer: Claimer | None = None  # claims what batch-settlement vouchers owe, where channels are offered
    mpp: MppRail | None = None  # MPP's Payment authentication (evm charge), where exact is offered
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)  # the chain probe, housekeeping
    # Ledger scans that must not hold up the event loop (the operator's counts, live stats): one
    # thread, so one more ledger connection however many CPUs the host has.
    _reports: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "tollway-reports"))
    _recent: dict[str, tuple[float, Any]] = field(default_factory=dict)  # (``recent``: name → when read, document)
    _reading: dict[str, asyncio.Future[Any]] = field(default_factory=dict)  # (``recent``: name → its read under way)
    catalogues: Catalogues | None = None  # models imported from upstreams' catalogues, where any has one
    byok_prices: dict[str, Prices] = field(default_factory=dict)  # at byok_fee of the list prices
    # model → upstream → what the upstream's calls of the model are billed at, where it prices it itself
    upstream_prices: dict[str, dict[str, Prices]] = field(default_factory=dict)
    upstream_byok_prices: dict[str, dict[str, Prices]] = field(default_factory=dict)
    free: free_tier.FreeTier | None = None  # the free tier (models marked free)
    _bases: dict[tuple[Any, ...], str] = field(default_factory=dict)  # public_base by what it is built from
    priced: PricedRequests = field(default_factory=PricedRequests)  # the parses of 402s, for their paid retries
    # Addresses found to have no code (not contract wallets), for a minute: a sign-in not signed by
    # its address costs a chain round trip to find out, once a minute an address, not every time.
    codeless: Recently = field(default_factory=lambda: Recently(60.0))

    @classmethod
    async def open(cls, settings: Settings) -> Gateway:
        """Build the gateway, after the checks of ``doctor``: raises ``Unfit`` on any failure."""
        catalogues = Catalogues(settings)
        if catalogues.wanted:
            async with httpx.AsyncClient() as http:
                settings = settings.model_copy(update={"models": await catalogues.load(http)})
        settings = upstream_prices.by_upstream(settings, catalogues.priced, catalogues.settings.models)
        fails = doctor.required(settings)
        if fails:
            raise doctor.Unfit(fails)
        chain = Chain(settings.chain.rpc_url, simulation_gas=settings.chain.settle_gas_limit)  # type: ignore[arg-type]
        found, chain_id = await doctor.chain_findings(settings, chain)
        if chain_id is not None:
            settings = resolve_chain(settings, chain_id)
            settings, prices = _priced(settings, catalogues.settings.models)
            found += doctor.amounts_fit(settings, prices)
        if chain_id is None or any(f.level == "fail" for f in found):
            await chain.close()
            raise doctor.Unfit([f for f in found if f.level == "fail"])
        c = settings.chain
        store = Store(settings.database_url, background_checkpoints=True)
        binding = doctor.ledger_findings(store, chain_id, await doctor.genesis_hash(chain), settings)
        if any(f.level == "fail" for f in binding):
            store.close()
            await chain.close()
            raise doctor.Unfit([f for f in binding if f.level == "fail"])
        worker_chain = Chain(c.rpc_url)  # type: ignore[arg-type]
        network = f"eip155:{chain_id}"
        v1_name = c.v1_network or V1_NETWORK_NAMES.get(chain_id)
        upstreams = upstream_list(settings)
        clients = {u.name: make_paying_client(u) if u.payer_key else make_http_client(u) for u in upstreams}
        schemes: list[PaymentScheme] = []
        settler = Settler(
            store,
            worker_chain,
            key=c.settler_key,  # type: ignore[arg-type]
            chain_id=chain_id,
            gas_limit=c.settle_gas_limit,
            max_fee_gwei=c.max_fee_gwei,
            priority_fee_gwei=c.priority_fee_gwei,
            fee_ceiling_gwei=c.fee_ceiling_gwei,  # type: ignore[arg-type]
            payout_key=c.payout_key or (c.settler_key if _address_of(c.settler_key) == c.payee.lower() else None),  # type: ignore[union-attr]
            token=c.token,
            settled_elsewhere=lambda row: _scheme(schemes, row["scheme"]).settled_elsewhere(row),
            confirmations=int(c.confirmations or 0),
        )
        ctx = Context(settings, chain, chain_id, settler.address, settler, store)
        names = list(settings.schemes)
        if "upto" in names and not await doctor.upto_contracts(chain):
            log.warning("upto is not offered: Permit2 or the x402 upto proxy is not on chain %d", chain_id)
            names.remove("upto")
        if settings.mpp and "exact" in names and "upto" in names:  # (MPP's permit2 credential needs Permit2)
            names.append("mpp-permit2")
        if settings.mpp and "exact" in names and "transfer" in names and settings.mpp_hash_max_usd:
            names.append("mpp-hash")
        if "batch-settlement" in names and not await doctor.channel_contracts(chain):
            log.warning("batch-settlement is not offered: the x402 escrow is not on chain %d", chain_id)
            names.remove("batch-settlement")
        schemes.extend(build_scheme(name, ctx) for name in names)
        gw = cls(
            settings=settings,
            store=store,
            chain=chain,
            schemes=schemes,
            settler=settler,
            router=Router(
                [Upstream(u, clients[u.name]) for u in upstreams],
                sticky_idle=settings.sticky_idle_seconds,
                cooldown=settings.failure_cooldown_seconds,
                stats=LiveStats(),
            ),
            prefixes=PrefixMemory(settings.cache_memory_seconds),
            quotes=QuoteSigner(settings.quote_secret or store.meta("quote_secret", lambda: secrets.token_hex(32))),
            prices=prices,
            v1_names={v1_name: network} if v1_name else {},
            chain_id=chain_id,
            network=network,
            token=c.token,  # type: ignore[arg-type]
            counters=Counter(),
            _clients=tuple(clients.values()),
            _worker_chain=worker_chain,
        )
        types = {t: name for t, name in CREDENTIAL_TYPES.items() if any(s.name == name for s in schemes)}
        if settings.mpp and AUTHORIZATION in types:
            unbound = to_atomic(Fraction(settings.mpp_hash_max_usd), c.decimals)
            gw.mpp = MppRail(
                gw.quotes.key,
                settings.mpp_realm,
                chain_id,
                c.decimals,
                types,
                unbound,
                settler.address,
                validity=settings.offer_timeout_seconds,
            )
        gw._price(settings, prices)
        gw.free = free_tier.FreeTier(settings, store, gw.quotes.key, chain_id, c.token, c.payee)  # type: ignore[arg-type]
        if catalogues.wanted:
            gw.catalogues = catalogues
            gw._offer_imported()
        gw.close_abandoned_streams()
        gw.give_back_abandoned_payments()
        await settler.start()
        loop = asyncio.get_running_loop()
        gw._tasks = [
            loop.create_task(gw._probe_chain()),
            loop.create_task(gw._housekeeping()),
            loop.create_task(gw._keep_alive()),
            loop.create_task(gw.router.stats.run(gw.report, store, settings.stats_refresh_seconds)),
            loop.create_task(gw.router.probe(settings.probe_seconds)),
        ]
        if gw.catalogues is not None:
            gw._tasks.append(loop.create_task(gw._refresh_catalogues()))
        channels = next((s for s in schemes if isinstance(s, BatchSettlementEvm)), None)
        if channels is not None:
            k = settings.channels
            gw.claimer = Claimer(
                store,
                worker_chain,
                settler,
                channels,
                interval=k.claim_interval_seconds,
                threshold=to_atomic(Fraction(k.claim_threshold_usd), c.decimals),
                watch_every=k.watch_seconds,
                batch=k.max_claims_per_transaction,
            )
            gw._tasks.append(loop.create_task(gw.claimer.run()))
        return gw

    def _price(self, settings: Settings, prices: dict[str, Prices]) -> None:
        """What calls are quoted and billed at, from ``settings`` (its models priced: ``prices``):
        each model's price, each upstream's own (``upstream_prices.py``), and both at the BYOK fee."""
        self.settings, self.prices = settings, prices
        self.byok_prices = _byok(settings, prices)
        self.upstream_prices = {}
        for u, router_side in zip(upstream_list(settings), self.router.upstreams, strict=True):
            router_side.prices = {m: p.per_token() for m, p in u.prices.items()}  # (routing: max_price)
            for m, p in u.prices.items():
                self.upstream_prices.setdefault(m, {})[u.name] = Prices.of(p, settings.chain.decimals)
        self.upstream_byok_prices = {m: _byok(settings, by) for m, by in self.upstream_prices.items()}

    def _offer_imported(self) -> None:
        """The upstreams serve what their catalogues import."""
        assert self.catalogues is not None
        for u in self.router.upstreams:
            u.imported = self.catalogues.served.get(u.name, frozenset())

    async def _refresh_catalogues(self) -> None:
        """Read the upstreams' catalogues again every ``catalogue_refresh_seconds``: new models are
        offered, gone ones no longer, prices follow (a quote given before stays what it was)."""
        assert self.catalogues is not None
        while True:
            await asyncio.sleep(self.settings.catalogue_refresh_seconds)
            try:
                models = await self.catalogues.load(self._clients[0])
                configured = self.catalogues.settings
                fresh = self.settings.model_copy(
                    update={"models": models, "upstreams": configured.upstreams, "upstream": configured.upstream}
                )
                fresh = upstream_prices.by_upstream(fresh, self.catalogues.priced, configured.models)
                self._price(*_priced(fresh, configured.models))
                self._offer_imported()
            except Exception:  # (the next pass tries again; meanwhile the last import stands)
                log.exception("refreshing the upstreams' catalogues failed")

    async def _probe_chain(self) -> None:
        """Ask the chain for its head every few seconds, so that requests need not find out."""
        while True:
            try:
                await self.chain.request("eth_blockNumber", [])
                self.chain_failures = 0
            except ChainUnavailable:
                self.chain_failures += 1
            await asyncio.sleep(CHAIN_PROBE_SECONDS)

    def check_available(self, call: ChatCall) -> None:
        """Refuse to quote a call no upstream may serve (400: its ``provider`` preferences leave
        none), or (503 + Retry-After) while nothing could serve it: every upstream of the model is
        down (it did not answer at all just now), or the chain RPC failed its last probes."""
        if call.route.byok and not any(u.byok for u in self.router.upstreams):
            raise BadRequest("no upstream here takes a payer's own key (X-Provider-Key)", code="byok_unavailable")
        if not any(self.router.candidates(m.model, "", call.route) for m in call.members):
            raise BadRequest(
                "no upstream here serves this model within the request's 'provider' preferences"
                f" (upstreams: {', '.join(u.name for u in self.router.upstreams if u.serves(call.model))})",
                code="no_route",
            )
        if self.chain_failures >= CHAIN_DOWN_AFTER:
            raise ChainUnavailable("the chain RPC is not answering", retry_after=CHAIN_PROBE_SECONDS)
        wait = min(self.router.down_for(m.model) for m in call.members)
        if wait > 0:
            raise UpstreamUnavailable("every upstream for this model is down", retry_after=max(1, math.ceil(wait)))

    @property
    def v1_name_of(self) -> dict[str, str]:
        """CAIP-2 id → x402 v1 network name, for the networks served in v1."""
        return {network: name for name, network in self.v1_names.items()}

    def public_base(self, request: Request) -> str:
        """Where clients reach this gateway: ``public_url``, or (devnet) what the request says."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        scope = request.scope  # (built from the scope once per host: Starlette's base_url is dear)
        key = (scope.get("scheme"), scope.get("server"), scope.get("root_path"), request.headers.get("host"))
        base = self._bases.get(key)
        if base is None:
            if len(self._bases) > MAX_REMEMBERED_BASES:
                self._bases.clear()
            base = self._bases[key] = str(request.base_url).rstrip("/")
        return base

    def origin(self, request: Request) -> str:
        """The origin tollway's signed messages must name to be accepted here."""
        return origin_of(self.public_base(request))

    def give_back_abandoned_payments(self) -> None:
        """Give back what the calls not streamed that a crashed process was serving hold: their
        answers never left (an answer leaves once charged), so nobody pays — the credit held for
        each is released, and its payment released (a prepaid one's amount becomes credit). Only
        payments reserved longer ago than such a call can run anywhere (``abandoned_payment_after``),
        so that another replica's calls are left alone. A scan of the payer's journal each: run in
        the reports thread (``report``)."""
        cutoff = time.time() - abandoned_payment_after(self.settings, self.chain.total)
        for row in self.store.abandoned_payments(cutoff):
            try:
                if self.store.give_back(row, prepaid=row["scheme"] in PREPAID, error="not served: the gateway stopped"):
                    log.warning("gave back payment %s of a call a stopped gateway left (%s)", row["id"], row["scheme"])
            except Exception:
                log.exception("could not give back the abandoned payment %s", row["id"])

    def close_abandoned_streams(self) -> None:
        """Meter the streams a crashed process left open, by the documented rule for a stream
        without usage: the prompt at its bound and each event it delivered (saved as it went) at
        the model's most tokens per event — never more than its quote; a metered payment (upto)
        then settles that, never its maximum, well before the payment expires. Only streams older
        than the longest call (every stream is cut at it), so that another replica's live streams
        are left alone — and those waiting for their usage after the fact once that wait is over; a
        stream is metered once whoever gets there first, and one row that cannot be metered never
        stops the gateway. A stream that began less than the clock skew allowed between replicas
        before that is another's live one if its events still move, or its process still says it is
        alive (``_keep_alive``; a model may pause for longer than a sweep): it is metered only when
        the next sweep finds it as this one left it."""
        now, s = time.time(), self.settings
        cut = now - s.max_call_seconds - ABANDONED_AFTER_SECONDS
        waited = now - s.usage_wait_seconds - ABANDONED_AFTER_SECONDS  # (``metering`` ones: their wait is over)
        sighted, self.sighted = self.sighted, {}
        for row in self.store.abandoned_streams(cut, waited):
            if row["id"] in self.unmeterable:
                continue
            recent = row["status"] == "streaming" and row["created_at"] > cut - CLOCK_SKEW_SECONDS
            signs = (row["events"], row["alive_at"])
            if recent and sighted.get(row["id"], UNSEEN) != signs:
                self.sighted[row["id"]] = signs
                continue
            try:
                self._meter_abandoned(row)
            except Exception:
                log.exception("could not meter the abandoned stream %s", row["id"])

    def _meter_abandoned(self, row: dict[str, Any]) -> None:
        covered = row["paid"] + row["from_credit"]
        cost = min(row["quote"], covered)
        byok = bool(row["byok"])  # (its quote was at the BYOK fee's prices)
        prices = (self.byok_prices if byok else self.prices).get(row["model"])
        own = (self.upstream_byok_prices if byok else self.upstream_prices).get(row["model"], {})
        prices = own.get(row["upstream"], prices)  # (what served it bills at)
        conf = self.settings.models.get(row["model"])
        if prices is not None and conf is not None and row["prompt_bound"] is not None:
            delivered = Usage(
                row["prompt_bound"], (row["events"] or 0) * conf.max_tokens_per_event, dialect="estimated"
            )
            cost = min(prices.cost(delivered), cost)
        schemes = [*self.schemes, *([self.free.scheme] if self.free else [])]
        scheme = next((s for s in schemes if s.name == row["scheme"]), None)
        if scheme is None:  # (its scheme is no longer enabled: it is left for a process that has it)
            self.unmeterable.add(row["id"])
            log.error("the stream %s a crash left open was paid by %s, not enabled here", row["id"], row["scheme"])
            return
        settle = None
        if row["payment_state"] == PaymentState.RESERVED and not scheme.prepaid:  # a metered payment, unsettled
            payment = Verified(
                row["scheme"],
                row["network"],
                row["asset"],
                row["payer"],
                "",
                row["amount"],
                "",
                json.loads(row["proof"]),
                channel=scheme.channel_use(json.loads(row["proof"])) if row["channel"] else None,  # type: ignore[attr-defined]
            )
            settle = self.settlement(scheme, payment, max(cost - row["from_credit"], 0))
        call_row = {
            "id": row["id"],
            "status": "incomplete",
            "error": "the gateway stopped mid-stream",
            "cost": cost,
            "finished_at": time.time(),
        }
        self.store.finish_call(
            credit_account(row["network"], row["asset"], row["payer"]),
            deposit=row["paid"] if settle is None else int(settle.amount or 0),
            held=row["from_credit"],
            cost=cost,
            payment_id=row["payment_id"],
            call=call_row,
            insert_row=False,
            settle=settle,
        )

    def settlement(self, scheme: PaymentScheme, payment: Verified, due: int) -> Settlement:
        """How a payment settles once its call is on record and owes ``due``: what it moves (its
        whole amount, or — metered — ``due`` at most), by the transaction that moves it; or, when
        nothing (more) is to move on chain, as it stands. The worker broadcasts the transaction."""
        amount = scheme.settled_amount(payment, due)
        call = None if scheme.prepaid else scheme.settlement_call(payment.proof, amount)
        return self.settler.settlement(amount, call, payment.channel)

    async def _housekeeping(self) -> None:
        """Now and then: meter the streams another (crashed) replica left open; forget the answers
        of idempotent requests kept long enough."""
        while True:
            await asyncio.sleep(min(HOUSEKEEPING_SECONDS, self.settings.max_call_seconds))
            try:  # (a pass the ledger fails is logged; the next one tries again)
                self.close_abandoned_streams()
                await self.report(self.give_back_abandoned_payments)
                self.store.forget_requests(time.time() - idempotency_kept(self.settings, self.chain.total))
                await self.report(partial(self.store.forget_free_calls, free_tier.today() - 1))
            except Exception:
                log.exception("housekeeping pass failed")

    async def _keep_alive(self) -> None:
        """Say the streams this process relays are alive (``close_abandoned_streams``), several times
        between two sweeps — not one past its limit (a client that stopped reading holds it open)."""
        while True:
            await asyncio.sleep(min(ALIVE_SECONDS, min(HOUSEKEEPING_SECONDS, self.settings.max_call_seconds) / 3))
            now = time.monotonic()
            alive = [call_id for call_id, limit in self.live.items() if limit > now]
            if alive:
                try:
                    self.store.streams_alive(alive, time.time())
                except Exception:  # (the next pass says it again)
                    log.exception("could not say the live streams are alive")

    async def report(self, read: Callable[[], T]) -> T:
        """``read()`` — a scan of the ledger — in the reports thread (``_reports``)."""
        return await asyncio.get_running_loop().run_in_executor(self._reports, read)

    async def recent(self, name: str, seconds: float, read: Callable[[], T]) -> T:
        """A public document ``read()`` as ``report`` does, read again at most every ``seconds``
        (anyone may ask for it as often as they like). One read at a time: while it runs, the
        document it replaces is answered — or, the first time, the read is awaited by all."""
        at, doc = self._recent.get(name, (-math.inf, None))
        if time.monotonic() - at <= seconds:
            return doc  # type: ignore[no-any-return]
        reading = self._reading.get(name)
        if reading is None:
            reading = self._reading[name] = asyncio.ensure_future(self.report(read))

            def done(f: asyncio.Future[Any]) -> None:
                del self._reading[name]
                if not f.cancelled() and f.exception() is None:
                    self._recent[name] = (time.monotonic(), f.result())

            reading.add_done_callback(done)
        if name in self._recent:
            return doc  # type: ignore[no-any-return]
        return await asyncio.shield(reading)  # type: ignore[no-any-return]  # (a caller gone cancels no one's read)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` after the response (e.g. metering a stream once its usage is known)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._background:  # let work after responses finish, briefly
            await asyncio.wait(self._background, timeout=15)
        await self.settler.stop()
        self._reports.shutdown(cancel_futures=True)
        for client in self._clients:
            await client.aclose()
        await self.chain.close()
        await self._worker_chain.close()
        self.store.close()


def _priced(settings: Settings, configured: dict[str, Any]) -> tuple[Settings, dict[str, Prices]]:
    """The settings' models priced in the asset's units — less any imported model whose largest
    quote the ledger could not hold (a configured one is left for ``doctor`` to refuse)."""
    prices = {m: Prices.of(p, settings.chain.decimals) for m, p in settings.models.items()}
    unfit = [f.what.removeprefix("models.") for f in doctor.amounts_fit(settings, prices)]
    dropped = [m for m in unfit if m not in configured]
    if dropped:
        log.warning("imported models left out (a call could cost more than the ledger holds): %s", dropped)
        models = {m: p for m, p in settings.models.items() if m not in dropped}
        settings = settings.model_copy(update={"models": models})
        prices = {m: p for m, p in prices.items() if m not in dropped}
    return settings, prices


def _byok(settings: Settings, prices: dict[str, Prices]) -> dict[str, Prices]:
    return {m: p.scaled(Fraction(settings.byok_fee)) for m, p in prices.items()}


def _scheme(schemes: list[PaymentScheme], name: str) -> PaymentScheme:
    return next(s for s in schemes if s.name == name)


def _address_of(key: str | None) -> str | None:
    from eth_account import Account

    return Account.from_key(key).address.lower() if key else None
