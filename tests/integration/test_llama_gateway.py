"""tollway in front of a real llama.cpp llama-server: its prompt cache is reported through the
gateway, billed at the cache price and counted in /v1/stats/cache — also through two tollways."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from fractions import Fraction

import httpx
import pytest
from x402.http.clients import x402HttpxClient

from conftest import gateway_settings
from llama import MODEL_ALIAS
from support import ADMIN, ServerThread, paying_upstream, upto_client, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport, anthropic_client, openai_client
from tollway.config import ModelPrice, UpstreamSettings
from tollway.pricing import to_atomic

PRICE = ModelPrice(prompt=Decimal("0.000002"), completion=Decimal("0.000004"), cache_read=Decimal("0.0000002"))
SYSTEM = "You answer questions about the assistant and its rules. " + " ".join(
    f"The rule number {i} says the assistant is careful." for i in range(40)
)


def llama_gateway_settings(devnet, llama_upstream: str, db, **extra):
    settings = gateway_settings(devnet, "", db)
    return settings.model_copy(
        update={
            "models": {MODEL_ALIAS: PRICE},
            "upstreams": [UpstreamSettings(name="llama", url=llama_upstream, **extra)],
        }
    )


@pytest.fixture(scope="module")
def llama_gateway(devnet, llama_upstream, tmp_path_factory):
    with ServerThread(
        create_app(llama_gateway_settings(devnet, llama_upstream, tmp_path_factory.mktemp("llama") / "l.sqlite3"))
    ) as gw:
        yield gw


@pytest.fixture(scope="module")
def chained_to_llama(devnet, chain, llama_gateway, tmp_path_factory):
    """client → outer tollway → inner tollway (llama_gateway) → llama-server."""
    wallet = chain.fund(amount=10**9)
    settings = gateway_settings(devnet, "", tmp_path_factory.mktemp("outer") / "l.sqlite3")
    settings = settings.model_copy(
        update={
            "models": {MODEL_ALIAS: PRICE},
            "upstreams": [paying_upstream("inner", llama_gateway.url + "/v1", wallet, devnet)],
        }
    )
    with ServerThread(create_app(settings)) as gw:
        yield gw


def client(url: str, chain, devnet) -> httpx.Client:
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    return httpx.Client(transport=SyncPayingTransport(payer), base_url=url, timeout=60)


def ask(http: httpx.Client, messages: list[dict], stream: bool = False) -> tuple[str, list[dict]]:
    """One call: its receipt id and the cache hops it reported."""
    body = {"model": MODEL_ALIAS, "messages": messages, "max_tokens": 6, "stream": stream}
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.headers["x-tollway-receipt"], json.loads(r.headers["x-tollway-cache"])
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.read().decode().splitlines()
    summary = json.loads([x for x in lines if x.startswith(": tollway ")][-1][len(": tollway ") :])
    return r.headers["x-tollway-receipt"], summary["cache"]


def conversation(tag: str) -> tuple[list[dict], list[dict]]:
    first = [{"role": "system", "content": f"{tag}. {SYSTEM}"}, {"role": "user", "content": "What is rule 3?"}]
    second = [
        *first,
        {"role": "assistant", "content": "It says to be careful."},
        {"role": "user", "content": "And rule 7?"},
    ]
    return first, second


@pytest.mark.parametrize("stream", [False, True])
def test_llama_cache_hits_are_billed_at_the_cache_price(llama_gateway, chain, devnet, stream):
    first, second = conversation(f"direct {stream}")
    with client(llama_gateway.url, chain, devnet) as http:
        ask(http, first, stream)
        receipt_id, hops = ask(http, second, stream)
    receipt = wait_receipt(llama_gateway.url, receipt_id)
    usage = receipt["usage"]
    assert usage["cached_tokens"] > 300  # llama-server kept the first prompt's KV cache ...
    assert hops[0]["cached_tokens"] == usage["cached_tokens"] and hops[0]["upstream"] == "llama"
    assert hops[0]["expected_cached_tokens"] > 300  # ... as tollway expected
    plain = usage["prompt_tokens"] - usage["cached_tokens"]
    usd = (
        plain * Fraction(PRICE.prompt)
        + usage["cached_tokens"] * Fraction(PRICE.cache_read)
        + usage["completion_tokens"] * Fraction(PRICE.completion)
    )
    assert int(receipt["cost"]["atomic"]) == to_atomic(usd, 6)  # cached tokens at the cache price
    assert int(receipt["cache_discount"]["atomic"]) > 0

    stats = httpx.get(f"{llama_gateway.url}/v1/stats/cache", headers=ADMIN).json()["windows"]["5m"]
    row = next(s for s in stats if s["model"] == MODEL_ALIAS and s["upstream"] == "llama")
    assert row["cached_tokens"] >= usage["cached_tokens"] and row["hit_rate"] > 0 and row["survival"] > 0.5


@pytest.mark.parametrize("stream", [False, True])
def test_llama_cache_survives_two_tollways(chained_to_llama, llama_gateway, chain, devnet, stream):
    first, second = conversation(f"chained {stream}")
    with client(chained_to_llama.url, chain, devnet) as http:
        ask(http, first, stream)
        receipt_id, hops = ask(http, second, stream)
    outer, inner = hops
    assert (outer["upstream"], inner["upstream"]) == ("inner", "llama")
    assert inner["cached_tokens"] > 300 and outer["cached_tokens"] == inner["cached_tokens"]
    assert outer["expected_cached_tokens"] > 300 and inner["expected_cached_tokens"] > 300
    assert int(outer["discount_passed"]) > 0 and int(inner["discount_passed"]) > 0  # passed on at each hop
    receipt = wait_receipt(chained_to_llama.url, receipt_id)
    assert receipt["usage"]["cached_tokens"] == inner["cached_tokens"]
    outer_stats = httpx.get(f"{chained_to_llama.url}/v1/stats/cache", headers=ADMIN).json()["windows"]["5m"]
    assert any(s["upstream"] == "inner" and s["cached_tokens"] > 0 for s in outer_stats)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_official_upto_client_is_debited_the_cache_discounted_cost(llama_gateway, chain, devnet, stream):
    """The unmodified official client pays with upto: the second call of a conversation reuses
    llama-server's KV cache, and the wallet is debited exactly its metered cost — cached tokens at
    the cache price — not the quote."""
    payer = chain.fund(permit2=True)
    first, second = conversation(f"upto {stream}")
    async with x402HttpxClient(upto_client(payer, devnet), timeout=60) as http:
        for messages in (first, second):
            body = {"model": MODEL_ALIAS, "messages": messages, "max_tokens": 6, "stream": stream}
            before = chain.balance(payer.address)
            if stream:
                async with http.stream("POST", llama_gateway.url + "/v1/chat/completions", json=body) as r:
                    await r.aread()
            else:
                r = await http.post(llama_gateway.url + "/v1/chat/completions", json=body)
            assert r.status_code == 200
            receipt = await asyncio.to_thread(wait_receipt, llama_gateway.url, r.headers["x-tollway-receipt"])
            assert receipt["payment"]["scheme"] == "upto"
            assert chain.balance(payer.address) == before - int(receipt["cost"]["atomic"])
    usage = receipt["usage"]
    assert usage["cached_tokens"] > 300
    plain = usage["prompt_tokens"] - usage["cached_tokens"]
    usd = (
        plain * Fraction(PRICE.prompt)
        + usage["cached_tokens"] * Fraction(PRICE.cache_read)
        + usage["completion_tokens"] * Fraction(PRICE.completion)
    )
    assert int(receipt["cost"]["atomic"]) == to_atomic(usd, 6) < int(receipt["quote"]["atomic"])
    assert int(receipt["payment"]["amount"]["atomic"]) == int(receipt["cost"]["atomic"])


def cache_priced(usage: dict) -> int:
    plain = usage["prompt_tokens"] - usage["cached_tokens"]
    usd = (
        plain * Fraction(PRICE.prompt)
        + usage["cached_tokens"] * Fraction(PRICE.cache_read)
        + usage["completion_tokens"] * Fraction(PRICE.completion)
    )
    return to_atomic(usd, 6)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_messages_reach_llama_server_metered_in_anthropics_dialect(llama_gateway, chain, devnet, stream):
    """The Anthropic SDK through tollway to llama-server's own /v1/messages: the second call of a
    conversation reads llama's KV cache, billed at the cache price from Anthropic's usage fields."""
    client = anthropic_client(
        llama_gateway.url, Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    )
    first, second = conversation(f"messages {stream}")
    for messages in (first, second):
        kw = {"model": MODEL_ALIAS, "max_tokens": 6, "system": messages[0]["content"], "messages": messages[1:]}
        if stream:
            with client.messages.stream(**kw) as s:
                usage = s.get_final_message().usage
                receipt_id = s.response.headers["x-tollway-receipt"]
        else:
            r = client.messages.with_raw_response.create(**kw)
            usage, receipt_id = r.parse().usage, r.headers["x-tollway-receipt"]
    receipt = wait_receipt(llama_gateway.url, receipt_id)
    metered = receipt["usage"]
    assert metered["dialect"] == "anthropic" and metered["cached_tokens"] == usage.cache_read_input_tokens > 300
    assert metered["prompt_tokens"] == usage.input_tokens + usage.cache_read_input_tokens
    assert metered["completion_tokens"] == usage.output_tokens
    assert int(receipt["cost"]["atomic"]) == cache_priced(metered)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_responses_reach_llama_server_metered_in_its_dialect(llama_gateway, chain, devnet, stream):
    """The OpenAI SDK's Responses API through tollway to llama-server's /v1/responses."""
    client = openai_client(
        llama_gateway.url + "/v1", Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    )
    first, second = conversation(f"responses {stream}")
    for messages in (first, second):
        kw = {"model": MODEL_ALIAS, "max_output_tokens": 6, "instructions": messages[0]["content"]}
        kw["input"] = [{"type": "message", **m} for m in messages[1:]]
        if stream:
            with client.responses.with_streaming_response.create(**kw, stream=True) as s:
                events = [json.loads(x[5:]) for x in s.iter_lines() if x.startswith("data:")]
                receipt_id = s.headers["x-tollway-receipt"]
            usage = next(e for e in events if e["type"] == "response.completed")["response"]["usage"]
        else:
            r = client.responses.with_raw_response.create(**kw)
            usage, receipt_id = r.parse().usage.model_dump(), r.headers["x-tollway-receipt"]
    receipt = wait_receipt(llama_gateway.url, receipt_id)
    metered = receipt["usage"]
    assert metered["cached_tokens"] == usage["input_tokens_details"]["cached_tokens"] > 300
    assert metered["prompt_tokens"] == usage["input_tokens"] and metered["completion_tokens"] == usage["output_tokens"]
    assert int(receipt["cost"]["atomic"]) == cache_priced(metered)


def test_embeddings_reach_a_llama_server_that_serves_them(
    devnet, chain, llama_upstream, llama_embeddings_upstream, tmp_path
):
    """Two llama-servers: one generating, one started with --embeddings (its own surface). An
    embeddings call goes to the second, paid and charged the prompt tokens llama counted."""
    settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
    upstreams = [
        UpstreamSettings(name="llama", url=llama_upstream, surfaces=["chat", "messages", "responses"]),
        UpstreamSettings(name="llama-embeddings", url=llama_embeddings_upstream, surfaces=["embeddings"]),
    ]
    settings = settings.model_copy(update={"models": {MODEL_ALIAS: PRICE}, "upstreams": upstreams})
    with ServerThread(create_app(settings)) as gw:
        client = openai_client(
            gw.url + "/v1", Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
        )
        r = client.embeddings.with_raw_response.create(model=MODEL_ALIAS, input=["the first text", "a second"])
        got = r.parse()
        assert len(got.data) == 2 and len(got.data[0].embedding) > 8
        receipt = wait_receipt(gw.url, r.headers["x-tollway-receipt"])
        assert receipt["upstream"] == "llama-embeddings"
        assert receipt["usage"]["prompt_tokens"] == got.usage.prompt_tokens > 0
        assert receipt["usage"]["completion_tokens"] == 0
        assert int(receipt["cost"]["atomic"]) == to_atomic(got.usage.prompt_tokens * Fraction(PRICE.prompt), 6)
        chat = client.chat.completions.create(
            model=MODEL_ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content  # (chat still goes to the generating one)


def test_a_message_goes_through_two_tollways_to_llama_server(chained_to_llama, chain, devnet):
    """Messages through a chain: the outer tollway pays the inner one's 402 for /v1/messages."""
    client = anthropic_client(
        chained_to_llama.url, Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    )
    with client.messages.stream(
        model=MODEL_ALIAS, max_tokens=5, system=SYSTEM, messages=[{"role": "user", "content": "chained message"}]
    ) as s:
        final = s.get_final_message()
        receipt_id = s.response.headers["x-tollway-receipt"]
    receipt = wait_receipt(chained_to_llama.url, receipt_id)
    assert receipt["upstream"] == "inner" and receipt["usage"]["completion_tokens"] == final.usage.output_tokens
    assert receipt["usage"]["dialect"] == "anthropic"
