"""The paying client for agents: httpx transports and OpenAI SDK helpers that answer 402s."""

from .openai import async_openai_client, openai_client
from .payer import AllowedAsset, PaidCall, Payer, PaymentRefused, claim_transfer, sign_credit, sign_exact
from .transport import PayingTransport, SyncPayingTransport, refund_channel

__all__ = [
    "AllowedAsset",
    "PaidCall",
    "Payer",
    "PayingTransport",
    "PaymentRefused",
    "SyncPayingTransport",
    "async_openai_client",
    "claim_transfer",
    "openai_client",
    "refund_channel",
    "sign_credit",
    "sign_exact",
]
