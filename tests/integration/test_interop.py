"""Clients nobody here wrote: the official x402 SDK (v2 and v1) and the OpenAI SDK."""

from __future__ import annotations

import time

import httpx
import pytest
from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.schemas.v1 import PaymentRequiredV1

from conftest import anvil_process, gateway_settings
from support import CHAT, Chain, ServerThread, exact_offer, free_port, payment_required, run_concurrently, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, async_openai_client, openai_client
from tollway.devnet.deploy import deploy_devnet

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "Say hi to the x402 SDK"}], "max_tokens": 12}


def quoted_amount(url: str, body: dict) -> int:
    return int(exact_offer(payment_required(httpx.post(url + CHAT, json=body)))["amount"])


def official_client(account, network: str, token: str, v1: bool = False) -> x402Client:
    client = x402Client()
    if v1:
        client.register_v1(network, ExactEvmSchemeV1(account))
    else:
        client.register(network, ExactEvmScheme(account))
    client.set_spend_controls(
        {"allowed_assets": [{"network": network, "asset": token, "max_amount_per_payment": "1000000"}]}
    )
    return client


async def test_official_x402_client_pays_on_anvil(gateway, chain, devnet):
    account = chain.fund()
    network = f"eip155:{devnet.chain_id}"
    quote = quoted_amount(gateway.url, BODY)
    payer_before, payee_before = chain.balance(account.address), chain.balance(devnet.payee)

    async with x402HttpxClient(official_client(account, network, devnet.token)) as http:
        r = await http.post(gateway.url + CHAT, json=BODY)

    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: Say hi to the x402 SDK"
    settle = decode_payment_response_header(r.headers["PAYMENT-RESPONSE"])
    assert settle.success and settle.network == network
    assert settle.payer.lower() == account.address.lower()
    wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    tx = chain.receipt(settle.transaction)
    assert tx["status"] == 1
    assert chain.balance(account.address) == payer_before - quote
    assert chain.balance(devnet.payee) == payee_before + quote


def test_openai_sdk_streams_a_paid_completion(gateway, chain, devnet, upstream):
    account = chain.fund()
    payer = Payer(account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    client = openai_client(f"{gateway.url}/v1", payer)
    words = " ".join(f"w{i}" for i in range(20))
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model="mock/echo",
        messages=[{"role": "user", "content": words}],
        max_tokens=40,
        stream=True,
        extra_body={"mock": {"chunk_delay": 0.05}},
    )
    arrivals, text = [], ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - t0)
            text += chunk.choices[0].delta.content
    assert text == "echo: " + words
    # ~22 chunks 50 ms apart: the first arrives long before the upstream has finished.
    assert arrivals[0] < arrivals[-1] - 0.5
    assert len(payer.history) == 1
    receipt = wait_receipt(gateway.url, payer.history[0].receipt_id)
    assert receipt["status"] == "served"
    assert receipt["usage"]["completion_tokens"] == 22


async def test_async_openai_client_pays(gateway, chain, devnet):
    account = chain.fund()
    payer = Payer(account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    client = async_openai_client(f"{gateway.url}/v1", payer)
    reply = await client.chat.completions.create(model="mock/echo", messages=[{"role": "user", "content": "async"}])
    assert reply.choices[0].message.content == "echo: async"
    assert reply.usage.prompt_tokens > 0
    assert payer.history[0].transaction.startswith("0x")


@pytest.fixture(scope="module")
def v1_gateway(xprocess, upstream, tmp_path_factory):
    """A gateway on a chain that has an x402 v1 name: anvil run as chain 84532 ("base-sepolia")."""
    with anvil_process(xprocess, "anvil-84532", chain_id=84532) as rpc:
        devnet = deploy_devnet(rpc)
        settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path_factory.mktemp("v1") / "ledger.sqlite3")
        port = free_port()  # a chain that is not the devnet: a public URL and a payee of its own
        chain = settings.chain.model_copy(update={"payee": Account.create().address})
        settings = settings.model_copy(update={"chain": chain, "public_url": f"http://127.0.0.1:{port}"})
        with ServerThread(create_app(settings), port) as server:
            yield server, devnet


async def test_official_x402_v1_payload_pays(v1_gateway):
    """A v1 client reads the 402 body and pays with X-PAYMENT; the SDK's own v1 code signs it.

    (The SDK's transport prefers the v2 header whenever a server sends one, so the v1 exchange is
    driven by hand here with the SDK's v1 parser, signer and header encoder.)
    """
    server, devnet = v1_gateway
    chain = Chain(devnet)
    account = Account.from_key(devnet.payer_keys[0])
    url = server.url + CHAT
    r = httpx.post(url, json=BODY)
    assert r.status_code == 402 and r.json()["x402Version"] == 1  # v1 clients read the body
    assert isinstance(r.json()["error"], str)  # as v1 clients parse it; the rest is said at the top level:
    assert r.json()["code"] == "payment_required" and r.json()["type"] == "insufficient_quota" and r.json()["message"]
    assert r.json()["accepts"][0]["network"] == "base-sepolia"
    quote = int(r.json()["accepts"][0]["maxAmountRequired"])
    before = chain.balance(account.address)

    sdk = x402HTTPClient(official_client(account, "base-sepolia", devnet.token, v1=True))
    required = PaymentRequiredV1.model_validate(r.json())
    payload = await sdk.create_payment_payload(required)
    headers = sdk.encode_payment_signature_header(payload)
    assert list(headers) == ["X-PAYMENT"]
    r = httpx.post(url, json=BODY, headers=headers)

    assert r.status_code == 200, r.text
    settle = decode_payment_response_header(r.headers["X-PAYMENT-RESPONSE"])
    assert settle.success and settle.network == "base-sepolia"
    wait_receipt(server.url, r.headers["x-tollway-receipt"])
    assert chain.balance(account.address) == before - quote
    again = httpx.post(url, json=BODY, headers=headers)
    assert again.status_code == 402 and "nonce_already_used" in again.json()["error"]


def test_many_payers_at_once(gateway, chain, devnet):
    """Concurrent paid calls from distinct payers all settle, each for its own quote."""
    accounts = [chain.fund() for _ in range(8)]
    before = chain.balance(devnet.payee)
    results: list[Payer] = []

    def one(account) -> None:
        payer = Payer(account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
        openai_client(f"{gateway.url}/v1", payer).chat.completions.create(
            model="mock/echo", messages=[{"role": "user", "content": f"hi from {account.address}"}]
        )
        results.append(payer)

    run_concurrently(one, accounts)
    assert len(results) == 8
    for payer in results:
        wait_receipt(gateway.url, payer.history[0].receipt_id)
    assert chain.balance(devnet.payee) == before + sum(p.history[0].amount for p in results)
