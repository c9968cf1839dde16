"""The paying client for agents: httpx transports and OpenAI and Anthropic SDK helpers that answer 402s."""

from typing import Any

from .openai import async_openai_client, openai_client
from .payer import AllowedAsset, PaidCall, Payer, PaymentRefused, claim_transfer, sign_credit, sign_exact
from .transport import PayingTransport, SyncPayingTransport, refund_channel


def anthropic_client(base_url: str, payer: Payer, **kwargs: Any) -> Any:
    """An Anthropic SDK client that pays its calls (``tollway.client.anthropic``; needs the SDK)."""
    from .anthropic import anthropic_client as make

    return make(base_url, payer, **kwargs)


__all__ = [
    "AllowedAsset",
    "PaidCall",
    "Payer",
    "PayingTransport",
    "PaymentRefused",
    "SyncPayingTransport",
    "anthropic_client",
    "async_openai_client",
    "claim_transfer",
    "openai_client",
    "refund_channel",
    "sign_credit",
    "sign_exact",
]
