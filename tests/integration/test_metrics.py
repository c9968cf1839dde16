"""``GET /metrics``: the operator's Prometheus text, behind the admin token, with nothing per payer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import ADMIN_TOKEN, CHAT, chat_body
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.ledger import Store


def scrape(gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_calls_refusals_and_upstream_time_and_read_the_ledger(gateway, devnet, chain):
    assert httpx.get(f"{gateway.url}/metrics", timeout=10).status_code == 401
    wrong = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401

    before = scrape(gateway)
    unpaid = ("tollway_calls_total", (("code", "payment_required"), ("model", "mock/echo"), ("status", "402")))
    served = ("tollway_calls_total", (("code", "ok"), ("model", "mock/echo"), ("status", "200")))
    assert httpx.post(f"{gateway.url}{CHAT}", json=chat_body("metrics"), timeout=10).status_code == 402
    payer = chain.fund()
    wallet = Payer(payer, [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
    with httpx.Client(transport=SyncPayingTransport(wallet), base_url=gateway.url, timeout=30) as client:
        assert client.post(CHAT, json=chat_body("metrics, paid")).status_code == 200
    r = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    after = scrape(gateway)
    assert after[unpaid] == before.get(unpaid, 0) + 2  # (the paying client's first request got a 402 too)
    assert after[served] == before.get(served, 0) + 1
    upstream_count = [k for k in after if k[0] == "tollway_upstream_first_byte_seconds_count"]
    assert upstream_count and sum(after[k] for k in upstream_count) >= 1
    states = {dict(k[1])["state"] for k in after if k[0] == "tollway_payments"}
    assert "settled" in states or "settling" in states
    assert ("tollway_settlement_lag_seconds", ()) in after
    assert ("tollway_channels_unclaimed", ()) in after
    assert payer.address.lower() not in r.text.lower()  # nothing per payer


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_the_operators_ledger_counts_hold_no_call(gateway, monkeypatch, path):
    """Payments by state counts every payment in the ledger (~70 ms at a million, on SQLite): the
    operator's reads run in a worker thread, and the calls in flight meanwhile are answered."""
    counting, started_counting = Store.count_by_state, threading.Event()

    def slow(self):
        started_counting.set()
        time.sleep(1.5)  # (a ledger of many millions of payments)
        return counting(self)

    monkeypatch.setattr(Store, "count_by_state", slow)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(httpx.get, f"{gateway.url}{path}", headers=admin, timeout=10)
        assert started_counting.wait(10)
        started = time.monotonic()
        assert httpx.post(f"{gateway.url}{CHAT}", json=chat_body("while counting"), timeout=10).status_code == 402
        answered = time.monotonic() - started
        assert reading.result().status_code == 200
    assert answered < 1.0, answered
