"""The official MPP Python client (PyPI ``pympp[evm]``), unmodified, paying a tollway.

Run with ``.venv-mpp/bin/python`` (``./scripts/setup --test`` makes it). Only pympp's public API is
used: ``mpp.client.Mpp`` with the ``evm`` charge method, which answers a 402 carrying a
``WWW-Authenticate: Payment`` challenge with an EIP-3009 authorization (no chain access needed).

POSTs ``--body`` to ``--url`` ``--repeat`` times through one client, then prints one JSON line:
``{"calls": [{"status", "payment_receipt", "body", "headers"}, ...]}``. If the client raises, it
prints ``{"error": "<type>: <message>", "calls": [the calls done before]}`` and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from decimal import Decimal
from typing import Any

import httpx
from eth_account import Account
from mpp.client import Mpp
from mpp.methods.evm import client as evm

HEADERS = ("www-authenticate", "payment-receipt", "x-tollway-receipt", "x-tollway-cost", "content-type")


def seen(r: httpx.Response) -> dict[str, Any]:
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return {
        "status": r.status_code,
        "payment_receipt": r.headers.get("payment-receipt"),
        "body": body,
        "headers": {name: r.headers.get(name) for name in HEADERS},
    }


async def run(args: argparse.Namespace, method: Any) -> dict[str, Any]:
    calls: list[dict[str, Any]] = []
    try:
        async with Mpp(methods=[method]) as mpp:
            for _ in range(args.repeat):
                # the body as given, byte for byte: the server's challenge digest is over these bytes
                r = await mpp.fetch(
                    args.url,
                    method="POST",
                    content=args.body.encode(),
                    headers={"content-type": "application/json"},
                    timeout=60,  # httpx's default is 5 s; pympp raises the paid retry's to >= 35 s
                )
                calls.append(seen(r))
    except Exception as e:  # reported to the test, which asserts on it
        return {"error": f"{type(e).__name__}: {e}", "calls": calls}
    return {"calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the full URL to POST to")
    parser.add_argument("--key", required=True, help="the payer's private key, 0x…")
    parser.add_argument("--chain-id", required=True, type=int)
    parser.add_argument("--token", required=True, help="the token's address")
    parser.add_argument("--token-name", required=True, help="the token's EIP-712 domain name")
    parser.add_argument("--token-version", required=True, help="the token's EIP-712 domain version")
    parser.add_argument("--body", required=True, help="the request body, JSON")
    parser.add_argument("--max-amount", type=int, default=10_000_000, help="most paid per call, atomic units")
    parser.add_argument("--decimals", type=int, default=6, help="the token's decimals")
    parser.add_argument("--repeat", type=int, default=1, help="paid calls to make, one after another")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    # Bad arguments (key, address, …) raise here, before run(): a usage error, not a client result.
    method = evm.charge(
        currency=args.token,
        account=Account.from_key(args.key),
        chain_id=args.chain_id,
        decimals=args.decimals,
        authorization={"name": args.token_name, "version": args.token_version},
        # pympp takes its cap in display units; this is exactly --max-amount atomic units
        max_amount=f"{Decimal(args.max_amount).scaleb(-args.decimals):f}",
    )
    print(json.dumps(asyncio.run(run(args, method))))


if __name__ == "__main__":
    main()
