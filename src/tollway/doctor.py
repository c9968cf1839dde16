"""Is this configuration fit to take real money? Every check the gateway makes before it serves.

``examine`` runs them all and reports each as ok / warn / fail with one line of detail — what
``tollway doctor`` prints, without serving. ``Gateway.open`` (and so ``tollway serve``) runs the
same checks and refuses to start on any failure (``Unfit``). Checked: the settings a real chain
needs, the chain behind the RPC (its id, the token's EIP-712 domain and decimals), keys that are
not the devnet's public ones, the gas and tokens of the accounts that send transactions, the
ledger (its schema, and that it holds this chain's money and no other's), quotes that fit the
ledger, and — for the doctor — each upstream's reachability and models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

import httpx
from eth_account import Account

from .config import DEVNET_CHAIN_ID, Settings, resolve_chain, upstream_list
from .devnet.anvil import DEV_KEYS
from .errors import ChainUnavailable
from .payments import eip3009
from .payments.chain import DOMAIN_SEPARATOR, Chain, RpcError, quantity
from .payments.channel import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    ZERO_ADDRESS,
)
from .payments.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS
from .pricing import MAX_AMOUNT, MAX_OUTPUT_TOKENS, Prices
from .settlement import BUMP, BUMP_AFTER, GWEI
from .upstream.client import ANTHROPIC_VERSION, Upstream

if TYPE_CHECKING:
    from .ledger import Store

DECIMALS = bytes.fromhex("313ce567")  # decimals()
DEV_ADDRESSES = {Account.from_key(k).address.lower() for k in DEV_KEYS}  # their keys are public
# Contracts no key moves tokens out of for us: money paid to one of them is gone.
CONTRACTS = {
    a.lower()
    for a in (
        PERMIT2_ADDRESS,
        UPTO_PROXY_ADDRESS,
        BATCH_SETTLEMENT_ADDRESS,
        ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    )
}


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | fail
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.what}: {self.detail}"


class Unfit(ValueError):
    """The configuration failed a check; one line per failure."""

    def __init__(self, failures: list[Finding]) -> None:
        super().__init__("\n".join(str(f) for f in failures))
        self.failures = failures


LEDGER_TOKENS = 10**6  # what one balance (a wallet's credit, a channel) must be able to hold, in tokens


def required(settings: Settings) -> list[Finding]:
    """What a gateway on a real chain must be told (the devnet fills these in itself), and an asset
    the ledger can count."""
    c, out = settings.chain, []
    for name in ("rpc_url", "token", "payee", "settler_key"):
        if not getattr(c, name):
            out.append(Finding("fail", f"chain.{name}", "not set"))
    room = MAX_AMOUNT // 10**c.decimals
    if room < LEDGER_TOKENS:
        out.append(
            Finding(
                "fail",
                "chain.decimals",
                f"{c.decimals} decimals leave the ledger's 64-bit integers room for {room:,} tokens (2**63 - 1 "
                "units): one wallet's credit or channel could pass it. Tokens of at most 12 decimals are supported",
            )
        )
    if not upstream_list(settings):
        out.append(Finding("fail", "upstream.url", "not set (or [[upstreams]] with a url each)"))
    if not settings.models:
        out.append(
            Finding(
                "fail",
                "models",
                'no model priced: add [models."<id>"] with prompt and completion, or an upstream `catalogue`'
                " that can be read",
            )
        )
    return out


async def chain_findings(settings: Settings, chain: Chain) -> tuple[list[Finding], int | None]:
    """The chain behind the RPC, the token and the accounts. Returns the findings and the chain id."""
    c = settings.chain
    try:
        chain_id = await chain.chain_id()
    except Exception as exc:
        return [Finding("fail", "chain.rpc_url", f"the RPC does not answer ({type(exc).__name__})")], None
    out = []
    if c.chain_id is not None and c.chain_id != chain_id:
        out.append(Finding("fail", "chain.chain_id", f"set to {c.chain_id} but the RPC serves chain {chain_id}"))
        return out, chain_id
    out.append(Finding("ok", "chain", f"eip155:{chain_id}"))
    token = str(c.token)
    try:
        domain = await chain.call(token, DOMAIN_SEPARATOR)
        decimals = await chain.call(token, DECIMALS)
    except RpcError:
        domain = decimals = b""
    if not domain:
        out.append(Finding("fail", "chain.token", f"{token} has no DOMAIN_SEPARATOR() on this chain"))
    elif domain != eip3009.domain_separator(c.token_name, c.token_version, chain_id, token):
        out.append(
            Finding(
                "fail",
                "chain.token_name/token_version",
                f"the token's EIP-712 domain is not name={c.token_name!r}, version={c.token_version!r}",
            )
        )
    else:
        out.append(Finding("ok", "chain.token", f"EIP-712 domain {c.token_name!r} version {c.token_version!r}"))
    if decimals and int.from_bytes(decimals[-32:], "big") != c.decimals:
        out.append(
            Finding("fail", "chain.decimals", f"set to {c.decimals}; the token has {int.from_bytes(decimals, 'big')}")
        )
    if chain_id != DEVNET_CHAIN_ID:
        if not settings.public_url:
            out.append(Finding("fail", "public_url", "required on a real chain: the URL clients reach the gateway at"))
        keys = {f"chain.{n}": getattr(c, n) for n in ("settler_key", "payout_key")}
        keys["channels.authorizer_key"] = settings.channels.authorizer_key  # (signs away a channel's money)
        keys.update({f"upstream {u.name}: payer_key": u.payer_key for u in upstream_list(settings)})
        public = [name for name, key in keys.items() if key and Account.from_key(key).address.lower() in DEV_ADDRESSES]
        public += ["chain.payee"] if str(c.payee).lower() in DEV_ADDRESSES else []
        out += [Finding("fail", name, "is a devnet account whose private key is public") for name in public]
    if str(c.payee).lower() in {ZERO_ADDRESS, token.lower(), *CONTRACTS}:
        out.append(Finding("fail", "chain.payee", f"{c.payee} is no account of yours: what is paid to it is lost"))
    settler = Account.from_key(c.settler_key).address if c.settler_key else None
    if settler:
        out.append(await gas_finding(chain, chain_id, "chain.settler_key", settler, "send settlements"))
    out.append(await fee_finding(settings, chain, chain_id))
    out.append(await simulation_finding(chain))
    payout = c.payout_key or (c.settler_key if settler and settler.lower() == str(c.payee).lower() else None)
    if payout:
        holder = Account.from_key(payout).address
        held = await chain.token_balance(token, holder)
        out.append(
            Finding(
                "ok" if held else "warn",
                "chain.payout_key",
                f"{holder} holds {held} units of the token (withdrawals are paid from it)",
            )
        )
        if holder != settler:
            out.append(await gas_finding(chain, chain_id, "chain.payout_key", holder, "pay withdrawals"))
    else:
        out.append(Finding("warn", "chain.payout_key", "not set: credit withdrawals are disabled"))
    return out, chain_id


async def gas_finding(chain: Chain, chain_id: int, what: str, account: str, sends: str) -> Finding:
    """Whether ``account`` holds gas to send what it ``sends`` (on a real chain, none is a failure)."""
    gas = quantity(await chain.request("eth_getBalance", [account, "latest"]))
    level = "ok" if gas else ("warn" if chain_id == DEVNET_CHAIN_ID else "fail")
    return Finding(
        level, what, f"{account} holds {gas / 10**18:g} of the gas token" + ("" if gas else f": it cannot {sends}")
    )


async def fee_finding(settings: Settings, chain: Chain, chain_id: int) -> Finding:
    """Whether settlements clear the chain's base fee: they bid ``max_fee_gwei`` (or 2 × the base fee
    + the tip), raised by ``BUMP`` every ``BUMP_AFTER`` while they wait, up to ``fee_ceiling_gwei``.
    A ceiling below the base fee means none is mined, and a fixed bid too low to be raised past it
    within ``settle_margin_seconds`` one mined after its payment expired: every payment taken
    meanwhile would be served, then never settle."""
    c = resolve_chain(settings, chain_id).chain
    base = await chain.base_fee()
    ceiling = int(Decimal(c.fee_ceiling_gwei) * GWEI)  # type: ignore[arg-type]
    tip = min(int(c.priority_fee_gwei * GWEI), ceiling)
    bid = min(int(c.max_fee_gwei * GWEI) if c.max_fee_gwei is not None else 2 * base + tip, ceiling)
    detail = f"settlements bid {bid / GWEI:g} gwei (ceiling {ceiling / GWEI:g}); the base fee is {base / GWEI:g} gwei"
    if bid >= base:
        return Finding("ok", "chain.fees", detail)
    level = "warn" if chain_id == DEVNET_CHAIN_ID else "fail"
    if ceiling < base:
        return Finding(level, "chain.fee_ceiling_gwei", f"{detail}: no settlement would be mined")
    if bid * BUMP ** int(settings.settle_margin_seconds // BUMP_AFTER) < base:
        return Finding(
            level, "chain.max_fee_gwei", f"{detail}: raised, it would clear it too late for payments to settle"
        )
    return Finding("warn", "chain.max_fee_gwei", f"{detail}: each settlement waits for its bid to be raised")


async def simulation_finding(chain: Chain) -> Finding:
    """Whether the RPC simulates payments that arrive together in one call (``Chain.simulate``)."""
    try:
        await chain.request("eth_simulateV1", [{"blockStateCalls": [{"calls": []}]}, "pending"])
    except ChainUnavailable as exc:  # (a JSON-RPC error, or an HTTP one: some providers refuse methods so)
        return Finding(
            "warn",
            "chain.rpc_url",
            f"no eth_simulateV1 ({str(exc)[:80]}): payments that arrive together are simulated one eth_call "
            "each, and the node replays its pending pool for each",
        )
    return Finding("ok", "chain.rpc_url", "simulates payments that arrive together in one eth_simulateV1")


async def upto_contracts(chain: Chain) -> bool:
    """Whether the chain has Permit2 and the x402 upto proxy at their canonical addresses."""
    return await _deployed(chain, PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS)


async def channel_contracts(chain: Chain) -> bool:
    """Whether the chain has the x402 batch-settlement escrow and its ERC-3009 deposit collector."""
    return await _deployed(chain, BATCH_SETTLEMENT_ADDRESS, ERC3009_DEPOSIT_COLLECTOR_ADDRESS)


async def _deployed(chain: Chain, *addresses: str) -> bool:
    codes = await chain.batch([("eth_getCode", [a, "latest"]) for a in addresses])
    return all(code not in (None, "0x", "0x0") for code in codes)


def least_payment_finding(resolved: Settings) -> Finding:
    """The least payment on chain and the least withdrawal (each worth its gas at the fee ceiling
    and the gas token's price, unless set): on a chain the defaults do not know, tens of dollars."""
    least, withdrawal = resolved.min_chain_payment_usd, resolved.min_withdrawal_usd
    detail = f"a payment on chain is at least {_usd(least)} USD, a withdrawal {_usd(withdrawal)} USD"
    if least is not None and least > 1:
        detail += (
            " (settlement gas at chain.fee_ceiling_gwei and chain.native_usd): set them for this chain,"
            " or min_chain_payment_usd"
        )
        return Finding("warn", "min_chain_payment_usd", detail)
    return Finding("ok", "min_chain_payment_usd", detail)


def _usd(amount: Decimal | None) -> str:
    return "-" if amount is None else f"{amount.normalize():f}"


def amounts_fit(settings: Settings, prices: dict[str, Prices]) -> list[Finding]:
    """A configuration whose largest quote could pass the ledger's 64-bit integers (an 18-decimal
    asset with a large body limit, say) is refused."""
    images = settings.max_body_bytes // 20  # the smallest image part is over 20 bytes of JSON
    out = []
    for model, p in prices.items():
        conf = settings.models[model]
        image_tokens = settings.image_token_allowance if conf.image_tokens is None else conf.image_tokens
        output = (conf.max_tokens or MAX_OUTPUT_TOKENS) * settings.max_choices
        largest = p.bound(settings.max_body_bytes + images * image_tokens, output, long_cache=True)
        if largest > MAX_AMOUNT:
            out.append(
                Finding(
                    "fail",
                    f"models.{model}",
                    f"a call could be quoted {largest} atomic units, more than the ledger holds (2**63 - 1): "
                    "lower max_body_bytes, the model's max_tokens or max_choices, or use fewer decimals",
                )
            )
    return out


def ledger_findings(store: Store, chain_id: int, genesis: str, settings: Settings) -> list[Finding]:
    """The ledger belongs to this chain (its id and genesis block): never mix two chains' money.
    And the gateway holds the key that claims what its channels owe: each claim is signed by the
    receiver authorizer its channel names, so a new ``channels.authorizer_key`` (or settlement key,
    its default) would leave every voucher charged before it unclaimable, the payers free to
    withdraw what their calls cost."""
    mine = f"eip155:{chain_id}/{genesis}"
    held = store.meta("chain", lambda: mine)
    if held != mine:
        return [
            Finding(
                "fail",
                "database_url",
                f"this ledger holds the money of {held}, not of {mine}: point database_url at this chain's ledger",
            )
        ]
    out = [Finding("ok", "database_url", f"ledger of {mine}")]
    key = settings.channels.authorizer_key or settings.chain.settler_key
    ours = Account.from_key(key).address.lower() if key else None
    for authorizer, owed in store.unclaimed_authorizers(time.time()).items():
        if authorizer != ours:
            detail = (
                f"channels owe {owed} units claimable only with the key of {authorizer}, which it no longer is:"
                " set it back until they are claimed"
            )
            out.append(Finding("fail", "channels.authorizer_key", detail))
    return out


async def upstream_findings(settings: Settings) -> list[Finding]:
    out = []
    async with httpx.AsyncClient(timeout=10) as http:
        for u in upstream_list(settings):
            # (its key in its own header, as its calls send it; Anthropic's API asks for its version too)
            headers = {**Upstream(u, None).headers, "anthropic-version": ANTHROPIC_VERSION}  # type: ignore[arg-type]
            try:
                r = await http.get(str(u.url).rstrip("/") + "/models", headers=headers)
            except httpx.HTTPError as exc:
                out.append(Finding("fail", f"upstream {u.name}", f"unreachable ({type(exc).__name__})"))
                continue
            if r.status_code != 200:
                out.append(Finding("fail", f"upstream {u.name}", f"GET /models answered {r.status_code}"))
                continue
            try:
                offered = {m.get("id") for m in r.json().get("data", [])}
            except (ValueError, AttributeError):
                offered = set()
            served = [m for m in settings.models if not u.models or m in u.models]
            missing = [settings.models[m].upstream_model or m for m in served]
            missing = [m for m in missing if offered and m not in offered]
            out.append(
                Finding(
                    "warn" if missing else "ok",
                    f"upstream {u.name}",
                    f"does not list {', '.join(missing)}" if missing else f"serves {len(served)} models",
                )
            )
    return out


async def genesis_hash(chain: Chain) -> str:
    block = await chain.request("eth_getBlockByNumber", ["0x0", False])
    return str(block["hash"])


async def catalogue_findings(settings: Settings) -> tuple[Settings, list[Finding]]:
    """Each upstream catalogue read (``model_import.py``); the settings with what they offer, at
    the prices their upstreams serve them at (``upstream_prices.py``: what quotes must cover)."""
    import httpx

    from .model_import import Catalogues
    from .upstream_prices import by_upstream

    catalogues = Catalogues(settings)
    out = []
    if catalogues.wanted:
        async with httpx.AsyncClient() as http:
            models = await catalogues.load(http)
        for u in upstream_list(settings):
            if u.catalogue:
                n = len(catalogues.served.get(u.name, ()))
                level = "ok" if n else "warn"
                out.append(Finding(level, f"upstream {u.name} catalogue", f"{n} models imported from {u.catalogue}"))
        settings = settings.model_copy(update={"models": models})
    return by_upstream(settings, catalogues.priced, catalogues.settings.models), out


async def examine(settings: Settings) -> list[Finding]:
    """Every check, for ``tollway doctor``."""
    from .ledger import Store

    settings, out = await catalogue_findings(settings)
    out += required(settings)
    if any(f.level == "fail" for f in out):
        return out
    chain = Chain(str(settings.chain.rpc_url))
    try:
        found, chain_id = await chain_findings(settings, chain)
        out += found
        if chain_id is None:
            return out
        if "upto" in settings.schemes and not await upto_contracts(chain):
            out.append(Finding("warn", "schemes", "upto needs Permit2 and the x402 upto proxy, absent on this chain"))
        resolved = resolve_chain(settings, chain_id)
        out.append(least_payment_finding(resolved))
        out += amounts_fit(resolved, {m: Prices.of(p, resolved.chain.decimals) for m, p in resolved.models.items()})
        try:
            store = Store(settings.database_url)
        except Exception as exc:
            out.append(Finding("fail", "database_url", f"cannot open the ledger ({type(exc).__name__}: {exc})"[:200]))
        else:
            out += ledger_findings(store, chain_id, await genesis_hash(chain), settings)
            store.close()
    finally:
        await chain.close()
    return out + await upstream_findings(settings)
