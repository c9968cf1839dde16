"""The billed amount equals the cost computed by hand from the upstream's own usage report,
in every usage dialect, streamed and not — cached tokens at the cache price."""

from __future__ import annotations

import json
from fractions import Fraction

import httpx
import pytest

from support import wait_receipt
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.pricing import to_atomic

PREFIX = "Shared context for the cache. " + " ".join(f"fact{i}." for i in range(150))


def hand_cost(price, usage: dict, timings: dict | None) -> Fraction:
    """Read one dialect's usage the way its vendor documents it, and price it."""
    p, c = Fraction(price.prompt), Fraction(price.completion)
    read, write = Fraction(price.cache_read), Fraction(price.cache_write)
    if "cache_read_input_tokens" in usage:  # Anthropic: input_tokens excludes both cache figures
        return (
            usage["input_tokens"] * p
            + usage["cache_read_input_tokens"] * read
            + usage["cache_creation_input_tokens"] * write
            + usage["output_tokens"] * c
        )
    if "prompt_cache_hit_tokens" in usage:  # DeepSeek: hit + miss = prompt
        return (
            usage["prompt_cache_hit_tokens"] * read
            + usage["prompt_cache_miss_tokens"] * p
            + usage["completion_tokens"] * c
        )
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    if cached is None and timings:  # llama.cpp also reports timings.cache_n
        cached = timings.get("cache_n")
    cached = cached or 0
    written = details.get("cache_write_tokens") or 0  # OpenRouter
    return (
        (usage["prompt_tokens"] - cached - written) * p
        + cached * read
        + written * write
        + usage["completion_tokens"] * c
    )


def call(http: httpx.Client, dialect: str, stream: bool, question: str) -> tuple[httpx.Response, dict, dict | None]:
    body = {
        "model": "mock/echo",
        "messages": [{"role": "system", "content": PREFIX}, {"role": "user", "content": question}],
        "max_tokens": 20,
        "stream": stream,
        "mock": {"dialect": dialect},
    }
    if stream:
        body["stream_options"] = {"include_usage": True}  # without it, tollway drops the usage chunk
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        return r, doc["usage"], doc.get("timings")
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = next(e for e in reversed(events) if e.get("usage"))
    return r, last["usage"], last.get("timings")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("dialect", ["openai", "openrouter", "deepseek", "anthropic", "llamacpp", "none"])
def test_billed_equals_hand_computed_cost(gateway, chain, devnet, dialect, stream):
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    price = gateway.settings.models["mock/echo"]
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url, timeout=30) as http:
        for i, question in enumerate([f"{dialect} {stream} first", f"{dialect} {stream} second"]):
            r, usage, timings = call(http, dialect, stream, question)
            receipt = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
            assert int(receipt["cost"]["atomic"]) == to_atomic(hand_cost(price, usage, timings), 6)
            assert usage["cost"] == float(receipt["cost"]["usd"])  # usage.cost: what the payer was charged
            if dialect == "none":
                assert receipt["usage"]["cached_tokens"] is None  # unknown, not zero
            elif i == 1:
                assert receipt["usage"]["cached_tokens"] > 100  # the second call hit the cache
