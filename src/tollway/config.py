"""Settings: one typed object, from ``tollway.toml`` and ``TOLLWAY_*`` environment variables.

Nested fields use ``__`` in the environment: ``TOLLWAY_CHAIN__RPC_URL``, ``TOLLWAY_UPSTREAM__URL``;
any variable may instead name a file holding the value, with ``_FILE`` appended
(``TOLLWAY_CHAIN__SETTLER_KEY_FILE=/run/secrets/settler_key``). Unknown keys are refused at every
level, addresses and keys are checked for shape, and values left from the example (``0x...``,
``change-me``) are refused: a typo must never turn a mainnet configuration into something else.
Prices are exact decimals in USD per token (OpenRouter's convention).
"""

from __future__ import annotations

import ipaddress
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
PRIVATE_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")
# What the example files leave to fill in ("0x<FILL: ...>", "sk-or-..."). A refused value is never
# echoed: it may be a secret, and the refusal goes to a log.
PLACEHOLDERS = ("change-me", "yourpayee", "your-")  # (in any case; and "FILL", in capitals)


def _not_placeholder(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if "FILL" in value or any(p in value.lower() for p in PLACEHOLDERS) or value.endswith("..."):
        raise ValueError(f"{what} still holds the example's placeholder: set a real value")
    return value


def _address(value: str | None, what: str) -> str | None:
    if value is not None and not ADDRESS.match(value):
        raise ValueError(f"{what} must be a 0x-prefixed 20-byte hex address (not shown: {len(value)} characters)")
    return value


def _key(value: str | None, what: str) -> str | None:
    if value is not None and not PRIVATE_KEY.match(value):
        raise ValueError(f"{what} must be a 32-byte hex private key (64 hex digits)")
    return value


def _url(value: str | None, what: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    if value is not None:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            scheme = parts.scheme if parts.scheme.isalnum() else "none"
            wanted = "/".join(schemes)
            raise ValueError(f"{what} must be a {wanted} URL with a host (not shown: its scheme is {scheme})")
    return value


class Strict(BaseModel):
    """Configuration sections refuse unknown keys: a typo must not silently change behaviour."""

    model_config = ConfigDict(extra="forbid")


class PriceTier(Strict):
    """A long-context tier: from ``min_prompt_tokens`` prompt tokens on (cached ones included), a
    call is billed at the prices it names (OpenRouter's ``pricing.overrides``). ``Price.tier_prices``
    says what it bills at those it leaves unnamed."""

    min_prompt_tokens: int = Field(ge=1)
    prompt: Decimal | None = Field(None, ge=0)
    completion: Decimal | None = Field(None, ge=0)
    request: Decimal | None = Field(None, ge=0)
    cache_read: Decimal | None = Field(None, ge=0)
    cache_write: Decimal | None = Field(None, ge=0)
    cache_write_1h: Decimal | None = Field(None, ge=0)


class Price(Strict):
    """What one model costs, in USD per token (``request`` is per call)."""

    prompt: Decimal
    completion: Decimal
    request: Decimal = Decimal(0)
    cache_read: Decimal | None = None  # defaults to the prompt price
    cache_write: Decimal | None = None  # defaults to the prompt price
    # Anthropic's one-hour cache writes; a request marking `cache_control.ttl: "1h"` is refused without it
    cache_write_1h: Decimal | None = None
    tiers: list[PriceTier] = []  # dearer prices for long prompts, by ascending min_prompt_tokens

    def per_token(self) -> dict[str, Decimal]:
        """The prices, the cache ones defaulting to the prompt price (``cache_write_1h`` only when set)."""
        prices = {
            "prompt": self.prompt,
            "completion": self.completion,
            "request": self.request,
            "cache_read": self.prompt if self.cache_read is None else self.cache_read,
            "cache_write": self.prompt if self.cache_write is None else self.cache_write,
        }
        if self.cache_write_1h is not None:
            prices["cache_write_1h"] = self.cache_write_1h
        return prices

    def tier_prices(self) -> list[tuple[int, dict[str, Decimal]]]:
        """Each tier's threshold and prices (``per_token``'s keys): what it names, else the base's —
        but a cache price it leaves unnamed moves with its prompt price (a vendor's cache discount and
        write premium are multiples of the prompt price: Anthropic's long-context writes bill 1.25× its
        long-context input), never below the base's own."""
        base = self.per_token()
        out = []
        for t in self.tiers:
            named = t.model_dump(exclude={"min_prompt_tokens"}, exclude_none=True)
            ratio = named.get("prompt", base["prompt"]) / base["prompt"] if base["prompt"] else Decimal(1)
            prices = {k: named.get(k, max(v, v * ratio) if k.startswith("cache") else v) for k, v in base.items()}
            out.append((t.min_prompt_tokens, prices))
        return out

    def tier_at(self, prompt_tokens: int) -> dict[str, Decimal]:
        """The prices (``per_token``'s keys) a prompt of ``prompt_tokens`` bills at: its tier's, or the base's."""
        found = self.per_token()
        for threshold, prices in self.tier_prices():
            if prompt_tokens >= threshold:
                found = prices
        return found

    def price(self) -> Price:
        """Its prices alone."""
        return Price(**{f: getattr(self, f) for f in Price.model_fields})

    @field_validator("prompt", "completion", "request", "cache_read", "cache_write", "cache_write_1h")
    @classmethod
    def _non_negative(cls, v: Decimal | None) -> Decimal | None:
        if v is not None and v < 0:
            raise ValueError("prices must be >= 0")
        return v

    @field_validator("tiers")
    @classmethod
    def _ascending(cls, v: list[PriceTier]) -> list[PriceTier]:
        thresholds = [t.min_prompt_tokens for t in v]
        if thresholds != sorted(set(thresholds)):
            raise ValueError("tiers must be in ascending order of min_prompt_tokens, each its own")
        return v


class ModelPrice(Price):
    """A model on offer: its (list) price, and how it is served."""

    upstream_model: str | None = None  # the id to send upstream, when it differs
    max_tokens: int | None = Field(None, ge=1)  # cap on output tokens for this model
    image_tokens: int | None = Field(None, ge=0)  # prompt tokens an image may cost (default: image_token_allowance)
    # The most output tokens one streamed event carries: a stream that ends without usage is charged
    # its delivered events at this many tokens each (never more than its quote).
    max_tokens_per_event: int = Field(16, ge=1)
    # What GET /v1/models tells of it (OpenRouter's fields; an imported catalogue fills them in)
    # Served without payment, up to the free tier's daily quotas (free_calls_per_address, _per_wallet)
    free: bool = False
    name: str | None = None
    context_length: int | None = Field(None, ge=1)
    supported_parameters: list[str] | None = None


class ChainSettings(Strict):
    rpc_url: str | None = None  # None: start or attach to the local devnet
    chain_id: int | None = None  # None: asked from the RPC at start
    token: str | None = None  # EIP-3009 stablecoin (USD-pegged, 1 token = 1 USD)
    token_name: str = "USD Coin"  # its EIP-712 domain name ...
    token_version: str = "2"  # ... and version (checked against the token's DOMAIN_SEPARATOR at start)
    decimals: int = Field(6, ge=0, le=36)
    payee: str | None = None  # who receives payments
    settler_key: str | None = None  # pays gas for settlement transactions
    v1_network: str | None = None  # x402 v1 name of this chain, if it has one (e.g. "base")
    settle_gas_limit: int = Field(250_000, ge=21_000)  # an upto settlement with an EIP-2612 permit takes ~200,000
    max_fee_gwei: Decimal | None = Field(None, gt=0)  # None: 2 x base fee + tip, refreshed in the background
    priority_fee_gwei: Decimal = Field(Decimal("0.001"), ge=0)
    # The most the settlement worker bids per gas when it bumps a stuck transaction's fees.
    # None: by chain (FEE_CEILING_GWEI); on a chain not listed there, 100 gwei.
    fee_ceiling_gwei: Decimal | None = Field(None, gt=0)
    # USD price of the chain's gas token, to size the smallest on-chain payment worth its gas.
    # None: 0 on the devnet, NATIVE_USD_DEFAULT elsewhere (an ETH price with head room).
    native_usd: Decimal | None = Field(None, ge=0)
    # Blocks a transfer (transfer scheme) needs on top of its own before it pays, and a revert of
    # the gateway's own transaction before it is believed. None: by chain (TRANSFER_CONFIRMATIONS;
    # 0 on the devnet, where nothing reorganises).
    confirmations: int | None = Field(None, ge=0)
    payout_key: str | None = None  # holds the payee's tokens to pay withdrawals (default: settler if it is the payee)

    @field_validator("token", "payee")
    @classmethod
    def _addresses(cls, v: str | None, info: Any) -> str | None:
        return _address(_not_placeholder(v, f"chain.{info.field_name}"), f"chain.{info.field_name}")

    @field_validator("settler_key", "payout_key")
    @classmethod
    def _keys(cls, v: str | None, info: Any) -> str | None:
        return _key(_not_placeholder(v, f"chain.{info.field_name}"), f"chain.{info.field_name}")

    @field_validator("rpc_url")
    @classmethod
    def _rpc(cls, v: str | None) -> str | None:
        return _url(_not_placeholder(v, "chain.rpc_url"), "chain.rpc_url", ("http", "https"))


class UpstreamSettings(Strict):
    name: str = "default"
    url: str | None = None  # OpenAI-compatible base URL ending in /v1; None: built-in mock
    api_key: str | None = None
    models: list[str] = Field(default_factory=list)  # models it serves; empty: all
    # The output-cap field this upstream reads, added when a request sets none (llama.cpp also
    # reads n_predict, some servers only max_completion_tokens).
    max_tokens_field: str = "max_tokens"
    # Where usage can be read after the fact, for a stream that ended without it: "openrouter"
    # (GET <url>/generation?id=...), or "none". None: "openrouter" for openrouter.ai URLs.
    usage_lookup: Literal["openrouter", "none"] | None = None
    # Whether it routes between providers itself (OpenRouter does): it then gets the request's
    # `provider` object, with max_price at most tollway's prices; any other upstream gets none.
    # None: true for openrouter.ai URLs.
    provider_routing: bool | None = None
    # When the upstream is itself a paid gateway (another tollway): the wallet that pays it, the
    # assets it may pay in ("eip155:<chain>:<token>") and the most it may pay per call (never more
    # than this gateway's own quote for the call) and in all.
    payer_key: str | None = None
    pay_assets: list[str] = Field(default_factory=list)
    pay_max_usd_per_call: Decimal = Field(Decimal("1"), ge=0)
    pay_max_usd_total: Decimal = Field(Decimal("100"), ge=0)
    # An OpenRouter-style catalogue (the JSON of GET /api/v1/models) to import models and prices from:
    # its URL, or the path of a saved copy. Imported prices get `markup` (0.05: +5%); a model priced in
    # [models] keeps that price. import_all: every imported model is offered, else only those in `models`.
    catalogue: str | None = None
    markup: Decimal = Field(Decimal(0), ge=0)
    import_all: bool = True
    # Its own prices for models it serves (USD per token, the fields of [models]), when they differ
    # from the model's: the calls it serves are billed at them, and a model's quote covers the
    # dearest of its upstreams (upstream_prices.py). An imported catalogue's prices are its own too.
    prices: dict[str, Price] = Field(default_factory=dict)
    # It takes a payer's own key (BYOK: the X-Provider-Key header) in place of api_key, for byok_fee.
    byok: bool = False
    # The APIs it speaks: chat (POST <url>/chat/completions), embeddings (POST <url>/embeddings),
    # Anthropic's messages (POST <url>/messages), OpenAI's responses (POST <url>/responses).
    surfaces: list[Literal["chat", "embeddings", "messages", "responses"]] = Field(
        default_factory=lambda: ["chat", "embeddings", "messages", "responses"]
    )
    # The header its key goes in: "authorization" (Bearer) or "x-api-key" (Anthropic's API).
    # None: x-api-key for api.anthropic.com, else authorization.
    key_header: Literal["authorization", "x-api-key"] | None = None
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(120.0, gt=0)  # between bytes, not total (a call's total is max_call_seconds)
    max_connections: int = Field(256, ge=1)

    @field_validator("url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        return _url(_not_placeholder(v, "upstream url"), "upstream url")

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: str | None) -> str | None:
        return _not_placeholder(v, "upstream api_key")

    @field_validator("payer_key")
    @classmethod
    def _payer_key(cls, v: str | None) -> str | None:
        return _key(_not_placeholder(v, "upstream payer_key"), "upstream payer_key")

    @model_validator(mode="after")
    def _pays_in_something(self) -> UpstreamSettings:
        if self.payer_key and not self.pay_assets:
            raise ValueError(f"upstream {self.name}: payer_key needs pay_assets ('eip155:<chain>:<token>')")
        return self

    @model_validator(mode="after")
    def _prices_of_served(self) -> UpstreamSettings:
        unserved = sorted(set(self.prices) - set(self.models)) if self.models else []
        if unserved:
            raise ValueError(f"upstream {self.name}: prices for models it does not serve (its models): {unserved}")
        return self


class ChannelSettings(Strict):
    """x402 ``batch-settlement`` channels: what a channel must be, and when its vouchers are claimed."""

    # The payer's escape hatch: how long a withdrawal waits, in which time every voucher is claimed.
    withdraw_delay_seconds: int = Field(86_400, ge=900, le=2_592_000)
    min_deposit_calls: int = Field(10, ge=1)  # the least deposit (extra.minDeposit): this many quotes
    authorizer_key: str | None = None  # signs claim batches and refunds (default: chain.settler_key)
    # Claim what vouchers owe us every so often, or sooner once it reaches the threshold, in one
    # transaction for many channels; a channel whose payer started a withdrawal is claimed at once.
    claim_interval_seconds: float = Field(3600, gt=0)
    claim_threshold_usd: Decimal = Field(Decimal(5), ge=0)
    watch_seconds: float = Field(30, gt=0)  # how often channels with unclaimed charges are read on chain
    max_claims_per_transaction: int = Field(50, ge=1, le=200)

    @field_validator("authorizer_key")
    @classmethod
    def _authorizer_key(cls, v: str | None) -> str | None:
        return _key(_not_placeholder(v, "channels.authorizer_key"), "channels.authorizer_key")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOLLWAY_", env_nested_delimiter="__", extra="forbid", toml_file="tollway.toml"
    )

    host: str = "127.0.0.1"
    port: int = Field(8402, ge=0, le=65535)
    public_url: str | None = None  # how clients reach us (x402 `resource.url`, the origin our messages name)
    database_url: str = "sqlite:///var/tollway.sqlite3"
    devnet_file: Path = Path("var/devnet.json")
    quote_secret: str | None = None  # None: one generated once and kept in the ledger (so replicas agree)
    admin_token: str | None = None  # bearer token for private endpoints (health details, any receipt)
    quote_ttl_seconds: int = Field(120, ge=10)  # how long a 402 quote can be paid
    # The longest a call may take from its arrival: a non-streamed call is abandoned (and not
    # charged) after it, a stream is ended there with an error event. A payment must stay valid
    # this long plus settle_margin_seconds, so that its settlement can still be mined — also that of
    # a stream a crash left open, metered by another process within ~25 s of max_call_seconds (one
    # waiting for its usage after the fact: a quarter of settle_margin_seconds more).
    max_call_seconds: int = Field(300, ge=1)
    # Idempotent calls (payment-identifier, Idempotency-Key): whether a payment must carry an id,
    # how long an answer is kept for a repeat, and the largest body kept (else its receipt is).
    payment_identifier_required: bool = False
    idempotency_ttl_seconds: int = Field(86400, ge=60)
    idempotency_max_body_bytes: int = Field(1 << 20, ge=0)
    settle_margin_seconds: int = Field(60, ge=30)
    # A non-streamed call that took longer than this since its payment was checked on chain (every
    # upstream it was tried on counts) is checked again before its answer is released: funds moved
    # or an authorization cancelled while it ran means no answer.
    recheck_after_seconds: float = Field(0.25, ge=0)
    # A stream paid by a metered payment that can lapse (upto) settles only when it ends: it is
    # checked on chain again this often while it runs, and cut once its payment no longer covers it.
    stream_recheck_seconds: float = Field(2.0, ge=0.5)  # (each check: a ledger read and a simulation)
    # The output cap of a request that sets none: what a payment of the bound (exact) is priced
    # for, and what a metered payment (upto, credit) may reach — it pays only what is used, but
    # its maximum should stay under common client spend caps (the official x402 client's: $1).
    default_max_tokens: int = Field(1024, ge=1)
    metered_max_tokens: int = Field(16_384, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Prompt tokens priced per image part (per model: image_tokens): what a high-resolution image may
    # cost the common vision models at their text price — Qwen2.5-VL's default maximum, 16,384.
    image_token_allowance: int = Field(16_384, ge=0)
    max_choices: int = Field(8, ge=1)  # the largest `n` (choices per call) priced; more is refused
    # The smallest on-chain payment asked: a settlement costs gas, so an exact payment is never
    # smaller than what its settlement can cost at the fee ceiling (None: computed from
    # chain.fee_ceiling_gwei, the settlement's gas and chain.native_usd; at least 0.001).
    min_chain_payment_usd: Decimal | None = Field(None, ge=0)
    # The smallest withdrawal of credit: each is a token transfer whose gas the gateway pays (None:
    # that transfer's gas at the fee ceiling, at least 0.01).
    min_withdrawal_usd: Decimal | None = Field(None, ge=0)
    # Browser origins allowed to call the API (CORS; no cookies are used, so "*" is safe). [] turns CORS off.
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    # Payment schemes offered, by registry name (upto only where Permit2 and the x402 upto proxy exist,
    # batch-settlement only where the x402 batch-settlement escrow does).
    schemes: list[str] = ["upto", "exact", "transfer", "credit", "batch-settlement"]
    # MPP (HTTP Payment authentication, evm charge) next to x402 in every 402, where exact is offered;
    # its realm is part of every challenge (and of the nonce a payer signs).
    mpp: bool = True
    mpp_realm: str = "tollway"
    # MPP's hash credential (a transfer already sent) binds nothing to its challenge: whoever sees the
    # transaction first could present it. Taken for calls up to this much (USD); 0: never.
    mpp_hash_max_usd: Decimal = Field(Decimal(0), ge=0)
    chain: ChainSettings = ChainSettings()
    channels: ChannelSettings = ChannelSettings()
    upstream: UpstreamSettings = UpstreamSettings()  # the upstream, when there is one
    upstreams: list[UpstreamSettings] = Field(default_factory=list)  # several, in order of preference
    sticky_idle_seconds: float = Field(600, ge=0)  # a conversation stays on its upstream this long after its last call
    failure_cooldown_seconds: float = Field(5, ge=0)  # an upstream that failed is tried last for this long (doubling)
    probe_seconds: float = Field(2, gt=0)  # how often an upstream that did not answer at all is asked again
    cache_memory_seconds: float = Field(300, ge=0)  # how long a prompt prefix is remembered as cacheable on an upstream
    stats_refresh_seconds: float = Field(5, gt=0)  # how often live stats read the calls that finished (stats.py)
    catalogue_refresh_seconds: float = Field(3600, gt=0)  # how often imported catalogues are read again
    # The free tier (models marked free): calls a day (UTC) per client address, per wallet that
    # signs in, and for all of them together; and the proxies whose X-Forwarded-For names the
    # client (IPs or networks; none by default).
    free_calls_per_address: int = Field(20, ge=0)
    free_calls_per_wallet: int = Field(20, ge=0)
    free_calls_per_day: int = Field(1000, ge=0)  # all clients together
    trusted_proxies: list[str] = Field(default_factory=list)
    # What a call that brings its own provider key (X-Provider-Key) pays: this share of the list price.
    byok_fee: Decimal = Field(Decimal("0.05"), ge=0, le=1)
    models: dict[str, ModelPrice] = Field(default_factory=dict)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        """Each entry as uvicorn reads it: uvicorn parses networks strictly, and takes one with host
        bits set ("172.18.0.5/16") for a name that matches no address — trusting no proxy at all."""
        normalised = []
        for entry in v:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network") from None
            normalised.append(str(network) if "/" in entry else str(network.network_address))
        return normalised

    @field_validator("schemes")
    @classmethod
    def _known_schemes(cls, v: list[str]) -> list[str]:
        from .payments import SCHEMES  # (a registry of names: nothing is imported with it)

        unknown = [name for name in v if name not in SCHEMES]
        if unknown:
            raise ValueError(f"unknown payment schemes {unknown}; known: {', '.join(SCHEMES)}")
        return v

    @model_validator(mode="after")
    def _upstream_names(self) -> Settings:
        upstream_list(self)  # (raises for two of one name)
        return self

    @field_validator("quote_secret", "admin_token")
    @classmethod
    def _secrets(cls, v: str | None, info: Any) -> str | None:
        _not_placeholder(v, info.field_name)
        if v is not None and len(v) < 16:
            raise ValueError(f"{info.field_name} must be at least 16 characters")
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        """Its scheme and host in lower case: the origin a signed message must name is compared in
        lower case, and whatever tollway declares from public_url (a sign-in's URI) must match it."""
        v = _url(_not_placeholder(v, "public_url"), "public_url")
        if v is None:
            return None
        parts = urlsplit(v)
        return parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()

    @model_validator(mode="after")
    def _claims_beat_withdrawals(self) -> Settings:
        """Every voucher is claimed before a payer's withdrawal can finish: the claimer must see the
        withdrawal (``watch_seconds``), a call holding the channel must end and be charged
        (``max_call_seconds``), and the claim be mined (``settle_margin_seconds``) — twice over,
        within the delay. A shorter delay would let a payer take back what was charged."""
        k = self.channels
        needed = 2 * (k.watch_seconds + self.max_call_seconds + self.settle_margin_seconds)
        if "batch-settlement" in self.schemes and k.withdraw_delay_seconds < needed:
            raise ValueError(
                f"channels.withdraw_delay_seconds ({k.withdraw_delay_seconds}) must be at least twice "
                "channels.watch_seconds + max_call_seconds + settle_margin_seconds "
                f"({needed:g}): every voucher must be claimed before a payer's withdrawal can finish"
            )
        return self

    @property
    def offer_timeout_seconds(self) -> int:
        """x402 ``maxTimeoutSeconds`` offered: the call, the settlement margin and clock skew."""
        return self.max_call_seconds + self.settle_margin_seconds + CLOCK_SKEW_SECONDS

    @property
    def min_validity_seconds(self) -> int:
        """How long, from now, a payment authorization must stay valid to be accepted."""
        return self.max_call_seconds + self.settle_margin_seconds

    @property
    def usage_wait_seconds(self) -> float:
        """How long after its arrival a stream without usage may wait for its upstream's record of
        it (then it is metered by its estimate): its payment must still settle after that — also
        when the process waiting dies, and another's sweep meters it up to ~15 s later."""
        return self.max_call_seconds + self.settle_margin_seconds / 4

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            EnvWithFiles(settings_cls),
            TomlConfigSettingsSource(settings_cls, toml_file=config_path()),
        )


class EnvWithFiles(EnvSettingsSource):
    """``TOLLWAY_*`` variables, where ``TOLLWAY_X_FILE=/path`` sets ``TOLLWAY_X`` to what the file
    holds (docker secrets, keys kept out of the environment) — unless ``X_FILE`` is itself a
    setting (``TOLLWAY_DEVNET_FILE``)."""

    def _load_env_vars(self) -> Any:
        env = dict(super()._load_env_vars())
        own = {f"tollway_{name}" for name in self.settings_cls.model_fields}
        files = [k for k in env if k.lower().startswith("tollway_") and k.lower().endswith("_file")]
        for name in [k for k in files if k.lower() not in own]:
            target, path = name[: -len("_file")], env.pop(name)
            if target in env:
                raise ValueError(f"both {target.upper()} and {name.upper()} are set: keep one")
            try:
                env[target] = Path(str(path)).read_text().strip()
            except OSError as exc:
                raise ValueError(f"{name.upper()}: cannot read {path}: {exc.strerror}") from None
        return env


def config_path() -> Path:
    return Path(os.environ.get("TOLLWAY_CONFIG", "tollway.toml"))


def configured() -> bool:
    """Whether anything is configured at all: a configuration file, or a ``TOLLWAY_*`` variable
    (other than ``TOLLWAY_CONFIG``). With nothing, ``tollway serve`` runs the local devnet."""
    return config_path().exists() or any(
        k.upper().startswith("TOLLWAY_") and k.upper() not in ("TOLLWAY_CONFIG", "TOLLWAY_KEY", "TOLLWAY_ANVIL")
        for k in os.environ
    )


CLOCK_SKEW_SECONDS = 30
DEVNET_CHAIN_ID = 31337
NATIVE_USD_DEFAULT = Decimal(5000)
FEE_CEILING_GWEI = {DEVNET_CHAIN_ID: Decimal(100), 8453: Decimal("0.5"), 84532: Decimal("0.5")}
TRANSFER_CONFIRMATIONS = {DEVNET_CHAIN_ID: 0, 1: 12, 8453: 10, 84532: 10}  # default elsewhere: 12
SETTLEMENT_GAS_ESTIMATE = 70_000  # gas an EIP-3009 settlement uses (about 60,000 on USDC)
PAYOUT_GAS_ESTIMATE = 65_000  # gas of an ERC-20 transfer to a new holder


DEVNET_MODELS: dict[str, dict[str, Any]] = {
    # Prices used with the mock upstream when no models are configured.
    "mock/echo": {
        "prompt": "0.000001",
        "completion": "0.000002",
        "cache_read": "0.0000001",
        "cache_write": "0.00000125",
    },
    "mock/echo-large": {
        "prompt": "0.00001",
        "completion": "0.00003",
        "request": "0.0001",
        "cache_read": "0.000001",
        "cache_write": "0.0000125",
    },
}


def upstream_list(settings: Settings) -> list[UpstreamSettings]:
    """The configured upstreams: ``upstreams``, or the single ``upstream``."""
    found = [u for u in settings.upstreams if u.url] or ([settings.upstream] if settings.upstream.url else [])
    names = [u.name for u in found]
    if len(set(names)) != len(names):
        raise ValueError(f"upstream names must be unique: {names}")
    return found


def apply_devnet(settings: Settings, devnet: Any, upstream_url: str | None = None) -> Settings:
    """Fill what is not configured from a devnet description (``tollway.devnet.Devnet``).

    With no upstream configured, ``upstream_url`` (the mock) is used, and with no models, the
    mock's price list.
    """
    c = settings.chain
    chain = c.model_copy(
        update={
            "rpc_url": c.rpc_url or devnet.rpc_url,
            "chain_id": c.chain_id or devnet.chain_id,
            "token": c.token or devnet.token,
            "token_name": devnet.token_name,
            "token_version": devnet.token_version,
            "decimals": devnet.decimals,
            "payee": c.payee or devnet.payee,
            "settler_key": c.settler_key or devnet.settler_key,
        }
    )
    update: dict[str, Any] = {"chain": chain}
    if not settings.upstream.url and upstream_url:
        update["upstream"] = settings.upstream.model_copy(update={"url": upstream_url})
    if not settings.models:
        update["models"] = {k: ModelPrice(**v) for k, v in DEVNET_MODELS.items()}
    return settings.model_copy(update=update)


def resolve_chain(settings: Settings, chain_id: int) -> Settings:
    """The settings with the chain's id and its by-chain defaults filled in (see the tables above)."""
    c = settings.chain
    devnet = chain_id == DEVNET_CHAIN_ID
    chain = c.model_copy(
        update={
            "chain_id": chain_id,
            "fee_ceiling_gwei": c.fee_ceiling_gwei
            if c.fee_ceiling_gwei is not None
            else FEE_CEILING_GWEI.get(chain_id, Decimal(100)),
            "native_usd": c.native_usd if c.native_usd is not None else (Decimal(0) if devnet else NATIVE_USD_DEFAULT),
            "confirmations": c.confirmations
            if c.confirmations is not None
            else TRANSFER_CONFIRMATIONS.get(chain_id, 12),
        }
    )
    gas_usd = chain.fee_ceiling_gwei * chain.native_usd / 10**9  # type: ignore[operator]
    least = settings.min_chain_payment_usd
    if least is None:
        least = max(Decimal("0.001"), SETTLEMENT_GAS_ESTIMATE * gas_usd)
    withdrawal = settings.min_withdrawal_usd
    if withdrawal is None:
        withdrawal = max(Decimal("0.01"), PAYOUT_GAS_ESTIMATE * gas_usd)
    update = {"chain": chain, "min_chain_payment_usd": least, "min_withdrawal_usd": withdrawal}
    return settings.model_copy(update=update)
