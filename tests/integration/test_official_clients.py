"""The official x402 clients, unmodified, against tollway: the JavaScript client (npm ``@x402/fetch``,
``@x402/evm`` upto, ``@x402/extensions`` sign-in-with-x) and the Python SDK with its extensions
(PyPI ``x402[extensions]``: its sign-in needs web3 < 8, so it lives in ``.venv-x402``). Each runs
as a script of ``tests/clients`` that prints what it saw; ``./scripts/setup --test`` installs both."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import CHAT, SETTLE_WAIT, chat_body, credit, payment_rows, wait_receipt
from tollway.client import AllowedAsset, Payer, SyncPayingTransport

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "tests" / "clients"
SDK_PYTHON = ROOT / ".venv-x402" / "bin" / "python"
NODE_MODULES = ROOT / ".tools" / "node_modules"
SETUP = "run ./scripts/setup --test to install it"
FUNDING = {"max_tokens": 16_384, "n": 2}  # an exact payment of twice a metered call's quote: the surplus covers one


# -- the clients ------------------------------------------------------------------------------


def run_client(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a client script; the JSON line it printed."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{command[1]} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def client_args(gateway, devnet, account: Any, scenario: str, body: dict[str, Any]) -> list[str]:
    return [
        *("--url", gateway.url, "--key", "0x" + bytes(account.key).hex()),
        *("--chain-id", str(devnet.chain_id), "--token", devnet.token),
        *("--scenario", scenario, "--body", json.dumps(body)),
    ]


def python_sdk(gateway, devnet, account: Any, scenario: str, body: dict[str, Any], *extra: str) -> dict[str, Any]:
    """``tests/clients/x402_sdk.py`` run by the official Python SDK's own venv."""
    assert SDK_PYTHON.exists(), f"{SDK_PYTHON} (the official x402 SDK with its extensions) is missing: {SETUP}"
    script = str(CLIENTS / "x402_sdk.py")
    return run_client([str(SDK_PYTHON), script, *client_args(gateway, devnet, account, scenario, body), *extra])


def js_client(gateway, devnet, account: Any, scenario: str, body: dict[str, Any]) -> dict[str, Any]:
    """``tests/clients/x402_fetch.mjs`` run by node on the pinned npm packages."""
    node = shutil.which("node")
    assert node, "node is needed for the official JavaScript client: install Node.js (with npm)"
    assert (NODE_MODULES / "@x402" / "fetch").is_dir(), (
        f"{NODE_MODULES}/@x402 (the official JS client) is missing: {SETUP}"
    )
    args = client_args(gateway, devnet, account, scenario, body)
    env = {"PATH": str(Path(node).parent), "NODE_PATH": str(NODE_MODULES)}
    return run_client([node, str(CLIENTS / "x402_fetch.mjs"), *args, "--rpc-url", devnet.rpc_url], env)


def request_body(text: str, **extra: Any) -> dict[str, Any]:
    """A chat request with no output cap: a metered payment authorises the metered cap's price."""
    body = chat_body(text, **extra)
    del body["max_tokens"]
    return body


def sent(out: dict[str, Any]) -> list[tuple[bool, bool, int]]:
    """What the client sent, request by request: (signed in, paid, status answered)."""
    return [(s["sign_in"], s["payment_signature"], s["status"]) for s in out["sent"]]


UNPAID, SIGNED_IN, PAID = (False, False, 402), (True, False, 200), (False, True, 200)


# -- the wallets ------------------------------------------------------------------------------


def upto_wallet(chain) -> Any:
    """A fresh wallet with test USDC and a Permit2 approval, as an upto payer has; no credit."""
    return chain.fund(permit2=True)


def wallet_with_credit(gateway, chain, devnet) -> tuple[Any, Payer]:
    """A fresh wallet with credit at the gateway that covers a metered call: one call paid with
    tollway's client in ``exact``, which pays the quote — for two choices at the metered cap — and
    keeps the surplus as credit (final once the payment settled). Returns the account and that
    client's payer."""
    account = chain.fund(permit2=True)
    payer = Payer(account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
    with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        r = http.post(gateway.url + CHAT, json=chat_body("fund my credit", **FUNDING))
    assert r.status_code == 200, r.text
    wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    return account, payer


def settled(gateway, out: dict[str, Any]) -> dict[str, Any]:
    """The receipt of a client's call, once its payment settled."""
    call = out["call"]
    assert call["status"] == 200, call["body"][:500]
    return wait_receipt(gateway.url, call["headers"]["x-tollway-receipt"])


# -- the JavaScript client --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_the_js_client_pays_upto_the_metered_cost(gateway, chain, devnet, stream):
    """@x402/fetch with @x402/evm's upto pays the 402 once, and the wallet is debited the metered
    cost — exactly, and far below the maximum it authorised — streamed or not."""
    payer = upto_wallet(chain)
    before = chain.balance(payer.address)
    out = js_client(gateway, devnet, payer, "stream" if stream else "pay", request_body("js upto", stream=stream))
    assert sent(out) == [UNPAID, PAID]
    doc = settled(gateway, out)
    cost = int(doc["cost"]["atomic"])
    assert doc["payment"]["scheme"] == "upto" and int(doc["payment"]["amount"]["atomic"]) == cost
    assert chain.balance(payer.address) == before - cost
    assert 0 < cost < int(doc["quote"]["atomic"]) // 100
    if stream:
        lines = out["call"]["body"].splitlines()
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
        assert "data: [DONE]" in lines
        summary = json.loads(next(line for line in lines if line.startswith(": tollway "))[10:])  # the stream's end
        assert summary["settlement"] == {"transaction": doc["payment"]["transaction"], "amount": str(cost)}
    else:
        assert json.loads(out["call"]["body"])["choices"][0]["message"]["content"]


def test_the_js_client_signed_in_is_served_from_credit(gateway, chain, devnet):
    """With @x402/extensions' sign-in-with-x registered, a wallet whose credit covers the call
    signs the 402's sign-in and is served with no payment: nothing moves on chain, and its credit
    goes down by the call's cost."""
    account, payer = wallet_with_credit(gateway, chain, devnet)
    before_chain, before_credit = chain.balance(account.address), credit(gateway.url, payer)
    out = js_client(gateway, devnet, account, "siwx", request_body("js signed in"))
    assert sent(out) == [UNPAID, SIGNED_IN]
    doc = settled(gateway, out)
    assert doc["payment"]["scheme"] == "credit" and doc["payment"]["transaction"] is None
    assert chain.balance(account.address) == before_chain
    assert credit(gateway.url, payer) == before_credit - int(doc["cost"]["atomic"])


# -- the Python SDK with its extensions -------------------------------------------------------


def test_the_python_sdk_signed_in_is_served_from_credit(gateway, chain, devnet):
    """The SDK's sign-in-with-x client extension signs the 402's sign-in; a wallet whose credit
    covers the call is served from it: no payment, nothing on chain."""
    account, payer = wallet_with_credit(gateway, chain, devnet)
    before_chain, before_credit = chain.balance(account.address), credit(gateway.url, payer)
    out = python_sdk(gateway, devnet, account, "pay", request_body("sdk signed in"))
    assert sent(out) == [UNPAID, SIGNED_IN]
    doc = settled(gateway, out)
    assert doc["payment"]["scheme"] == "credit" and doc["payment"]["transaction"] is None
    assert chain.balance(account.address) == before_chain
    assert credit(gateway.url, payer) == before_credit - int(doc["cost"]["atomic"])


def test_the_python_sdk_without_credit_pays_upto_after_signing_in(gateway, chain, devnet):
    """A wallet with no credit: the sign-in is answered 402 again, and the SDK then pays the first
    402's upto offer; the debit is the metered cost."""
    payer = upto_wallet(chain)
    before = chain.balance(payer.address)
    out = python_sdk(gateway, devnet, payer, "pay", request_body("sdk no credit"))
    assert sent(out) == [UNPAID, (True, False, 402), PAID]
    doc = settled(gateway, out)
    cost = int(doc["cost"]["atomic"])
    assert doc["payment"]["scheme"] == "upto" and int(doc["payment"]["amount"]["atomic"]) == cost
    assert chain.balance(payer.address) == before - cost
    assert 0 < cost < int(doc["quote"]["atomic"]) // 100


def test_the_python_sdk_payment_identifier_is_served_once(gateway, chain, devnet, upstream):
    """A payment carrying a payment-identifier id (added the SDK's way): the very same request sent
    again gets the first answer (``idempotent-replayed: true``) — the upstream asked once, the wallet
    debited once — and another request under the same id is refused (409)."""
    payer = upto_wallet(chain)
    before = chain.balance(payer.address)
    asked = httpx.get(f"{upstream.url}/mock/stats").json()["requests"]
    other = json.dumps(request_body("sdk idempotent, another request"))
    out = python_sdk(gateway, devnet, payer, "identifier", request_body("sdk idempotent"), "--other-body", other)
    first, replay, reused = out["first"], out["replay"], out["other"]
    assert out["captured_is_sent"]  # the hook's header is the one the SDK sent, and it carries the id
    assert out["sent_id"] == out["payment_id"]
    assert sent(out)[:2] == [UNPAID, PAID]
    assert replay["status"] == 200 and replay["headers"].get("idempotent-replayed") == "true"
    assert "idempotent-replayed" not in first["headers"]
    assert replay["body"] == first["body"]
    assert replay["headers"]["x-tollway-receipt"] == first["headers"]["x-tollway-receipt"]
    assert reused["status"] == 409 and json.loads(reused["body"])["error"]["code"] == "payment_identifier_reused"
    assert httpx.get(f"{upstream.url}/mock/stats").json()["requests"] == asked + 1
    doc = settled(gateway, {"call": first})
    cost = int(doc["cost"]["atomic"])
    assert doc["payment"]["scheme"] == "upto" and int(doc["payment"]["amount"]["atomic"]) == cost
    time.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before - cost
    assert [p["state"] for p in payment_rows(gateway.store.engine, payer.address)] == ["settled"]
