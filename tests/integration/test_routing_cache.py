"""Several upstreams (fail-over, sticky conversations) and prompt-cache survival tracking,
including through a chain of two tollways."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import httpx
import pytest

from conftest import gateway_settings
from support import ADMIN, ServerThread, eventually, paying_upstream, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.config import UpstreamSettings
from tollway.mock_upstream import create_app as create_mock
from tollway.pricing import to_atomic

SYSTEM = "You are a careful assistant. " + " ".join(f"rule{i} applies always." for i in range(120))


def paying_client(gateway_url: str, chain, devnet) -> tuple[httpx.Client, Payer]:
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    return httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway_url, timeout=30), payer


def chat(http: httpx.Client, messages: list[dict], **extra) -> httpx.Response:
    r = http.post("/v1/chat/completions", json={"model": "mock/echo", "messages": messages, "max_tokens": 16, **extra})
    assert r.status_code == 200, r.text
    return r


def served_by(gateway_url: str, r: httpx.Response) -> str:
    return wait_receipt(gateway_url, r.headers["x-tollway-receipt"])["upstream"]


def test_fail_over_sticky_conversations_and_the_cheapest_cache(devnet, chain, tmp_path):
    mock_a = ServerThread(create_mock())
    mock_b = ServerThread(create_mock())
    with mock_a, mock_b:
        settings = gateway_settings(devnet, "", tmp_path / "l.sqlite3")
        settings = settings.model_copy(
            update={
                "upstreams": [
                    UpstreamSettings(name="a", url=mock_a.url + "/v1", connect_timeout=0.5),
                    UpstreamSettings(name="b", url=mock_b.url + "/v1"),
                ],
                "sticky_idle_seconds": 2.0,
                "failure_cooldown_seconds": 0.2,
            }
        )
        with ServerThread(create_app(settings)) as gw:
            http, _ = paying_client(gw.url, chain, devnet)
            convo = [{"role": "system", "content": "sticky"}, {"role": "user", "content": "first"}]
            assert served_by(gw.url, chat(http, convo)) == "a"  # the preferred upstream

            mock_a.__exit__()  # upstream a goes down: fail over to b, before any byte reached the client
            r = chat(http, convo)
            assert served_by(gw.url, r) == "b"
            restarted = ServerThread(create_mock(), port=mock_a.port)
            with restarted:
                time.sleep(0.5)  # a's cooldown passes
                other = [{"role": "system", "content": "another"}, {"role": "user", "content": "conversation"}]
                assert served_by(gw.url, chat(http, other)) == "a"  # new conversations prefer a again
                # The first conversation stays on b, where its prompt cache is ...
                convo += [{"role": "assistant", "content": "x"}, {"role": "user", "content": "second"}]
                assert served_by(gw.url, chat(http, convo)) == "b"
                # ... so does a new session of it (its own key, no stickiness): b holds more of its prompt
                assert served_by(gw.url, chat(http, convo, session_id="s1")) == "b"
                moved = [{"role": "system", "content": "sticky"}, {"role": "user", "content": "elsewhere"}]
                assert served_by(gw.url, chat(http, moved, provider={"order": ["a"]})) == "a"
                assert served_by(gw.url, chat(http, moved, session_id="s2")) == "a"  # (its prefix is on a)
                assert served_by(gw.url, chat(http, moved, session_id="s2")) == "a"
                time.sleep(2.2)  # idle longer than sticky_idle_seconds: where its cache is, still
                assert served_by(gw.url, chat(http, convo)) == "b"


def test_cached_prefix_is_billed_at_the_cache_price_and_tracked(gateway, chain, devnet, upstream):
    http, _ = paying_client(gateway.url, chain, devnet)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first question"}]
    r1 = chat(http, first)
    hop1 = json.loads(r1.headers["x-tollway-cache"])[0]
    assert hop1["expected_cached_tokens"] == 0

    second = [*first, {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "follow-up"}]
    r2 = chat(http, second)
    hop2 = json.loads(r2.headers["x-tollway-cache"])[0]
    receipt = wait_receipt(gateway.url, r2.headers["x-tollway-receipt"])
    usage = receipt["usage"]
    assert usage["cached_tokens"] > 200  # the mock cached the shared prefix ...
    assert hop2["cached_tokens"] == usage["cached_tokens"]
    assert (
        hop2["expected_cached_tokens"]
        == wait_receipt(gateway.url, r1.headers["x-tollway-receipt"])["usage"]["prompt_tokens"]
    )  # ... which tollway expected: the first prompt is a prefix of the second
    price = gateway.settings.models["mock/echo"]
    plain = usage["prompt_tokens"] - usage["cached_tokens"] - (usage["cache_write_tokens"] or 0)
    usd = (
        plain * Fraction(price.prompt)
        + usage["cached_tokens"] * Fraction(price.cache_read)
        + (usage["cache_write_tokens"] or 0) * Fraction(price.cache_write)
        + usage["completion_tokens"] * Fraction(price.completion)
    )
    assert int(receipt["cost"]["atomic"]) == to_atomic(usd, 6)
    assert int(hop2["discount_passed"]) > 0

    stats = httpx.get(f"{gateway.url}/v1/stats/cache", headers=ADMIN).json()["windows"]["5m"]
    row = next(s for s in stats if s["model"] == "mock/echo" and s["upstream"] == "default")
    assert row["cached_tokens"] >= usage["cached_tokens"] and row["hit_rate"] > 0
    assert row["expected_cached_tokens"] > 0 and row["survival"] > 0


def test_unknown_cache_figures_stay_unknown(gateway, chain, devnet):
    http, _ = paying_client(gateway.url, chain, devnet)
    r = chat(http, [{"role": "user", "content": "no cache fields"}], mock={"dialect": "none"})
    receipt = wait_receipt(gateway.url, r.headers["x-tollway-receipt"])
    assert receipt["usage"]["cached_tokens"] is None
    assert json.loads(r.headers["x-tollway-cache"])[0]["cached_tokens"] is None


@pytest.fixture(scope="module")
def chained(devnet, chain, upstream, tmp_path_factory):
    """client → outer tollway → inner tollway → mock; the outer pays the inner from its own wallet."""
    root = tmp_path_factory.mktemp("chain")
    inner_settings = gateway_settings(devnet, upstream.url + "/v1", root / "inner.sqlite3")
    with ServerThread(create_app(inner_settings)) as inner:
        outer_wallet = chain.fund(amount=10**9)
        outer_settings = gateway_settings(devnet, "", root / "outer.sqlite3")
        outer_settings = outer_settings.model_copy(
            update={"upstreams": [paying_upstream("inner", inner.url + "/v1", outer_wallet, devnet)]}
        )
        with ServerThread(create_app(outer_settings)) as outer:
            yield outer, inner, outer_wallet


@pytest.mark.parametrize("stream", [False, True])
def test_cache_figures_survive_a_chain_of_tollways(chained, chain, devnet, stream):
    outer, _inner, outer_wallet = chained
    http, _payer = paying_client(outer.url, chain, devnet)
    messages = [
        {"role": "system", "content": SYSTEM + (" streamed" if stream else "")},
        {"role": "user", "content": "chained question"},
    ]

    def call(msgs: list[dict]) -> list[dict]:
        body = {"model": "mock/echo", "messages": msgs, "max_tokens": 16, "stream": stream}
        if not stream:
            return json.loads(chat(http, msgs).headers["x-tollway-cache"])
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            text = r.read().decode()
        summaries = [
            json.loads(line[len(": tollway ") :]) for line in text.splitlines() if line.startswith(": tollway ")
        ]
        assert len(summaries) == 2  # the inner's (relayed untouched), then the outer's
        return summaries[-1]["cache"]

    call(messages)
    hops = call([*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}])
    assert [h["upstream"] for h in hops] == ["inner", "default"]  # outer's view, then inner's
    outer_hop, inner_hop = hops
    assert inner_hop["cached_tokens"] > 200 and outer_hop["cached_tokens"] == inner_hop["cached_tokens"]
    assert inner_hop["expected_cached_tokens"] > 0 and outer_hop["expected_cached_tokens"] > 0
    assert int(outer_hop["discount_passed"]) > 0 and int(inner_hop["discount_passed"]) > 0
    # The outer tollway paid the inner one on chain from its own wallet.
    eventually(lambda: chain.balance(outer_wallet.address) < 10**9, what="the outer tollway's payment settled")
