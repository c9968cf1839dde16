"""POST /v1/embeddings, paid the same way as chat: quoted on its input's bound, charged its
metered prompt tokens, through the official OpenAI SDK too; a quote for it pays nothing else."""

from __future__ import annotations

import time
from fractions import Fraction

import httpx
import pytest

from conftest import gateway_settings
from support import ServerThread, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport, openai_client
from tollway.client.payer import sign_exact
from tollway.config import UpstreamSettings
from tollway.mock_upstream import create_app as create_mock
from tollway.payments.x402 import b64json, unb64json
from tollway.pricing import to_atomic

BODY = {"model": "mock/echo", "input": ["the first text", "and a second one"]}


@pytest.fixture(scope="module")
def gw(devnet, tmp_path_factory):
    """Two upstreams: "chat-only" (first, but speaks no embeddings) and "both"."""
    with ServerThread(create_mock()) as chat_only, ServerThread(create_mock()) as both:
        settings = gateway_settings(devnet, "", tmp_path_factory.mktemp("embeddings") / "l.sqlite3")
        upstreams = [
            UpstreamSettings(name="chat-only", url=chat_only.url + "/v1", surfaces=["chat"]),
            UpstreamSettings(name="both", url=both.url + "/v1"),
        ]
        settings = settings.model_copy(update={"upstreams": upstreams})
        with ServerThread(create_app(settings)) as server:
            yield server, settings


def payer_of(chain, devnet) -> Payer:
    return Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])


def test_an_embedding_is_quoted_paid_and_charged_its_prompt_tokens(gw, chain, devnet):
    server, settings = gw
    unpaid = httpx.post(f"{server.url}/v1/embeddings", json=BODY)
    assert unpaid.status_code == 402 and "payment-required" in unpaid.headers
    with httpx.Client(transport=SyncPayingTransport(payer_of(chain, devnet)), timeout=30) as http:
        r = http.post(f"{server.url}/v1/embeddings", json=BODY)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [len(d["embedding"]) for d in doc["data"]] == [8, 8] and doc["usage"]["prompt_tokens"] > 0
    receipt = wait_receipt(server.url, r.headers["x-tollway-receipt"])
    assert receipt["upstream"] == "both" and receipt["api"] == "embeddings"  # (the first speaks no embeddings)
    price = settings.models["mock/echo"]
    usd = receipt["usage"]["prompt_tokens"] * Fraction(price.prompt) + Fraction(price.request)
    assert receipt["usage"]["completion_tokens"] == 0 and int(receipt["cost"]["atomic"]) == to_atomic(usd, 6)
    assert Fraction(str(doc["usage"]["cost"])) == Fraction(to_atomic(usd, 6), 10**6)


def test_the_openai_sdk_pays_for_embeddings(gw, chain, devnet):
    client = openai_client(gw[0].url + "/v1", payer_of(chain, devnet))
    got = client.embeddings.create(model="mock/echo", input=[[1, 2, 3], [4, 5]])
    assert [len(d.embedding) for d in got.data] == [8, 8] and got.usage.prompt_tokens == 5


def test_a_quote_for_an_embedding_pays_no_chat_call(gw, chain):
    url = gw[0].url
    both = {**BODY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}  # (valid for both APIs)
    required = unb64json(httpx.post(f"{url}/v1/embeddings", json=both).headers["payment-required"])
    offer = next(o for o in required["accepts"] if o["scheme"] == "exact")
    doc = {"x402Version": 2, "resource": required["resource"], "accepted": offer}
    doc["payload"] = sign_exact(chain.fund(), offer, int(time.time()))
    r = httpx.post(f"{url}/v1/chat/completions", json=both, headers={"PAYMENT-SIGNATURE": b64json(doc)})
    assert r.status_code == 402, r.text


@pytest.mark.parametrize("given", [None, "", [], [""], [1, "x"], [[]], [True], {"text": "x"}, ["x"] * 2049])
def test_malformed_input_is_refused_before_any_quote(gw, given):
    r = httpx.post(f"{gw[0].url}/v1/embeddings", json={"model": "mock/echo", "input": given})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input", r.text


def test_an_embedding_no_upstream_here_speaks_is_refused(gw):
    r = httpx.post(f"{gw[0].url}/v1/embeddings", json={**BODY, "provider": {"only": ["chat-only"]}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_route", r.text
