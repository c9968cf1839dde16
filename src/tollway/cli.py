"""The ``tollway`` command: serve, doctor, devnet, mock-upstream, chat.

``tollway serve`` runs a local devnet (anvil, a test USDC, the built-in mock upstream) only when
asked (``--devnet``) or when nothing is configured at all; with a configuration it serves exactly
that, after every check of ``tollway doctor`` passed. Problems are printed one line each, never
as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from .config import Settings, apply_devnet, configured, upstream_list
from .errors import ChainUnavailable
from .jsonbytes import loads

DEVNET_PORT = 8545
T = TypeVar("T")


class Refused(Exception):
    """What the command cannot do, one line per reason (printed, exit status 2)."""


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"{where}: unknown setting (a typo? keys use underscores: see tollway.example.toml)")
            else:
                lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        raise Refused("\n".join(lines)) from None
    except ValueError as exc:  # e.g. a *_FILE that cannot be read
        raise Refused(str(exc)) from None


def redacted(url: str | None) -> str:
    """A URL as it may be printed: its host only (RPC URLs often carry an API key in the path,
    the query or the user part)."""
    if not url:
        return str(url)
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


def ensure_devnet(settings: Settings, port: int = DEVNET_PORT, url: str | None = None) -> tuple[Any, Any]:
    """Attach to an anvil at ``url`` (or on ``port``, starting one if none answers); deploy the
    test token and the canonical contracts. Returns (devnet, the anvil process we started)."""
    from .devnet.anvil import rpc_alive, start_anvil
    from .devnet.deploy import deploy_devnet

    proc = None
    if url is None:
        url = f"http://127.0.0.1:{port}"
        if not rpc_alive(url):
            proc = start_anvil(port)
    elif not rpc_alive(url):
        raise Refused(f"no devnet answers at {redacted(url)}")
    devnet = deploy_devnet(url)
    settings.devnet_file.parent.mkdir(parents=True, exist_ok=True)
    devnet.save(settings.devnet_file)
    return devnet, proc


def devnet_settings(settings: Settings, args: argparse.Namespace) -> tuple[Settings, Any, Any, str | None]:
    """The settings of a devnet run: its chain, the mock upstream unless one is configured, and a
    ledger of its own (one per devnet chain: credit of a dead devnet never pays on a new one)."""
    from .devnet.anvil import genesis_hash

    if settings.chain.model_fields_set:
        keys = ", ".join(f"chain.{k}" for k in sorted(settings.chain.model_fields_set))
        raise Refused(f"--devnet runs its own chain and token: remove {keys} from the configuration, or drop --devnet")
    devnet, anvil = ensure_devnet(settings, args.devnet_port, args.devnet_url)
    mock_url = None if upstream_list(settings) else f"http://127.0.0.1:{args.mock_port}/v1"
    settings = apply_devnet(settings, devnet, mock_url)
    if "database_url" not in settings.model_fields_set:
        genesis = genesis_hash(devnet.rpc_url)
        ledger = settings.devnet_file.parent / f"devnet-{devnet.chain_id}-{genesis[2:12]}.sqlite3"
        settings = settings.model_copy(update={"database_url": f"sqlite:///{ledger}"})
    return settings, devnet, anvil, mock_url


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .doctor import Unfit
    from .gateway import Gateway
    from .mock_upstream import create_app as create_mock

    settings = load_settings(host=args.host, port=args.port)
    anvil = devnet = mock_url = None
    if args.devnet or not configured():
        if not args.devnet:
            print("nothing configured (no tollway.toml, no TOLLWAY_* variables): serving a local devnet", flush=True)
        settings, devnet, anvil, mock_url = devnet_settings(settings, args)

    async def run() -> int:
        try:
            gateway = await Gateway.open(settings)
        except Unfit as exc:
            print(f"tollway cannot serve this configuration (see `tollway doctor`):\n{exc}", file=sys.stderr)
            return 2
        app = create_app(settings, gateway)
        config = server_config(app, gateway.settings, args.log_level)
        servers = [uvicorn.Server(config)]
        if mock_url:
            mock = uvicorn.Config(create_mock(), host="127.0.0.1", port=args.mock_port, log_level=args.log_level)
            servers.append(uvicorn.Server(mock))
        print(banner(gateway.settings, devnet, mock_url), flush=True)
        # uvicorn takes SIGTERM and SIGINT while it serves (it stops taking calls, finishes those it
        # has), then raises the signal again: by default that would end the process before the
        # gateway is closed (its settlement worker, its ledger). Here that raise does nothing.
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for s in servers:
                s.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await gateway.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        print("tollway stopped", flush=True)
        return 0

    try:
        return event_loop_run(run())
    except KeyboardInterrupt:
        return 0
    finally:
        if anvil is not None:
            anvil.terminate()
            anvil.wait(timeout=10)


def event_loop_run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (uvicorn's choice too), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def server_config(app: Any, settings: Settings, log_level: str) -> Any:
    """The gateway's uvicorn configuration: only a proxy in ``trusted_proxies`` may name the
    client (``X-Forwarded-For``, ``X-Forwarded-Proto``); with none, the peer is the client. HTTP/1.1
    with bounds on a request's head and on a client that stops sending (``tollway.serving``)."""
    import uvicorn

    from .serving import BoundedHttpToolsProtocol

    proxies = settings.trusted_proxies
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None,
        http=BoundedHttpToolsProtocol,
    )


def banner(settings: Settings, devnet: Any, mock_url: str | None) -> str:
    url = f"http://{settings.host}:{settings.port}"
    c = settings.chain
    lines = [
        f"tollway gateway on {url}/v1  (chain eip155:{c.chain_id} via {redacted(c.rpc_url)}, token {c.token})",
        *(f"  upstream: {u.name} {redacted(u.url)}" for u in upstream_list(settings)),
    ]
    if mock_url:
        lines[-1] += "  (the built-in mock)"
    lines.append(f"  models:   {', '.join(settings.models)}")
    if devnet is not None:
        lines += [
            f"  devnet:   anvil chain {devnet.chain_id}; payee {devnet.payee}; described in {settings.devnet_file}",
            "  pay from a devnet wallet:",
            f'    tollway chat --url {url} "Hello, tollway"',
            "  or from an agent (Python): see README.md, 'Pay from an agent'",
        ]
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import examine

    if not configured():
        raise Refused("nothing is configured (no tollway.toml, no TOLLWAY_* variables): there is nothing to check")
    findings = event_loop_run(examine(load_settings()))
    for f in findings:
        print(f)
    failed = [f for f in findings if f.level == "fail"]
    print(f"{len(failed)} problem(s): tollway would refuse to serve" if failed else "ready to serve")
    return 1 if failed else 0


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

    options = MockOptions(latency=args.latency, chunk_delay=args.chunk_delay, dialect=args.dialect)
    run(host=args.host, port=args.port, options=options, log_level=args.log_level)
    return 0


def wallet_of(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The payer account and the assets it may pay in, from --key/--allow (or the devnet's)."""
    from eth_account import Account

    from .client import AllowedAsset

    key = args.key or os.environ.get("TOLLWAY_KEY")
    allowed = [AllowedAsset(*a.rsplit(":", 1)) for a in args.allow or []]
    devnet_file = Path(args.devnet_file) if args.devnet_file else Path("var/devnet.json")
    if (not key or not allowed) and devnet_file.exists():
        from .devnet.deploy import Devnet

        devnet = Devnet.load(devnet_file)
        key = key or devnet.payer_keys[0]
        allowed = allowed or [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token, devnet.decimals)]
    if not key or not allowed:
        raise Refused("need --key (or TOLLWAY_KEY) and --allow NETWORK:ASSET (no devnet file found)")
    try:
        return Account.from_key(key), allowed
    except ValueError:
        raise Refused("--key must be a 32-byte hex private key") from None


def cmd_chat(args: argparse.Namespace) -> int:
    from .client import Payer, PaymentRefused, SyncPayingTransport

    account, allowed = wallet_of(args)
    try:
        limit = Decimal(args.max_usd)
    except InvalidOperation:
        raise Refused("--max-usd must be a number") from None
    schemes = tuple(args.scheme or ("upto", "exact"))
    payer = Payer(account, allowed, max_per_call_usd=limit, max_total_usd=limit, max_deposit_usd=limit, schemes=schemes)
    base = args.url.rstrip("/").removesuffix("/v1")
    body: dict[str, Any] = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    body["stream"] = args.stream
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    metered: dict[str, Any] = {}  # what the gateway says it charged: cost, settlement, cache hops
    try:
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=base, timeout=args.timeout) as client:
            if args.stream:
                with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        return fail(r)
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            print(_text(_json(line[6:]), "delta"), end="", flush=True)
                        elif line.startswith(": tollway "):
                            metered = _json(line[len(": tollway ") :])
                    print()
            else:
                r = client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    return fail(r)
                print(_text(_json(r.text), "message"))
                metered = {"cost": r.headers.get("x-tollway-cost"), "cache": _json(r.headers.get("x-tollway-cache"))}
    except PaymentRefused as exc:
        print(f"not paid: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway at {base}: {type(exc).__name__}", file=sys.stderr)
        return 1
    for paid in payer.history:
        print_payment(
            paid, metered, account.address, next((a.decimals for a in allowed if a.network == paid.network), 6)
        )
    return 0


def _json(text: str | None) -> Any:
    """What the gateway sent as JSON, or None if it is not (it is not trusted to be well formed)."""
    try:
        return loads((text or "null").encode())
    except (ValueError, RecursionError):
        return None


def _pretty(text: str) -> str:
    """What the gateway sent, indented if it is JSON (as sent if it is not, or too deep to indent)."""
    try:
        return json.dumps(loads(text.encode()), indent=2)
    except (ValueError, RecursionError):
        return text


def _text(doc: Any, part: str) -> str:
    """The text of a chat answer's (``message``) or stream chunk's (``delta``) choices."""
    choices = doc.get("choices") if isinstance(doc, dict) else None
    said = [c.get(part) for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    return "".join(str(s.get("content") or "") for s in said if isinstance(s, dict))


def print_payment(paid: Any, metered: Any, payer: str, decimals: int) -> None:
    """What a call cost and how it was paid: the authorised maximum, what moved, the cache discount."""

    def usd(atomic: Any) -> str:
        from .client.payer import digits

        text = str(atomic)
        return f"{Decimal(int(text)).scaleb(-decimals)} USD" if digits(text) else "?"

    metered = metered if isinstance(metered, dict) else {}
    hops = metered.get("cache") if isinstance(metered.get("cache"), list) else None
    discount = hops[0].get("discount_passed") if hops and isinstance(hops[0], dict) else None
    cost = metered.get("cost")
    print(
        f"cost {usd(cost) if cost else 'metered after the stream'}; cache discount {usd(discount or 0)}",
        file=sys.stderr,
    )
    if paid.scheme == "credit":
        print(
            f"paid from the credit of {payer} (signed in): no transaction; receipt {paid.receipt_id}", file=sys.stderr
        )
        return
    settlement = metered.get("settlement") if isinstance(metered.get("settlement"), dict) else {}
    if paid.scheme == "batch-settlement":  # (a stream's charge is in its summary: the header said "0")
        charged = settlement.get("amount") if metered.get("settlement") else paid.settled
        print(
            f"paid by voucher on {paid.network} from {payer}: charged {usd(charged)} to the channel, claimed later; "
            f"receipt {paid.receipt_id}",
            file=sys.stderr,
        )
        return
    moved = paid.settled if paid.settled is not None else settlement.get("amount")
    if paid.scheme == "exact":
        moved = paid.amount
    tx = paid.transaction or settlement.get("transaction")
    print(
        f"paid with {paid.scheme} on {paid.network} from {payer}: authorised {usd(paid.amount)}, settled {usd(moved)}",
        file=sys.stderr,
    )
    print(f"settlement {tx or '(none: nothing to move)'}; receipt {paid.receipt_id}", file=sys.stderr)


def cmd_channel(args: argparse.Namespace) -> int:
    """``tollway channel status|refund``: this wallet's batch-settlement channel with a gateway."""
    from .client import Payer, PaymentRefused, SyncPayingTransport, refund_channel
    from .client.channels import Channel

    account, allowed = wallet_of(args)
    payer = Payer(account, allowed, schemes=("batch-settlement",))
    nothing = {"max_per_call_usd": Decimal(0), "max_total_usd": Decimal(0), "max_deposit_usd": Decimal(0)}
    signs_in = Payer(account, allowed, **nothing)  # (a channel's status is read signed in, never paid)
    base = args.url.rstrip("/").removesuffix("/v1")
    try:
        with httpx.Client(base_url=base, timeout=args.timeout) as http:
            if args.action == "refund":
                doc = refund_channel(payer, http, args.amount)
                print(json.dumps(doc, indent=2))
                return 0
            terms = payer.refund_headers(http.get("/v1/channels/refund").headers)
        if terms is None:
            raise Refused(f"{base} takes no batch-settlement channel in an allowed asset")
        channel = Channel.of(account, terms[1])
        with httpx.Client(transport=SyncPayingTransport(signs_in), base_url=base, timeout=args.timeout) as http:
            r = http.get(f"/v1/channels/{channel.id}")  # (signed in: the channel is the wallet's business)
            if r.status_code != 200:
                return fail(r)
            print(_pretty(r.text))
    except PaymentRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway at {base}: {type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


def fail(r: httpx.Response) -> int:
    doc = _json(r.text)
    detail = doc.get("error") if isinstance(doc, dict) else None
    message = detail.get("message") if isinstance(detail, dict) else detail
    message = message if isinstance(message, str) and message else r.text[:300]
    print(f"the gateway answered {r.status_code}: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollway", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve", parents=[common], help="run the gateway (a local devnet with --devnet, or when nothing is configured)"
    )
    s.add_argument("--host", default=None, help="address to listen on (default: settings' host, 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port to listen on (default: settings' port, 8402)")
    s.add_argument("--devnet", action="store_true", help="run on a local devnet (anvil + test USDC + mock upstream)")
    s.add_argument("--devnet-url", default=None, help="with --devnet: attach to this anvil instead of starting one")
    s.add_argument("--mock-port", type=int, default=8403, help="devnet: port of the built-in mock upstream")
    s.add_argument("--devnet-port", type=int, default=DEVNET_PORT, help="devnet: anvil port (started if none there)")
    s.set_defaults(func=cmd_serve)

    doc = sub.add_parser(
        "doctor", parents=[common], help="check a configuration against its chain, ledger and upstreams; serve nothing"
    )
    doc.set_defaults(func=cmd_doctor)

    d = sub.add_parser(
        "devnet", parents=[common], help="start or attach to anvil, deploy the test USDC, fund the dev accounts"
    )
    d.add_argument("--port", type=int, default=DEVNET_PORT)
    d.add_argument("--out", default=None, help="where to write the devnet JSON (default var/devnet.json)")
    d.set_defaults(func=cmd_devnet)

    m = sub.add_parser("mock-upstream", parents=[common], help="run the deterministic OpenAI-compatible mock upstream")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8403)
    m.add_argument("--latency", type=float, default=0.0, help="seconds before each answer starts")
    m.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    m.add_argument("--dialect", default="openai", help="usage dialect: openai, openrouter, deepseek, anthropic, ...")
    m.set_defaults(func=cmd_mock)

    c = sub.add_parser("chat", parents=[common], help="pay for one chat completion and print it, with what it cost")
    c.add_argument("prompt")
    c.add_argument("--url", default="http://127.0.0.1:8402", help="the gateway (with or without /v1)")
    c.add_argument("--model", default="mock/echo")
    c.add_argument("--key", help="payer private key (default: TOLLWAY_KEY, else a devnet account)")
    c.add_argument("--allow", action="append", help="NETWORK:ASSET to pay in, e.g. eip155:8453:0x833...")
    c.add_argument("--max-usd", default="1", help="most to pay, or deposit into a channel, for this call (default 1)")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--stream", action="store_true")
    c.add_argument(
        "--scheme",
        action="append",
        choices=["upto", "exact", "batch-settlement"],
        help="pay with these, in this order (default: upto, exact; batch-settlement: through a channel)",
    )
    c.add_argument("--timeout", type=float, default=300, help="seconds to wait for the answer")
    c.add_argument("--devnet-file", help="devnet JSON to take a payer key and the token from (default var/devnet.json)")
    c.set_defaults(func=cmd_chat)

    ch = sub.add_parser(
        "channel", parents=[common], help="this wallet's batch-settlement channel with a gateway: status, refund"
    )
    ch.add_argument("action", choices=["status", "refund"])
    ch.add_argument("--url", default="http://127.0.0.1:8402", help="the gateway (with or without /v1)")
    ch.add_argument("--key", help="payer private key (default: TOLLWAY_KEY, else a devnet account)")
    ch.add_argument("--allow", action="append", help="NETWORK:ASSET the channel is in, e.g. eip155:8453:0x833...")
    ch.add_argument("--amount", type=int, default=None, help="refund: atomic units (default: all not charged)")
    ch.add_argument("--timeout", type=float, default=120, help="seconds to wait for the gateway")
    ch.add_argument(
        "--devnet-file", help="devnet JSON to take a payer key and the token from (default var/devnet.json)"
    )
    ch.set_defaults(func=cmd_channel)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for chatty in ("httpx", "alembic"):  # their INFO lines are not the operator's business
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return int(args.func(args))
    except Refused as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except Exception as exc:  # (at start-up: the chain or the ledger is not there — one line, no traceback)
        if not isinstance(exc, ChainUnavailable) and not type(exc).__module__.startswith("sqlalchemy"):
            raise
        print(f"tollway cannot start: {outage(exc)}", file=sys.stderr)
        return 3


def outage(exc: Exception) -> str:
    """One line for what stopped the start: the chain's RPC or the ledger's database (its driver's
    first line, which names the host, never the URL's password)."""
    if isinstance(exc, ChainUnavailable):
        return f"the chain's RPC failed ({exc.message}): check chain.rpc_url, or try again"
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"the ledger database cannot be used ({type(exc).__name__}: {reason[0][:200] if reason else ''})"


if __name__ == "__main__":
    sys.exit(main())
