"""A paid call end to end on anvil, through the tollway client."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import gateway_settings
from support import ServerThread, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.mock_upstream import MockOptions
from tollway.mock_upstream import create_app as create_mock

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


def test_paid_call_moves_exactly_the_quote(gateway, chain, devnet):
    payer_account = chain.fund()
    payer = Payer(payer_account, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    before_payer, before_payee = chain.balance(payer_account.address), chain.balance(devnet.payee)
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url) as client:
        r = client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("echo:")
    paid = payer.history[-1]
    receipt = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert receipt["payment"]["transaction"] == paid.transaction
    assert chain.balance(payer_account.address) == before_payer - paid.amount
    assert chain.balance(devnet.payee) == before_payee + paid.amount
    assert chain.receipt(paid.transaction)["status"] == 1


def test_the_paid_retry_of_a_402_is_not_parsed_again(gateway, chain, devnet, monkeypatch):
    from tollway import pipeline
    from tollway.payments.x402 import unb64json

    parsed = []

    def parse_chat(raw, *a, **k):
        parsed.append(raw)
        return pipeline_parse(raw, *a, **k)

    def quote_expires(r: httpx.Response) -> int:
        assert r.status_code == 402, r.text
        return int(unb64json(r.headers["payment-required"])["accepts"][0]["extra"]["quote"].split(".")[0])

    pipeline_parse = pipeline.parse_chat
    monkeypatch.setattr(pipeline, "parse_chat", parse_chat)
    body = {**BODY, "user": "parsed-once"}
    first = quote_expires(httpx.post(gateway.url + "/v1/chat/completions", json=body))
    time.sleep(1.1)
    again = quote_expires(httpx.post(gateway.url + "/v1/chat/completions", json=body))
    assert again > first and len(parsed) == 1  # (the same parse, as if made on arrival)
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(payer.history) == 1  # (a 402, then its paid retry: the same bytes)
    assert len(parsed) == 1, "the retry parsed its body again"
    refused = {**body, "max_tokens": -1}
    for _ in range(2):  # (a request refused otherwise is not kept: parsed each time)
        assert httpx.post(gateway.url + "/v1/chat/completions", json=refused).status_code == 400
    assert len(parsed) == 3


@pytest.fixture(scope="module")
def generous_upstream(devnet, tmp_path_factory):
    """A gateway in front of an upstream whose own output cap, when a request sets none it reads, is
    generous (200 tokens)."""
    mock = create_mock(MockOptions(default_max_tokens=200))
    with ServerThread(mock) as up:
        settings = gateway_settings(devnet, up.url + "/v1", tmp_path_factory.mktemp("caps") / "l.sqlite3")
        with ServerThread(create_app(settings)) as server:
            yield server, mock.state.mock


LONG = " ".join(f"word{i}" for i in range(300))


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "n_predict": 2}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_new_tokens": 2}, "max_tokens"),
        ("/v1/responses", {"input": LONG, "max_tokens": 2}, "max_output_tokens"),
    ],
)
def test_attack_a_cap_in_a_field_the_upstream_does_not_read_bounds_what_it_generates(
    generous_upstream, chain, devnet, path, body, field
):
    """Priced at 2 output tokens, from a cap field this upstream does not read: were the body sent
    as it came, the upstream would generate (and bill the operator) up to its own default, 200."""
    server, mock = generous_upstream
    payer = Payer(chain.fund(permit2=True), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=server.url, timeout=30) as client:
        produced = mock.stats["completion_tokens"]
        r = client.post(path, json={"model": "mock/echo", **body})
    assert r.status_code == 200, r.text
    assert mock.last_request[field] == 2
    assert mock.stats["completion_tokens"] - produced <= 2
