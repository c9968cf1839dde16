"""The paying client for agents: httpx transports and OpenAI and Anthropic SDK helpers that answer 402s."""

import sys
from typing import Any

# eth_account imports py_ecc, which raises Python's recursion limit to 100,000 for good. Deeply nested
# JSON from a hostile server would then overflow the C stack in any parser of the agent's process (the
# OpenAI SDK's too): a segfault instead of a RecursionError. Nothing the client runs needs it raised,
# so importing the client leaves the limit as it found it.
_limit = sys.getrecursionlimit()
from .openai import async_openai_client, openai_client  # noqa: E402
from .payer import AllowedAsset, PaidCall, Payer, PaymentRefused, claim_transfer, sign_credit, sign_exact  # noqa: E402
from .transport import PayingTransport, SyncPayingTransport, refund_channel  # noqa: E402

sys.setrecursionlimit(_limit)


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
