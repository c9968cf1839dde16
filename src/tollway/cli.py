"""The ``tollway`` command: serve, devnet, mock-upstream, chat."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .config import Settings, apply_devnet

DEVNET_PORT = 8545


def ensure_devnet(settings: Settings, port: int = DEVNET_PORT) -> tuple[Any, Any]:
    """Attach to an anvil on ``port`` or start one; deploy the test token. Returns (devnet, process)."""
    from .devnet.anvil import rpc_alive, start_anvil
    from .devnet.deploy import deploy_devnet

    url = f"http://127.0.0.1:{port}"
    proc = None
    if not rpc_alive(url):
        proc = start_anvil(port)
    devnet = deploy_devnet(url)
    settings.devnet_file.parent.mkdir(parents=True, exist_ok=True)
    devnet.save(settings.devnet_file)
    return devnet, proc


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .mock_upstream import create_app as create_mock

    settings = Settings(**{k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    anvil = devnet = None
    if not settings.chain.rpc_url:
        devnet, anvil = ensure_devnet(settings, args.devnet_port)
    mock_url = None
    if not settings.upstream.url:
        mock_url = f"http://127.0.0.1:{args.mock_port}/v1"
    if devnet is not None:
        settings = apply_devnet(settings, devnet, mock_url)
    elif mock_url:
        settings = settings.model_copy(update={"upstream": settings.upstream.model_copy(update={"url": mock_url})})

    servers = [
        uvicorn.Server(
            uvicorn.Config(
                create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level, access_log=False
            )
        )
    ]
    if mock_url:
        servers.append(
            uvicorn.Server(uvicorn.Config(create_mock(), host="127.0.0.1", port=args.mock_port, log_level="warning"))
        )
    print(banner(settings, devnet, mock_url), flush=True)

    async def run() -> None:
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        if anvil is not None:
            anvil.terminate()
            anvil.wait(timeout=10)
    return 0


def banner(settings: Settings, devnet: Any, mock_url: str | None) -> str:
    url = f"http://{settings.host}:{settings.port}"
    lines = [
        f"tollway gateway on {url}/v1  (chain {redacted(settings.chain.rpc_url)}, token {settings.chain.token})",
        f"  upstream: {redacted(settings.upstream.url)}{'  (built-in mock)' if mock_url else ''}",
        f"  models:   {', '.join(settings.models)}",
    ]
    if devnet is not None:
        lines += [
            f"  devnet:   anvil chain {devnet.chain_id}; payee {devnet.payee}; described in {settings.devnet_file}",
            "  pay from a devnet wallet:",
            f'    tollway chat --url {url} "Hello, tollway"',
            "  or from an agent (Python):",
            "    from tollway.client import Payer, AllowedAsset, openai_client",
            f'    payer = Payer.from_key("<key>", [AllowedAsset("eip155:{devnet.chain_id}", "{devnet.token}")])',
            f'    openai_client("{url}/v1", payer).chat.completions.create(model="mock/echo", messages=[...])',
        ]
    return "\n".join(lines)


def redacted(url: str | None) -> str:
    """A URL as it may be printed: its host only (RPC URLs often carry an API key in the path,
    the query or the user part)."""
    if not url:
        return str(url)
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


def cmd_devnet(args: argparse.Namespace) -> int:
    settings = Settings()
    if args.out:
        settings = settings.model_copy(update={"devnet_file": Path(args.out)})
    devnet, proc = ensure_devnet(settings, args.port)
    print(json.dumps({**json.loads(devnet.model_dump_json()), "file": str(settings.devnet_file)}, indent=2))
    if proc is None:
        return 0
    print(f"anvil running on {devnet.rpc_url}; Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from .mock_upstream import MockOptions, run

    run(port=args.port, options=MockOptions(latency=args.latency, chunk_delay=args.chunk_delay, dialect=args.dialect))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .client import AllowedAsset, Payer, PaymentRefused, SyncPayingTransport

    key = args.key or os.environ.get("TOLLWAY_KEY")
    allowed = [AllowedAsset(*a.rsplit(":", 1)) for a in args.allow or []]
    devnet_file = Path(args.devnet_file) if args.devnet_file else Settings().devnet_file
    if (not key or not allowed) and devnet_file.exists():
        from .devnet.deploy import Devnet

        devnet = Devnet.load(devnet_file)
        key = key or devnet.payer_keys[0]
        allowed = allowed or [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token, devnet.decimals)]
    if not key or not allowed:
        print("need --key (or TOLLWAY_KEY) and --allow NETWORK:ASSET (no devnet file found)", file=sys.stderr)
        return 2
    payer = Payer.from_key(key, allowed, max_per_call_usd=Decimal(args.max_usd), max_total_usd=Decimal(args.max_usd))
    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}], "stream": args.stream}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    try:
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=args.url, timeout=120) as client:
            if args.stream:
                with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        return fail(r)
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            for choice in json.loads(line[6:]).get("choices", []):
                                print(choice.get("delta", {}).get("content") or "", end="", flush=True)
                    print()
            else:
                r = client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    return fail(r)
                print(r.json()["choices"][0]["message"]["content"])
    except PaymentRefused as exc:
        print(f"not paid: {exc}", file=sys.stderr)
        return 1
    for paid in payer.history:
        print(
            f"paid {paid.usd} USD ({paid.amount} units of {paid.asset} on {paid.network}) from {payer.account.address}",
            file=sys.stderr,
        )
        print(
            f"settlement transaction {paid.transaction}; receipt {args.url}/v1/receipts/{paid.receipt_id}",
            file=sys.stderr,
        )
    return 0


def fail(r: httpx.Response) -> int:
    print(f"gateway answered {r.status_code}: {r.text[:500]}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway (devnet + mock upstream when nothing is configured)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--mock-port", type=int, default=8403, help="port of the built-in mock upstream")
    s.add_argument("--devnet-port", type=int, default=DEVNET_PORT, help="anvil port when no chain is configured")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("devnet", help="start or attach to anvil, deploy the test USDC, fund the dev accounts")
    d.add_argument("--port", type=int, default=DEVNET_PORT)
    d.add_argument("--out", default=None, help="where to write the devnet JSON (default var/devnet.json)")
    d.set_defaults(func=cmd_devnet)

    m = sub.add_parser("mock-upstream", help="run the deterministic OpenAI-compatible mock upstream")
    m.add_argument("--port", type=int, default=8403)
    m.add_argument("--latency", type=float, default=0.0)
    m.add_argument("--chunk-delay", type=float, default=0.0)
    m.add_argument("--dialect", default="openai")
    m.set_defaults(func=cmd_mock)

    c = sub.add_parser("chat", help="pay for one chat completion and print it")
    c.add_argument("prompt")
    c.add_argument("--url", default="http://127.0.0.1:8402")
    c.add_argument("--model", default="mock/echo")
    c.add_argument("--key", help="payer private key (default: TOLLWAY_KEY, else a devnet account)")
    c.add_argument("--allow", action="append", help="NETWORK:ASSET to pay in, e.g. eip155:8453:0x833...")
    c.add_argument("--max-usd", default="1", help="most to pay for this call")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--stream", action="store_true")
    c.add_argument("--devnet-file", help="devnet JSON to take a payer key and the token from (default var/devnet.json)")
    c.set_defaults(func=cmd_chat)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
