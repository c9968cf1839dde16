"""What OpenAI-compatible clients see: errors they can read, streams that end the way they
expect, ``usage.cost`` that is what they paid, no usage chunk they did not ask for, and a 503
(not a quote) when nothing could serve the call."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest

from support import (
    ADMIN,
    CHAT,
    RpcSwitch,
    ServerThread,
    chat_body,
    dedicated_gateway,
    exact_payment,
    free_port,
    payment_header,
    payment_required,
    receipt,
    wait_receipt,
)
from tollway.client import AllowedAsset, Payer, SyncPayingTransport, openai_client


@pytest.fixture
def payer(chain, devnet) -> Payer:
    return Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], max_per_call_usd=Decimal(2))


def test_the_openai_sdk_names_the_reason_of_a_refusal(gateway):
    unpaid = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIStatusError) as exc:
        unpaid.chat.completions.create(model="mock/echo", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 402 and "PAYMENT-SIGNATURE header is required" in str(exc.value)
    assert exc.value.code == "payment_required" and exc.value.type == "insufficient_quota"
    with pytest.raises(openai.NotFoundError) as missing:
        unpaid.chat.completions.create(model="no/such-model", messages=[{"role": "user", "content": "hi"}])
    assert "is not offered here" in str(missing.value) and missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        unpaid.chat.completions.create(model="mock/echo", messages=[{"role": "user", "content": "x"}], n=99)
    assert "'n' may be at most" in str(bad.value)


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nothing", 404), ("DELETE", CHAT, 405)])
def test_every_error_is_json_in_openais_shape(gateway, method, path, status):
    r = httpx.request(method, gateway.url + path)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["type"] in ("not_found_error", "invalid_request_error")


def test_a_stream_that_breaks_ends_with_an_error_event_and_done(gateway, payer):
    body = chat_body(
        "one two three four five six",
        max_tokens=20,
        stream=True,
        mock={"fail_after_chunks": 2, "fail_mode": "disconnect"},
    )
    with (
        httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url, timeout=30) as http,
        http.stream("POST", CHAT, json=body) as r,
    ):
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "error" and "broke" in last["error"]["message"]
    assert lines[-1] == "data: [DONE]"
    doc = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert doc["status"] == "incomplete" and "broke" in doc["error"]


def test_usage_cost_is_what_the_payer_was_charged(gateway, payer):
    """The upstream's own figure (OpenRouter's dialect) moves to ``usage.upstream_cost``."""
    body = chat_body(
        "what did it cost",
        max_tokens=8,
        mock={"dialect": "openrouter", "cost_prices": {"prompt": 5e-7, "completion": 1e-6}},
    )
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url, timeout=30) as http:
        r = http.post(CHAT, json=body)
    assert r.status_code == 200
    usage = r.json()["usage"]
    doc = receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert usage["cost"] == float(doc["cost"]["usd"]) and int(r.headers["x-tollway-cost"]) == int(doc["cost"]["atomic"])
    assert usage["upstream_cost"] == pytest.approx(float(doc["usage"]["upstream_cost_usd"]))


def test_a_stream_gets_no_usage_chunk_it_did_not_ask_for(gateway, payer):
    """The classic loop over ``chunk.choices[0]`` must not crash on a chunk with no choices
    (tollway always asks the upstream for usage, to meter the call)."""
    client = openai_client(f"{gateway.url}/v1", payer)
    chunks = list(
        client.chat.completions.create(
            model="mock/echo", messages=[{"role": "user", "content": "stream it"}], max_tokens=8, stream=True
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == "echo: stream it" and all(chunk.usage is None for chunk in chunks)
    asked = client.chat.completions.create(
        model="mock/echo",
        messages=[{"role": "user", "content": "stream it"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in asked if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].cost > 0  # asked for: there, with tollway's charge


def test_no_quote_while_every_upstream_is_cooling_down(gateway, chain, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with (
        dedicated_gateway(gateway, chain, tmp_path, upstream_url=dead) as (url, _),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        assert http.post(CHAT, json=chat_body("first")).status_code == 402  # not known to be down yet
        payer = chain.fund()
        required = payment_required(http.post(CHAT, json=chat_body("tries the upstream")))
        paid = payment_header(exact_payment(payer, required))
        failed = http.post(CHAT, json=chat_body("tries the upstream"), headers=paid)
        assert failed.status_code == 503  # the upstream is unreachable: it cools down now
        r = http.post(CHAT, json=chat_body("second"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
        assert int(r.headers["retry-after"]) >= 1


def test_no_quote_while_the_chain_does_not_answer(gateway, chain, devnet, tmp_path):
    import time

    rpc = RpcSwitch(devnet.rpc_url)
    with ServerThread(rpc.app()) as proxy, dedicated_gateway(gateway, chain, tmp_path, rpc_url=proxy.url) as (url, _):
        assert httpx.post(url + CHAT, json=chat_body("up")).status_code == 402
        rpc.mode = "http-502"
        deadline = time.monotonic() + 20
        while (r := httpx.post(url + CHAT, json=chat_body("down"))).status_code != 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.5)
        assert r.json()["error"]["code"] == "chain_unavailable" and "retry-after" in r.headers
        health = httpx.get(url + "/healthz", headers=ADMIN)
        rpc.mode = "up"
    assert health.status_code in (200, 503)
