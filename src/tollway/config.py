"""Settings: one typed object, from ``tollway.toml`` and ``TOLLWAY_*`` environment variables.

Nested fields use ``__`` in the environment: ``TOLLWAY_CHAIN__RPC_URL``, ``TOLLWAY_UPSTREAM__URL``.
With no chain configured the CLI starts a local devnet; with no upstream URL it serves the
built-in mock upstream. Prices are exact decimals in USD per token (OpenRouter's convention).
"""

from __future__ import annotations

import os
import secrets
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ModelPrice(BaseModel):
    """What one model costs, in USD per token (``request`` is per call)."""

    prompt: Decimal
    completion: Decimal
    request: Decimal = Decimal(0)
    cache_read: Decimal | None = None  # defaults to the prompt price
    cache_write: Decimal | None = None  # defaults to the prompt price
    upstream_model: str | None = None  # the id to send upstream, when it differs
    max_tokens: int | None = None  # cap on output tokens for this model

    def per_token(self) -> dict[str, Decimal]:
        """All five prices, the cache ones defaulting to the prompt price."""
        return {
            "prompt": self.prompt,
            "completion": self.completion,
            "request": self.request,
            "cache_read": self.prompt if self.cache_read is None else self.cache_read,
            "cache_write": self.prompt if self.cache_write is None else self.cache_write,
        }

    @field_validator("prompt", "completion", "request", "cache_read", "cache_write")
    @classmethod
    def _non_negative(cls, v: Decimal | None) -> Decimal | None:
        if v is not None and v < 0:
            raise ValueError("prices must be >= 0")
        return v


class ChainSettings(BaseModel):
    rpc_url: str | None = None  # None: start or attach to the local devnet
    chain_id: int | None = None  # None: asked from the RPC at start
    token: str | None = None  # EIP-3009 stablecoin (USD-pegged, 1 token = 1 USD)
    token_name: str = "USD Coin"  # its EIP-712 domain name ...
    token_version: str = "2"  # ... and version
    decimals: int = 6
    payee: str | None = None  # who receives payments
    settler_key: str | None = None  # pays gas for settlement transactions
    v1_network: str | None = None  # x402 v1 name of this chain, if it has one (e.g. "base")
    settle_gas_limit: int = 150_000
    max_fee_gwei: Decimal | None = None  # None: 2 x base fee + tip, refreshed in the background
    priority_fee_gwei: Decimal = Decimal("0.001")
    read_cache_seconds: float = 2.0
    confirmations: int = 0  # blocks after a transfer's own before it pays (transfer scheme)
    payout_key: str | None = None  # holds the payee's tokens to pay withdrawals (default: settler if it is the payee)


class UpstreamSettings(BaseModel):
    name: str = "default"
    url: str | None = None  # OpenAI-compatible base URL ending in /v1; None: built-in mock
    api_key: str | None = None
    models: list[str] = Field(default_factory=list)  # models it serves; empty: all
    # When the upstream is itself a paid gateway (another tollway): the wallet that pays it, the
    # assets it may pay in ("eip155:<chain>:<token>") and the most it may pay per call.
    payer_key: str | None = None
    pay_assets: list[str] = Field(default_factory=list)
    pay_max_usd_per_call: Decimal = Decimal("1")
    connect_timeout: float = 5.0
    read_timeout: float = 120.0  # between bytes, not total
    max_connections: int = 256


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOLLWAY_", env_nested_delimiter="__", extra="forbid", toml_file="tollway.toml"
    )

    host: str = "127.0.0.1"
    port: int = 8402
    public_url: str | None = None  # how clients reach us (for x402 `resource.url`)
    database_url: str = "sqlite:///var/tollway.sqlite3"
    devnet_file: Path = Path("var/devnet.json")
    quote_secret: str = Field(default_factory=lambda: secrets.token_hex(32))
    quote_ttl_seconds: int = 120  # how long a 402 quote can be paid
    max_timeout_seconds: int = 300  # x402 maxTimeoutSeconds offered to clients
    default_max_tokens: int = 1024  # output cap applied when a request sets none
    max_body_bytes: int = 4 * 1024 * 1024
    image_token_allowance: int = 2_000  # prompt-token bound added per image part
    # A wallet whose credit almost covers a call is asked to top up at least this much (or the whole
    # quote) rather than a dust amount: a chain transaction for 1 unit is not worth its gas.
    min_chain_payment_usd: Decimal = Decimal("0.001")
    schemes: list[str] = ["exact", "transfer", "credit"]  # payment schemes offered, by registry name
    chain: ChainSettings = ChainSettings()
    upstream: UpstreamSettings = UpstreamSettings()  # the upstream, when there is one
    upstreams: list[UpstreamSettings] = Field(default_factory=list)  # several, in order of preference
    sticky_idle_seconds: float = 600  # a conversation stays on its upstream this long after its last call
    failure_cooldown_seconds: float = 5  # an upstream that failed is tried last for this long (doubling)
    cache_memory_seconds: float = 300  # how long a prompt prefix is remembered as cacheable on an upstream
    models: dict[str, ModelPrice] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("TOLLWAY_CONFIG", "tollway.toml")
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_path))


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
