"""The official x402 Python SDK (PyPI ``x402[evm,extensions,httpx]``), unmodified, paying a tollway.

Run with ``.venv-x402/bin/python`` (``./scripts/setup --test`` makes it): the SDK's Sign-In-With-X
client needs ``signinwithethereum``, which cannot share the project's venv (web3 8). Only the SDK's
public API is used. Prints one JSON line: what each call got, and every request the SDK sent.

Scenarios:
- ``pay``: one call; ``upto`` registered, and the ``sign-in-with-x`` client extension, so a wallet
  whose credit covers the call is served signed in, and any other pays with ``upto``.
- ``identifier``: one paid call with a ``payment-identifier`` id (added the SDK's way, in a
  before-payment-creation hook); the very same request again, sent with plain httpx and the
  PAYMENT-SIGNATURE header captured by an after-payment-creation hook; then another body paid by
  the SDK under the same id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx
from eth_account import Account
from x402 import x402Client
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    append_payment_identifier_to_extensions,
    generate_payment_id,
)
from x402.extensions.sign_in_with_x import CreateSIWxClientExtensionOptions, create_siwx_client_extension
from x402.http import decode_payment_signature_header, x402HTTPClient
from x402.http.clients.httpx import x402_httpx_transport
from x402.mechanisms.evm.upto import UptoEvmScheme

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


class Recorder(httpx.AsyncBaseTransport):
    """The transport under the SDK's: notes each request it sends and what came back."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.sent.append(
            {
                "sign_in": "sign-in-with-x" in request.headers,
                "payment_signature": request.headers.get("payment-signature"),
                "status": response.status_code,
            }
        )
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    def summary(self) -> list[dict[str, Any]]:
        return [{**s, "payment_signature": s["payment_signature"] is not None} for s in self.sent]


def seen(r: httpx.Response) -> dict[str, Any]:
    return {"status": r.status_code, "headers": dict(r.headers), "body": r.text}


def official_client(args: argparse.Namespace) -> x402Client:
    """``upto`` for the devnet token (which the SDK's spend controls must be told to allow)."""
    network = f"eip155:{args.chain_id}"
    client = x402Client()
    client.register(network, UptoEvmScheme(args.account))
    allowed = {"network": network, "asset": args.token, "max_amount_per_payment": "1000000"}
    client.set_spend_controls({"allowed_assets": [allowed]})
    return client


async def pay(args: argparse.Namespace) -> dict[str, Any]:
    client = official_client(args)
    client.register_extension(create_siwx_client_extension(CreateSIWxClientExtensionOptions(signers=[args.account])))
    recorder = Recorder()
    async with httpx.AsyncClient(transport=x402_httpx_transport(client, recorder), timeout=60) as http:
        r = await http.post(args.url + CHAT, content=args.body, headers=JSON)
    return {"call": seen(r), "sent": recorder.summary()}


async def identifier(args: argparse.Namespace) -> dict[str, Any]:
    client = official_client(args)
    payment_id = args.payment_id or generate_payment_id()
    captured: list[str] = []

    def add_identifier(ctx: Any) -> None:  # as the SDKs' payment-identifier examples do
        if ctx.payment_required.extensions is None:
            ctx.payment_required.extensions = {}
        append_payment_identifier_to_extensions(ctx.payment_required.extensions, payment_id)

    def capture(ctx: Any) -> None:
        captured.append(
            x402HTTPClient(client).encode_payment_signature_header(ctx.payment_payload)["PAYMENT-SIGNATURE"]
        )

    client.on_before_payment_creation(add_identifier)
    client.on_after_payment_creation(capture)
    recorder = Recorder()
    async with httpx.AsyncClient(transport=x402_httpx_transport(client, recorder), timeout=60) as http:
        first = await http.post(args.url + CHAT, content=args.body, headers=JSON)
        sent_first = [s["payment_signature"] for s in recorder.sent if s["payment_signature"]]
        async with httpx.AsyncClient(timeout=60) as plain:  # the same request, byte for byte
            replay = await plain.post(
                args.url + CHAT, content=args.body, headers={**JSON, "PAYMENT-SIGNATURE": captured[0]}
            )
        other = await http.post(args.url + CHAT, content=args.other_body, headers=JSON)
    return {
        "payment_id": payment_id,
        "sent_id": decode_payment_signature_header(captured[0]).extensions[PAYMENT_IDENTIFIER]["info"]["id"],
        "captured_is_sent": sent_first == captured[:1],
        "first": seen(first),
        "replay": seen(replay),
        "other": seen(other),
        "sent": recorder.summary(),
    }


SCENARIOS = {"pay": pay, "identifier": identifier}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the gateway")
    parser.add_argument("--key", required=True, help="the payer's private key")
    parser.add_argument("--chain-id", required=True, type=int)
    parser.add_argument("--token", required=True, help="the devnet token's address")
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--body", required=True, help="the chat request, JSON")
    parser.add_argument("--other-body", help="identifier: another request under the same id, JSON")
    parser.add_argument("--payment-id", help="identifier: the id (default: one the SDK generates)")
    args = parser.parse_args()
    args.account = Account.from_key(args.key)
    args.body, args.other_body = args.body.encode(), (args.other_body or "").encode()
    print(json.dumps({"scenario": args.scenario, **asyncio.run(SCENARIOS[args.scenario](args))}))


if __name__ == "__main__":
    main()
