"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from eth_account import Account
from eth_account.messages import encode_typed_data
from sqlalchemy import create_engine, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from web3 import Web3
from x402 import x402Client
from x402.mechanisms.evm.upto import UptoEvmScheme

from tollway.app import create_app
from tollway.client.payer import sign_exact
from tollway.devnet.canonical import approve_permit2
from tollway.devnet.deploy import Devnet, token_contract
from tollway.ledger.models import Call, Payment
from tollway.payments.x402 import b64json, unb64json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """An ASGI app served by uvicorn on a real port, in a thread with its own event loop."""

    def __init__(self, app: Any, port: int | None = None, **config_options: Any) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", **config_options
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Chain:
    """Synchronous web3 access for assertions on balances and transactions."""

    def __init__(self, devnet: Devnet) -> None:
        self.devnet = devnet
        self.w3 = Web3(Web3.HTTPProvider(devnet.rpc_url))
        self.token = token_contract(self.w3, devnet.token)
        self.owner = Account.from_key(devnet.deployer_key)

    def balance(self, who: str) -> int:
        return int(self.token.functions.balanceOf(Web3.to_checksum_address(who)).call())

    def fund(self, amount: int = 100_000_000, eth: bool = False, permit2: bool = False) -> Any:
        """A fresh payer account holding ``amount`` test USDC (and ETH for gas only if asked:
        x402 payments are gasless); with ``permit2``, it has approved Permit2 once (as an upto payer
        does), paying that approval's gas."""
        account = Account.create()
        if eth or permit2:
            self.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**18)])
        tx = self.token.functions.mint(account.address, amount).build_transaction(
            {
                "from": self.owner.address,
                "nonce": self.w3.eth.get_transaction_count(self.owner.address, "pending"),
                "gas": 100_000,
            }
        )
        signed = self.owner.sign_transaction(tx)
        self.w3.eth.wait_for_transaction_receipt(
            self.w3.eth.send_raw_transaction(signed.raw_transaction), poll_latency=0.01
        )
        if permit2:
            approve_permit2(self.w3, self.devnet.token, [account.key.hex()])
        return account

    def transfer(self, account: Any, to: str, amount: int, gas: int | None = None) -> str:
        """Send ``amount`` of the token from ``account`` in an ordinary transaction; its hash once mined."""
        params: dict[str, Any] = {"from": account.address, "nonce": self.w3.eth.get_transaction_count(account.address)}
        if gas:
            params["gas"] = gas
        tx = self.token.functions.transfer(Web3.to_checksum_address(to), amount).build_transaction(params)
        tx_hash = self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
        self.w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.01)
        return "0x" + bytes(tx_hash).hex()

    def mine(self, blocks: int) -> None:
        self.w3.provider.make_request("anvil_mine", [hex(blocks)])

    def receipt(self, tx_hash: str) -> Any:
        return self.w3.eth.get_transaction_receipt(tx_hash)


TOLLWAY = str(Path(sys.executable).with_name("tollway"))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any TOLLWAY_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    return {**env, **extra}


def serve_process(
    cwd: Path, args: list[str], env: dict[str, str] | None = None, port: int | None = None
) -> tuple[subprocess.Popen[str], str]:
    """`tollway serve` running in the background, printing to ``cwd/serve.log`` (a file: a pipe
    nobody reads would fill and stall it); returns it and its URL once it answers."""
    port = port or free_port()
    with (cwd / "serve.log").open("a") as log:
        proc = subprocess.Popen(
            [TOLLWAY, "serve", "--port", str(port), *args],
            cwd=cwd,
            env=clean_env(**(env or {})),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    proc.log = cwd / "serve.log"  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"tollway serve did not come up: {proc.log.read_text()}")  # type: ignore[attr-defined]
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen[str]) -> str:
    """Stop a `serve_process`; what it printed."""
    proc.terminate()
    proc.wait(timeout=30)
    return proc.log.read_text()  # type: ignore[attr-defined]


def upto_client(account: Any, devnet: Devnet) -> x402Client:
    """The official x402 client paying with ``upto`` only, for the devnet's token."""
    client = x402Client()
    client.register(f"eip155:{devnet.chain_id}", UptoEvmScheme(account))
    allowed = {"network": f"eip155:{devnet.chain_id}", "asset": devnet.token, "max_amount_per_payment": "1000000"}
    client.set_spend_controls({"allowed_assets": [allowed]})
    return client


def credit(gateway_url: str, payer: Any, figure: str = "balance") -> int:
    """A wallet's credit (its ``balance``, or what is ``available``), read signed in as tollway's
    client does: the 401 carries a sign-in, which the client signs."""
    from tollway.client import SyncPayingTransport

    with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        r = http.get(f"{gateway_url}/v1/credit")
    assert r.status_code == 200, r.text
    return int(r.json()[figure]["atomic"])


ADMIN_TOKEN = "test-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # the test gateways' operator


def receipt(gateway_url: str, receipt_id: str) -> dict[str, Any]:
    """A call's receipt, read as the operator."""
    return httpx.get(f"{gateway_url}/v1/receipts/{receipt_id}", headers=ADMIN).json()


@contextmanager
def manual_mining(chain: Chain) -> Iterator[None]:
    """Turn the shared anvil's automine off for a test (transactions wait in its pool until
    ``chain.mine``); on again afterwards, with what is pending mined."""
    chain.w3.provider.make_request("evm_setAutomine", [False])
    try:
        yield
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])
        chain.mine(1)


def send_raw(chain: Chain, account: Any, tx: dict[str, Any]) -> str:
    """Sign and send a transaction without waiting for it (automine may be off)."""
    full = {"value": 0, "chainId": chain.devnet.chain_id, "type": 2, **tx}
    full.setdefault("nonce", chain.w3.eth.get_transaction_count(account.address, "pending"))
    return "0x" + bytes(chain.w3.eth.send_raw_transaction(account.sign_transaction(full).raw_transaction)).hex()


def wait_receipt(gateway_url: str, receipt_id: str, *, state: str = "settled", timeout: float = 15.0) -> dict[str, Any]:
    """Poll the gateway's receipt until its payment reaches ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        doc = receipt(gateway_url, receipt_id)
        if doc.get("payment", {}).get("state") == state:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"receipt {receipt_id} never reached {state}: {doc}")
        time.sleep(0.02)


def eventually(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Wait until ``check()`` holds (settlement is asynchronous)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.02)


async def await_receipt(gateway_url: str, receipt_id: str, **kw: Any) -> dict[str, Any]:
    return await asyncio.to_thread(wait_receipt, gateway_url, receipt_id, **kw)


def run_concurrently(work: Callable[[Any], None], inputs: Iterable[Any]) -> None:
    """Call ``work`` on each of ``inputs``, each in a thread of its own, and wait for them all."""
    threads = [threading.Thread(target=work, args=(x,)) for x in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- x402 over HTTP ----------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
SETTLE_WAIT = 0.3  # seconds to give the settlement worker before checking balances

# Refusal reasons (the part before ":" of the 402's `error`, or the 400 body's error.code).
VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
BAD_SIGNATURE = "invalid_exact_evm_payload_signature"
ASSET_MISMATCH = "invalid_exact_evm_asset_mismatch"
NOT_YET_VALID = "invalid_exact_evm_payload_authorization_valid_after"
EXPIRED = "invalid_exact_evm_payload_authorization_valid_before"
NONCE_USED = "invalid_exact_evm_nonce_already_used"
INVALID_NETWORK = "invalid_network"
UNSUPPORTED_SCHEME = "unsupported_scheme"
QUOTE_MISMATCH = "quote_mismatch"
INSUFFICIENT_FUNDS = "insufficient_funds"
INVALID_PAYLOAD = "invalid_payload"
INVALID_VERSION = "invalid_x402_version"


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    """A chat completion request to the mock upstream's echo model; ``extra`` adds or overrides fields."""
    return {"model": "mock/echo", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def error_code(r: httpx.Response) -> str:
    """The machine-readable reason of a refusal or failure: the 402 header's error code, or the body's."""
    if r.status_code == 402:
        return str(unb64json(r.headers["PAYMENT-REQUIRED"])["error"]).split(":", 1)[0]
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"<no error code: {r.text[:200]!r}>"


def payment_required(r: httpx.Response) -> dict[str, Any]:
    """The decoded PAYMENT-REQUIRED header of ``r``, which must be a 402."""
    assert r.status_code == 402, r.text
    return unb64json(r.headers["PAYMENT-REQUIRED"])


def envelope(required: dict[str, Any], offer: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The x402 v2 payment document that pays ``offer`` (one of ``required``'s) with ``payload``."""
    return {"x402Version": 2, "resource": required["resource"], "accepted": offer, "payload": payload, "extensions": {}}


def exact_offer(required: dict[str, Any]) -> dict[str, Any]:
    """The ``exact`` offer of a decoded PAYMENT-REQUIRED."""
    return next(o for o in required["accepts"] if o["scheme"] == "exact")


def signed_authorization(devnet: Devnet, payer: Any, amount: int) -> dict[str, Any]:
    """An ``exact`` payload: ``payer``'s EIP-3009 authorization of ``amount`` to the devnet's payee, signed now."""
    offer = {
        "network": f"eip155:{devnet.chain_id}",
        "asset": devnet.token,
        "payTo": devnet.payee,
        "amount": str(amount),
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    return sign_exact(payer, offer, int(time.time()))


def exact_payment(payer: Any, required: dict[str, Any], offer: dict[str, Any] | None = None) -> dict[str, Any]:
    """A genuine payment of ``offer`` (by default ``required``'s first), signed by the gateway's own client."""
    offer = offer or exact_offer(required)
    return envelope(required, offer, sign_exact(payer, offer, int(time.time())))


def payment_header(doc: Any) -> dict[str, str]:
    return {"PAYMENT-SIGNATURE": b64json(doc)}


# -- the ledger --------------------------------------------------------------------------------------

PAYMENTS = Payment.__table__
CALLS = Call.__table__


def payment_rows(engine: Any, payer_address: str) -> list[dict[str, Any]]:
    with engine.connect() as c:
        query = select(PAYMENTS).where(PAYMENTS.c.payer == payer_address.lower())
        return [dict(r) for r in c.execute(query).mappings()]


def call_rows(engine: Any, payment_id: str) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(select(CALLS).where(CALLS.c.payment_id == payment_id)).mappings()]


def with_own_settler(settings: Any) -> Any:
    """``settings`` with a settlement key of their own, funded on their chain: two gateways sending
    from one key with two ledgers take each other's nonces (their settlements then wait to be signed
    anew)."""
    settler = Account.create()
    Web3(Web3.HTTPProvider(str(settings.chain.rpc_url))).provider.make_request(
        "anvil_setBalance", [settler.address, hex(10**20)]
    )
    own = settings.chain.model_copy(update={"settler_key": "0x" + bytes(settler.key).hex()})
    return settings.model_copy(update={"chain": own})


def then_the_mock(gateway: Any, first: Any) -> list[Any]:
    """Upstreams for a fail-over: ``first`` (an ``UpstreamSettings``), then the session's mock, "good"."""
    from tollway.config import UpstreamSettings

    return [first, UpstreamSettings(name="good", url=str(gateway.settings.upstream.url))]


@contextmanager
def dedicated_gateway(
    gateway: Any,
    chain: Chain,
    tmp_path: Path,
    *,
    upstream_url: str | None = None,
    read_timeout: float | None = None,
    rpc_url: str | None = None,
    chain_settings: dict[str, Any] | None = None,
    upstreams: list[Any] | None = None,
    **overrides: Any,
) -> Iterator[tuple[str, Any]]:
    """A gateway of its own (own ledger, own funded settlement key), its upstream, chain or other
    settings changed; yields its URL and an engine on its ledger."""
    s = with_own_settler(gateway.settings)
    upstream = {"url": upstream_url, "read_timeout": read_timeout}
    settings = s.model_copy(
        update={
            "database_url": f"sqlite:///{tmp_path / f'ledger-{uuid.uuid4().hex}.sqlite3'}",
            "upstream": s.upstream.model_copy(update={k: v for k, v in upstream.items() if v is not None}),
            "upstreams": upstreams or [],
            "chain": s.chain.model_copy(
                update={**({"rpc_url": rpc_url} if rpc_url is not None else {}), **(chain_settings or {})}
            ),
            **overrides,
        }
    )
    engine = create_engine(settings.database_url)
    try:
        with ServerThread(create_app(settings)) as server:
            yield server.url, engine
    finally:
        engine.dispose()


# -- EIP-712 / EIP-3009, independently of the gateway's own hashing ----------------------------------

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
EIP712_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
AUTHORIZATION_FIELDS = [  # of TransferWithAuthorization and ReceiveWithAuthorization alike
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


def transfer_typed_data(
    authorization: Mapping[str, Any],
    *,
    token: str,
    chain_id: int,
    name: str = "USD Coin",
    version: str = "2",
    primary_type: str = "TransferWithAuthorization",
) -> dict[str, Any]:
    """An EIP-3009 authorization as EIP-712 typed data, for eth-account's generic encoder
    (``encode_typed_data(full_message=...)``): the tests' reference, independent of the hand-rolled
    hashing in ``tollway.payments.eip3009``.

    ``authorization`` has the x402 field names (from, to, value, validAfter, validBefore, nonce);
    its numbers may be decimal strings, its nonce bytes or 0x-hex.
    """
    cs = Web3.to_checksum_address
    nonce = authorization["nonce"]
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_FIELDS, primary_type: AUTHORIZATION_FIELDS},
        "primaryType": primary_type,
        "domain": {"name": name, "version": version, "chainId": chain_id, "verifyingContract": cs(token)},
        "message": {
            "from": cs(authorization["from"]),
            "to": cs(authorization["to"]),
            "value": int(authorization["value"]),
            "validAfter": int(authorization["validAfter"]),
            "validBefore": int(authorization["validBefore"]),
            "nonce": nonce if isinstance(nonce, bytes) else bytes.fromhex(nonce[2:]),
        },
    }


def authorize(
    payer: Any,
    offer: dict[str, Any],
    *,
    signer: Any = None,
    token: str | None = None,
    chain_id: int | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """An ``exact`` payload for ``offer`` with authorization fields overridden, then (re-)signed.

    ``signer``/``token``/``chain_id`` sign with another key or over another EIP-712 domain, through
    eth-account's generic encoder.
    """
    now = int(time.time())
    auth = {
        "from": payer.address,
        "to": offer["payTo"],
        "value": str(offer["amount"]),
        "validAfter": str(now - 60),
        "validBefore": str(now + int(offer.get("maxTimeoutSeconds", 300))),
        "nonce": "0x" + secrets.token_hex(32),
    }
    auth.update({k: str(v) if isinstance(v, int) else v for k, v in changes.items()})
    extra = offer.get("extra") or {}
    typed_data = transfer_typed_data(
        auth,
        token=token or offer["asset"],
        chain_id=chain_id or int(offer["network"].split(":")[1]),
        name=extra.get("name", "USD Coin"),
        version=extra.get("version", "2"),
    )
    signed = (signer or payer).sign_message(encode_typed_data(full_message=typed_data))
    return {"signature": "0x" + bytes(signed.signature).hex(), "authorization": auth}


def high_s_twin(signature: bytes) -> bytes:
    """The malleable twin of a 65-byte r‖s‖v signature: (r, n - s, v flipped 27 <-> 28) recovers the
    same signer, with a high s."""
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    return r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])


class RpcSwitch:
    """A JSON-RPC proxy to anvil that can be made to fail: ``mode`` is up | http-502 | garbage | rpc-error.
    ``calls`` counts the JSON-RPC calls it was asked (a batch counts each of its calls), ``posts``
    the round trips; the methods in ``unknown`` are answered as a node without them answers."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.mode = "up"
        self.calls: list[str] = []
        self.posts = 0
        self.unknown: set[str] = set()
        self.simulate_reply: Callable[[Any], Any] | None = None  # rewrites eth_simulateV1's result
        self.simulate_status: int | None = None  # the HTTP status a batch asking eth_simulateV1 gets
        self.max_log_range: int | None = None  # blocks an eth_getLogs may span (a hosted RPC's cap)

    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        doc = json.loads(raw)
        self.calls += [c.get("method", "") for c in (doc if isinstance(doc, list) else [doc])]
        self.posts += 1
        if self.mode == "http-502":
            return Response(b"<html>502 Bad Gateway</html>", status_code=502, media_type="text/html")
        if self.mode == "garbage":
            return Response(b"<html>maintenance</html>", status_code=200, media_type="text/html")
        if self.mode == "rpc-error":  # what a rate-limited public RPC answers
            doc = json.loads(raw)

            def err(call: dict[str, Any]) -> dict[str, Any]:
                return {"jsonrpc": "2.0", "id": call.get("id"), "error": {"code": -32005, "message": "rate limited"}}

            reply = [err(c) for c in doc] if isinstance(doc, list) else err(doc)
            return Response(json.dumps(reply).encode(), media_type="application/json")
        calls = doc if isinstance(doc, list) else [doc]
        if any(c.get("method") in self.unknown for c in calls):
            known = [c for c in calls if c.get("method") not in self.unknown]
            replies = {r["id"]: r for r in (await self._forward(json.dumps(known).encode())).json()} if known else {}
            missing = {"code": -32601, "message": "the method does not exist/is not available"}
            reply = [replies.get(c.get("id")) or {"jsonrpc": "2.0", "id": c.get("id"), "error": missing} for c in calls]
            body = json.dumps(reply if isinstance(doc, list) else reply[0]).encode()
            return Response(body, media_type="application/json")
        if self.max_log_range is not None and any([await self._too_wide(c) for c in calls]):
            wide = {"code": -32005, "message": f"query exceeds max block range {self.max_log_range}"}
            reply = [{"jsonrpc": "2.0", "id": c.get("id"), "error": wide} for c in calls]
            return Response(
                json.dumps(reply if isinstance(doc, list) else reply[0]).encode(), media_type="application/json"
            )
        simulating = [c.get("id") for c in calls if c.get("method") == "eth_simulateV1"]
        if simulating and self.simulate_status is not None:
            return Response(b'{"error":"refused"}', status_code=self.simulate_status, media_type="application/json")
        r = await self._forward(raw)
        if simulating and self.simulate_reply is not None:
            replies = r.json()
            for reply in replies if isinstance(replies, list) else [replies]:
                if reply.get("id") in simulating and "result" in reply:
                    reply["result"] = self.simulate_reply(reply["result"])
            return Response(json.dumps(replies).encode(), media_type="application/json")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    async def _too_wide(self, call: dict[str, Any]) -> bool:
        if call.get("method") != "eth_getLogs" or self.max_log_range is None:
            return False
        query = call["params"][0]
        top = query.get("toBlock", "latest")
        if top in ("latest", "pending"):
            head = {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}
            top = (await self._forward(json.dumps(head).encode())).json()["result"]
        return int(top, 16) - int(query.get("fromBlock", "0x0"), 16) + 1 > self.max_log_range

    async def _forward(self, raw: bytes) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(self.target, content=raw, headers={"content-type": "application/json"})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/", self.handle, methods=["POST"])])


def paying_upstream(name: str, url: str, wallet: Any, devnet: Devnet) -> Any:
    """An upstream that is itself a tollway, paid from ``wallet`` in the devnet token."""
    from tollway.config import UpstreamSettings

    return UpstreamSettings(
        name=name,
        url=url,
        payer_key="0x" + bytes(wallet.key).hex(),
        pay_assets=[f"eip155:{devnet.chain_id}:{devnet.token}"],
    )


def drop_sessions(postgres_url: str) -> int:
    """What a PostgreSQL restart, a fail-over or an idle-session timeout does to a replica's
    connections: every session of the ledger's database but this one is ended."""
    import psycopg

    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        ended = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND datname = current_database() AND backend_type = 'client backend'"
        ).fetchall()
    return len(ended)
