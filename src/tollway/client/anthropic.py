"""Anthropic SDK clients that pay per call: two lines for an agent.

payer = Payer.from_key(key, [AllowedAsset("eip155:8453", USDC_BASE)])
client = anthropic_client("https://gateway.example", payer)

The Anthropic SDK (2.x) sends its requests with httpx2, a fork of httpx; tollway's paying transport
is httpx's. ``Httpx2Bridge`` carries each request across, streamed answers included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2

from .payer import Payer
from .transport import SyncPayingTransport


class Httpx2Bridge(httpx2.BaseTransport):
    """An httpx2 transport that sends each request through an httpx transport."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        sent = httpx.Request(
            request.method,
            str(request.url),
            headers=request.headers.raw,
            content=request.read(),
            extensions={k: v for k, v in request.extensions.items() if k == "timeout"},
        )
        got = self.inner.handle_request(sent)
        return httpx2.Response(got.status_code, headers=got.headers.raw, stream=_Stream(got))

    def close(self) -> None:
        self.inner.close()


class _Stream(httpx2.SyncByteStream):
    """An httpx answer's body, as an httpx2 stream."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __iter__(self) -> Iterator[bytes]:
        yield from self.response.stream  # type: ignore[union-attr]

    def close(self) -> None:
        self.response.close()


def anthropic_client(base_url: str, payer: Payer, **kwargs: Any) -> Any:
    """An ``anthropic.Anthropic`` client whose calls to a tollway at ``base_url`` (without /v1) pay
    their 402s from ``payer``."""
    transport = Httpx2Bridge(SyncPayingTransport(payer))
    http = httpx2.Client(transport=transport, timeout=kwargs.pop("timeout", 120.0))
    return anthropic.Anthropic(base_url=base_url, api_key="x402", http_client=http, **kwargs)
