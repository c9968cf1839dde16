"""The ledger's state machine on real databases: SQLite files and PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from support import run_concurrently
from tollway.ledger import PaymentState, Store


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return request.getfixturevalue("postgres_url")


def payment(lock_key: str | None = None, digest: str = "d1", amount: int = 100) -> dict:
    return {
        "lock_key": lock_key or uuid.uuid4().hex,
        "scheme": "exact",
        "network": "eip155:31337",
        "asset": "0xtoken",
        "payer": "0xpayer-" + uuid.uuid4().hex[:8],
        "payee": "0xpayee",
        "amount": amount,
        "proof": "{}",
        "request_digest": digest,
    }


def test_state_machine_guards_every_transition(db_url):
    store = Store(db_url)
    pid = store.reserve(payment())
    assert store.payment(pid)["state"] == PaymentState.RESERVED
    assert not store.mark_settled(pid, "0xabc")  # must go through settling
    assert store.mark_settling(pid, tx_hash="0x1", raw_tx="0x", tx_nonce=0, settler="0xs")
    assert not store.mark_settling(pid, tx_hash="0x2", raw_tx="0x", tx_nonce=1, settler="0xs")
    assert not store.release(pid, "late")  # cannot un-charge a payment being settled
    assert store.mark_settled(pid, "0x1")
    assert not store.mark_failed(pid, "too late")
    assert store.payment(pid)["state"] == PaymentState.SETTLED


def test_a_replay_key_locks_once(db_url):
    store = Store(db_url)
    row = payment()
    first = store.reserve(row)
    assert first and store.reserve(row) is None


def test_released_payment_pays_only_a_retry_of_the_same_request(db_url):
    store = Store(db_url)
    row = payment(digest="request-A")
    pid = store.reserve(row)
    assert store.release(pid, "upstream failed")
    assert store.reserve({**row, "request_digest": "request-B"}) is None
    assert store.reserve(row) == pid
    assert store.reserve(row) is None  # and only once


def test_concurrent_reservations_across_connections(db_url):
    """Eight stores (as eight replicas) race for one key, 5 times each: exactly one wins."""
    stores = [Store(db_url) for _ in range(8)]
    row = payment()
    wins: list[str] = []
    barrier = threading.Barrier(len(stores))

    def race(store: Store) -> None:
        barrier.wait()
        for _ in range(5):
            got = store.reserve(row)
            if got:
                wins.append(got)

    run_concurrently(race, stores)
    assert len(wins) == 1


def test_settler_nonces_are_unique_across_replicas(db_url):
    stores = [Store(db_url) for _ in range(4)]
    address = "0x" + uuid.uuid4().hex[:40]
    stores[0].sync_settler_nonce(address, 7)
    stores[1].sync_settler_nonce(address, 3)  # a lagging view of the chain never moves it back
    taken: list[int] = []
    lock = threading.Lock()

    def take(store: Store) -> None:
        for _ in range(25):
            n = store.take_settler_nonce(address)
            with lock:
                taken.append(n)

    run_concurrently(take, stores)
    assert sorted(taken) == list(range(7, 107))


def test_unsettled_amount_counts_reserved_and_settling(db_url):
    store = Store(db_url)
    rows = [payment(amount=a) for a in (10, 20, 40, 80)]
    for r in rows:
        r["payer"] = "0xsame"
    ids = [store.reserve(r) for r in rows]
    store.mark_settling(ids[1], tx_hash="0x1", raw_tx="0x", tx_nonce=0, settler="0xs")
    store.release(ids[2], "not served")
    store.mark_settling(ids[3], tx_hash="0x2", raw_tx="0x", tx_nonce=1, settler="0xs")
    read_before = time.time() - 1
    store.mark_settled(ids[3], "0x2")
    # settled after a balance read: that balance may not reflect it yet, so it still counts
    assert store.unsettled_amount("eip155:31337", "0xtoken", "0xsame", settled_since=read_before) == 110
    assert store.unsettled_amount("eip155:31337", "0xtoken", "0xsame", settled_since=time.time() + 1) == 30


def test_a_reverted_settlement_takes_its_deposit_back(db_url):
    from tollway.ledger.store import InsufficientCredit, credit_account

    store = Store(db_url)
    row = payment(amount=700)
    account = credit_account(row["network"], row["asset"], row["payer"])
    pid = store.reserve(row)
    store.mark_settling(pid, tx_hash="0x1", raw_tx="0x", tx_nonce=0, settler="0xs")
    store.settle_call_credit(account, deposit=700, held=0, cost=100, call_id="c", payment_id=pid)
    assert store.credit_balance(account) == 600 and store.available_credit(account) == 0  # not final yet
    with pytest.raises(InsufficientCredit):  # unconfirmed credit cannot leave on chain
        store.request_payout(account, row["payer"], 1, "n1")
    assert store.mark_failed(pid, "transaction_failed")
    assert store.credit_balance(account) == -100  # the call was served on money that never came: a debt
    assert store.journal(account)["reversal"] == -700
    assert not store.mark_failed(pid, "again")  # reversed once


def test_payout_claims_are_exclusive(db_url):
    from tollway.ledger.store import InsufficientCredit, credit_account

    store = Store(db_url)
    account = credit_account("eip155:1", "0xtoken", "0xwallet-" + uuid.uuid4().hex[:6])
    store.settle_call_credit(account, deposit=100, held=0, cost=0, call_id="c", payment_id=None)
    first = store.request_payout(account, "0xw", 40, uuid.uuid4().hex)
    with pytest.raises(InsufficientCredit):
        store.request_payout(account, "0xw", 61, uuid.uuid4().hex)
    second = store.request_payout(account, "0xw", 60, uuid.uuid4().hex)
    address = "0x" + uuid.uuid4().hex[:40]
    store.sync_settler_nonce(address, 5)
    assert store.sign_payout([first], address, lambda nonce: (f"0xa{nonce}", "0x"))
    # A second worker that read both as pending cannot pay the first again, nor burn a nonce.
    assert not store.sign_payout([first, second], address, lambda nonce: (f"0xb{nonce}", "0x"))
    assert store.sign_payout([second], address, lambda nonce: (f"0xc{nonce}", "0x"))
    assert [store.payout(p)["tx_hash"] for p in (first, second)] == ["0xa5", "0xc6"]


def test_a_stream_is_metered_once(db_url):
    from tollway.ledger.store import credit_account

    store = Store(db_url)
    account = credit_account("eip155:1", "0xtoken", "0xwallet-" + uuid.uuid4().hex[:6])
    call_id = uuid.uuid4().hex
    store.insert_call(
        {
            "id": call_id,
            "model": "m",
            "upstream_model": "m",
            "stream": True,
            "status": "streaming",
            "quote": 50,
            "paid": 50,
            "from_credit": 0,
        }
    )
    call = {"id": call_id, "status": "served", "cost": 20}
    assert store.finish_call(account, deposit=50, held=0, cost=20, payment_id=None, call=call, insert_row=False) == 30
    assert store.finish_call(account, deposit=50, held=0, cost=50, payment_id=None, call=call, insert_row=False) is None
    assert store.credit_balance(account) == 30
