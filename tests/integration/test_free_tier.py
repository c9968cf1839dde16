"""The free tier: models marked free are served without payment up to a daily quota per client
address, or per wallet that signs in; then a clear 429. A client cannot pick its address with
X-Forwarded-For unless it comes through a trusted proxy; a call that was not served does not count."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from eth_account import Account
from sqlalchemy import text

from conftest import gateway_settings
from support import ADMIN_TOKEN, ServerThread, receipt, run_concurrently
from tollway import siwe
from tollway.app import create_app
from tollway.cli import server_config
from tollway.config import ModelPrice, Settings, UpstreamSettings
from tollway.free_tier import address_of
from tollway.mock_upstream import MockOptions
from tollway.mock_upstream import create_app as create_mock
from tollway.payments.x402 import b64json, unb64json

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "free?"}], "max_tokens": 8}


def free_settings(devnet, upstream, db, **overrides):
    """(``overrides`` are validated, as a configuration's would be.)"""
    quotas = {"free_calls_per_address": 3, "free_calls_per_wallet": 2, **overrides}
    settings = gateway_settings(devnet, upstream.url + "/v1", db, **quotas)
    models = {**settings.models, "mock/echo": settings.models["mock/echo"].model_copy(update={"free": True})}
    return settings.model_copy(update={"models": models})


@pytest.fixture
def direct(devnet, upstream, tmp_path):
    """A gateway whose clients connect directly (uvicorn believes no proxy header)."""
    with ServerThread(create_app(free_settings(devnet, upstream, tmp_path / "l.sqlite3")), proxy_headers=False) as gw:
        yield gw


def chat(gw, body=BODY, **headers) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_a_free_model_is_served_without_payment_up_to_the_quota(direct, devnet):
    for _ in range(3):
        r = chat(direct, **{"X-Forwarded-For": "203.0.113.9"})  # (not believed: no trusted proxy)
        assert r.status_code == 200, r.text
        assert "payment-response" not in r.headers
    doc = receipt(direct.url, r.headers["x-tollway-receipt"])
    assert (
        doc["cost"]["atomic"] == "0"
        and doc["payment"]["scheme"] == "free"
        and doc["payment"]["amount"]["atomic"] == "0"
    )
    assert doc["payment"]["payer"] == "free"  # (no address is kept)

    r = chat(direct, **{"X-Forwarded-For": "198.51.100.7"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "free_quota_exhausted", r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 86400
    info = r.json()["extensions"]["sign-in-with-x"]["info"]  # a wallet has a quota of its own
    assert unb64json(r.headers["payment-required"])["extensions"]["sign-in-with-x"]["info"]["nonce"] == info["nonce"]

    wallet = Account.create()
    signed = {"SIGN-IN-WITH-X": b64json(siwe.sign(wallet, info, f"eip155:{devnet.chain_id}"))}
    assert [chat(direct, **signed).status_code for _ in range(3)] == [200, 200, 429]

    paid = chat(direct, {**BODY, "model": "mock/echo-large"})  # a model that is not free is paid for
    assert paid.status_code == 402


def test_a_free_call_asks_the_upstream_for_no_more_than_the_default_output_cap(devnet, tmp_path):
    """A free call asking for 100k output tokens would keep an operator's own model busy that long;
    ``n`` and ``best_of`` multiply what it generates: the cap is shared among the choices."""
    mock = create_mock()
    with ServerThread(mock) as upstream:
        settings = free_settings(devnet, upstream, tmp_path / "l.sqlite3", default_max_tokens=64)
        settings = settings.model_copy(update={"free_calls_per_address": 10})
        with ServerThread(create_app(settings), proxy_headers=False) as gw:
            assert chat(gw, {**BODY, "max_tokens": 100_000}).status_code == 200
            assert mock.state.mock.last_request["max_tokens"] == 64
            assert chat(gw, BODY).status_code == 200  # (asking less: as asked)
            assert mock.state.mock.last_request["max_tokens"] == 8
            other = {k: v for k, v in BODY.items() if k != "max_tokens"}
            for field in ("max_completion_tokens", "n_predict"):  # (the upstream's own field alone carries it)
                assert chat(gw, {**other, field: 100_000}).status_code == 200
                sent = mock.state.mock.last_request
                assert field not in sent and sent["max_tokens"] == 64, sent
            for choices in ({"n": 8}, {"best_of": 8}, {"n": 3}):
                assert chat(gw, {**BODY, "max_tokens": 64, **choices}).status_code == 200
                sent = mock.state.mock.last_request
                assert sent["max_tokens"] == 64 // max(choices.values()), (choices, sent["max_tokens"])
            assert chat(gw, {**BODY, "n": 2}).status_code == 200  # (asking less than its share: as asked)
            assert mock.state.mock.last_request["max_tokens"] == 8


def test_a_call_that_was_not_served_does_not_count(direct):
    for _ in range(3):
        r = chat(direct, {**BODY, "mock": {"fail": 500}})
        assert r.status_code == 502, r.text
    assert [chat(direct).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_a_call_that_timed_out_waiting_for_its_upstream_counts(devnet, upstream, tmp_path):
    """The upstream had the request, and may have generated (and billed) much of an answer: a
    free call that ran out of time keeps its slot spent (else long calls would be free for ever)."""
    settings = free_settings(devnet, upstream, tmp_path / "l.sqlite3", max_call_seconds=1)
    with ServerThread(create_app(settings), proxy_headers=False) as gw:
        slow = chat(gw, {**BODY, "mock": {"latency": 2}})
        assert slow.status_code in (503, 504) and "upstream_timeout" in slow.text, slow.text
        assert [chat(gw).status_code for _ in range(3)] == [200, 200, 429]


def test_a_call_that_timed_out_on_one_upstream_then_was_refused_by_the_next_counts(devnet, tmp_path):
    """The first upstream had the request when it timed out (and may bill for it); the next refused
    it (a 4xx, which no other upstream is asked after): the slot stays spent, and the call's row
    names both attempts."""
    slow, picky = create_mock(MockOptions(latency=2.0)), create_mock(MockOptions(models=["mock/echo-large"]))
    with ServerThread(slow) as slow_server, ServerThread(picky) as picky_server:
        settings = free_settings(devnet, slow_server, tmp_path / "l.sqlite3", free_calls_per_address=1)
        upstreams = [
            UpstreamSettings(name="slow", url=slow_server.url + "/v1", read_timeout=0.5),
            UpstreamSettings(name="picky", url=picky_server.url + "/v1"),
        ]
        settings = settings.model_copy(update={"upstreams": upstreams})
        app = create_app(settings)
        with ServerThread(app, proxy_headers=False) as gw:
            first = chat(gw)
            assert first.status_code == 404 and slow.state.mock.stats["requests"] == 1, first.text
            slow.state.mock.options = slow.state.mock.options.model_copy(update={"latency": 0.0})
            assert chat(gw).status_code == 429
            with app.state.gateway.store.engine.connect() as c:
                (attempts,) = c.execute(text("SELECT attempts FROM calls WHERE status = 'failed'")).one()
            assert "slow" in attempts and "upstream_timeout" in attempts and "picky" in attempts, attempts


def test_a_free_call_raises_no_alarm_of_an_upstream_over_reporting(direct):
    """``cost_over_quote`` tells the operator an upstream reported more usage than the quote allowed:
    a free call's quote is 0, so it is not compared."""
    assert chat(direct).status_code == 200
    health = httpx.get(direct.url + "/healthz", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert health["events"].get("cost_over_quote", 0) == 0, health["events"]


@pytest.mark.parametrize(
    ("proxies", "trusted"),
    [("127.0.0.1/32", "127.0.0.1/32"), ("127.0.0.1", "127.0.0.1"), ("127.0.0.1/8", "127.0.0.0/8")],
)
def test_behind_a_trusted_proxy_each_client_counts_apart(devnet, upstream, tmp_path, proxies, trusted):
    """A network written with its host bits set is taken as its network: uvicorn, which reads the
    list, would take it for a name matching nothing — and every client would count as the proxy."""
    settings = free_settings(devnet, upstream, tmp_path / "l.sqlite3", trusted_proxies=[proxies])
    config = server_config(create_app(settings), settings, "warning")
    assert config.proxy_headers
    with ServerThread(config.app, proxy_headers=True, forwarded_allow_ips=config.forwarded_allow_ips) as gw:
        for client in ("192.0.2.1", "192.0.2.2"):
            codes = [chat(gw, **{"X-Forwarded-For": f"{client}, 127.0.0.1"}).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429], client
    assert config.forwarded_allow_ips == [trusted]
    plain = Settings(models={"m": ModelPrice(prompt=Decimal(1), completion=Decimal(1))})
    assert not server_config(None, plain, "warning").proxy_headers  # none trusted by default


def test_an_ipv6_client_counts_by_its_64():
    assert address_of("2001:db8:1:2:aaaa::1") == address_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_of("::ffff:192.0.2.1") == "192.0.2.1" and address_of("192.0.2.1") == "192.0.2.1"


def test_trusted_proxies_must_be_addresses():
    with pytest.raises(ValueError, match="trusted_proxies"):
        Settings(trusted_proxies=["nginx"])
    written = ["172.18.0.5/16", "2001:DB8::5/64", "10.0.0.1", "::1", "fd00::/8"]
    assert Settings(trusted_proxies=written).trusted_proxies == [
        "172.18.0.0/16",
        "2001:db8::/64",
        "10.0.0.1",
        "::1",
        "fd00::/8",
    ]


@pytest.mark.parametrize(
    "quotas",
    [{}, {"free_calls_per_address": 20, "free_calls_per_day": 3}],
    ids=["the-address-quota", "the-tier-quota"],
)
def test_one_quota_holds_against_many_calls_at_once_across_two_replicas(devnet, upstream, tmp_path, quotas):
    """A payer who wants more than the free tier: eight calls at once, split over two gateways that
    share one ledger, from one address — with a quota of three, or the whole tier's of three."""
    settings = free_settings(devnet, upstream, tmp_path / "shared.sqlite3", **quotas)
    first = ServerThread(create_app(settings), proxy_headers=False)
    second = ServerThread(create_app(settings.model_copy()), proxy_headers=False)
    with first, second:
        codes: list[int] = []
        run_concurrently(lambda gw: codes.append(chat(gw).status_code), [first, second] * 4)
    assert sorted(codes) == [200] * 3 + [429] * 5


def test_a_fallback_list_with_a_paid_model_is_not_free(direct):
    r = chat(direct, {**BODY, "models": ["mock/echo-large"]})  # (the free model first, a paid one after)
    assert r.status_code == 402, r.text


def test_all_clients_together_have_a_daily_quota(devnet, upstream, tmp_path):
    """Wallets are free to make: beyond ``free_calls_per_day`` for everyone, no client's own quota
    helps; a call not served gives that slot back too."""
    settings = free_settings(devnet, upstream, tmp_path / "l.sqlite3", free_calls_per_address=1, free_calls_per_day=3)
    with ServerThread(create_app(settings), proxy_headers=False) as gw:
        assert chat(gw, {**BODY, "mock": {"fail": 500}}).status_code == 502  # (not served: not counted)
        assert [chat(gw).status_code for _ in range(2)] == [200, 429]  # (the address's quota)
        info = chat(gw).json()["extensions"]["sign-in-with-x"]["info"]
        wallets = [Account.create() for _ in range(2)]
        signed = [{"SIGN-IN-WITH-X": b64json(siwe.sign(w, info, f"eip155:{devnet.chain_id}"))} for w in wallets]
        assert [chat(gw, **signed[0]).status_code for _ in range(2)] == [200, 200]
        r = chat(gw, **signed[1])  # (a new wallet, its own quota untouched)
    assert r.status_code == 429 and r.json()["error"]["code"] == "free_tier_exhausted", r.text
    assert "all clients together" in r.json()["error"]["message"] and 1 <= int(r.headers["retry-after"]) <= 86400
    assert "payment-required" not in r.headers and "extensions" not in r.json()  # (no sign-in helps)
