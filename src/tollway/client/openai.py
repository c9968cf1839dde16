"""OpenAI SDK clients that pay per call: two lines for an agent.

payer = Payer.from_key(key, [AllowedAsset("eip155:8453", USDC_BASE)])
client = openai_client("https://gateway.example/v1", payer)
"""

from __future__ import annotations

from typing import Any

import httpx

from .payer import Payer
from .transport import PayingTransport, SyncPayingTransport


def openai_client(base_url: str, payer: Payer, **kwargs: Any) -> Any:
    import openai

    http = httpx.Client(transport=SyncPayingTransport(payer), timeout=kwargs.pop("timeout", 120.0))
    return openai.OpenAI(base_url=base_url, api_key="x402", http_client=http, **kwargs)


def async_openai_client(base_url: str, payer: Payer, **kwargs: Any) -> Any:
    import openai

    http = httpx.AsyncClient(transport=PayingTransport(payer), timeout=kwargs.pop("timeout", 120.0))
    return openai.AsyncOpenAI(base_url=base_url, api_key="x402", http_client=http, **kwargs)
