"""The gateway's long-lived parts, built once from settings and passed explicitly."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from .cache import PrefixMemory
from .config import Settings, upstream_list
from .ledger import Store
from .ledger.store import credit_account
from .payments import build_scheme
from .payments.base import PaymentScheme
from .payments.chain import Chain
from .payments.x402 import V1_NETWORK_NAMES
from .pricing import Prices
from .quotes import QuoteSigner
from .settlement import Settler
from .upstream.client import Upstream, make_http_client, make_paying_client
from .upstream.router import Router


@dataclass
class Gateway:
    settings: Settings
    store: Store
    chain: Chain
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
    _clients: tuple[httpx.AsyncClient, ...]

    @classmethod
    async def open(cls, settings: Settings) -> Gateway:
        c = settings.chain
        missing = [f for f in ("rpc_url", "token", "payee", "settler_key") if not getattr(c, f)]
        upstreams = upstream_list(settings)
        if missing or not upstreams:
            raise ValueError(f"incomplete settings: chain.{', chain.'.join(missing)} / upstream.url")
        if not settings.models:
            raise ValueError('no models configured: add [models."<id>"] prices')
        upstream_http = make_http_client(upstreams)
        paying = {u.name: make_paying_client(u) for u in upstreams if u.payer_key}
        chain = Chain(c.rpc_url, c.read_cache_seconds)  # type: ignore[arg-type]
        chain_id = c.chain_id or await chain.chain_id()
        network = f"eip155:{chain_id}"
        v1_name = c.v1_network or V1_NETWORK_NAMES.get(chain_id)
        store = Store(settings.database_url)
        settler = Settler(
            store,
            chain,
            key=c.settler_key,  # type: ignore[arg-type]
            chain_id=chain_id,
            gas_limit=c.settle_gas_limit,
            max_fee_gwei=c.max_fee_gwei,
            priority_fee_gwei=c.priority_fee_gwei,
            payout_key=c.payout_key or (c.settler_key if _address_of(c.settler_key) == c.payee.lower() else None),  # type: ignore[union-attr]
            token=c.token,
        )
        gw = cls(
            settings=settings,
            store=store,
            chain=chain,
            schemes=[build_scheme(name, settings, chain, chain_id) for name in settings.schemes],
            settler=settler,
            router=Router(
                [Upstream(u, paying.get(u.name, upstream_http)) for u in upstreams],
                sticky_idle=settings.sticky_idle_seconds,
                cooldown=settings.failure_cooldown_seconds,
            ),
            prefixes=PrefixMemory(settings.cache_memory_seconds),
            quotes=QuoteSigner(settings.quote_secret),
            prices={m: Prices.of(p, c.decimals) for m, p in settings.models.items()},
            v1_names={v1_name: network} if v1_name else {},
            chain_id=chain_id,
            network=network,
            token=c.token,  # type: ignore[arg-type]
            _clients=(upstream_http, *paying.values()),
        )
        gw.close_abandoned_streams()
        await settler.start()
        return gw

    @property
    def v1_name_of(self) -> dict[str, str]:
        """CAIP-2 id → x402 v1 network name, for the networks served in v1."""
        return {network: name for name, network in self.v1_names.items()}

    def close_abandoned_streams(self) -> None:
        """Meter the streams a crashed process left open: their usage was never read, so — as any
        call without usage — each costs its quote (capped by what paid for it), and its hold ends.
        Only streams older than an hour (or twice the upstream read timeout), so that another
        replica's live streams are left alone; and a stream is metered once whoever gets there first."""
        cutoff = time.time() - max(3600, 2 * max(u.read_timeout for u in upstream_list(self.settings)))
        for row in self.store.abandoned_streams(cutoff):
            covered = row["paid"] + row["from_credit"]
            self.store.finish_call(
                credit_account(row["network"], row["asset"], row["payer"]),
                deposit=row["paid"],
                held=row["from_credit"],
                cost=min(row["quote"], covered),
                payment_id=row["payment_id"],
                call={
                    "id": row["id"],
                    "status": "incomplete",
                    "error": "the gateway stopped mid-stream",
                    "cost": min(row["quote"], covered),
                    "finished_at": time.time(),
                },
                insert_row=False,
            )

    async def close(self) -> None:
        await self.settler.stop()
        for client in self._clients:
            await client.aclose()
        await self.chain.close()
        self.store.close()


def _address_of(key: str | None) -> str | None:
    from eth_account import Account

    return Account.from_key(key).address.lower() if key else None
