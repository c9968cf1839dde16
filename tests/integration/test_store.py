"""The ledger's state machine on real databases: SQLite files and PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import event

from support import run_concurrently
from tollway.config import Settings
from tollway.gateway import idempotency_kept
from tollway.ledger import PaymentState, Store
from tollway.ledger.checkpoint import EVERY_SECONDS, LOG_SIZE_LIMIT
from tollway.ledger.store import NotFinal, credit_account, new_id


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


def signer(tag: str = "0x"):
    """A stand-in for ``Settler._signed``: the outbox columns of a 'transaction' with a nonce."""

    def sign(nonce: int) -> dict:
        return {
            "to": "0xto",
            "data": "0x",
            "gas": 1,
            "max_fee": 2,
            "tip": 1,
            "tx_hash": f"{tag}{nonce}",
            "raw_tx": "0x",
        }

    return sign


def sender(store: Store, first_nonce: int = 0) -> str:
    address = "0x" + uuid.uuid4().hex[:40]
    store.sync_settler_nonce(address, first_nonce)
    return address


def settling(store: Store, pid: str, address: str | None = None) -> dict:
    """Move a reserved payment to settling through the outbox; returns its transaction row."""
    tx = store.sign_settlement(pid, address or sender(store), signer())
    assert tx is not None
    return tx


def test_state_machine_guards_every_transition(db_url):
    store = Store(db_url)
    pid = store.reserve(payment())
    assert store.payment(pid)["state"] == PaymentState.RESERVED
    assert not store.mark_settled(pid, "0xabc", 0)  # must go through settling
    address = sender(store)
    tx = settling(store, pid, address)
    assert store.sign_settlement(pid, address, signer()) is None  # once, and no nonce is burnt by the refusal
    assert store.sign_settlement(store.reserve(payment()), address, signer())["nonce"] == tx["nonce"] + 1
    assert not store.release(pid, "late")  # cannot un-charge a payment being settled
    assert not store.refuse(pid, "late")
    assert store.mark_settled(pid, tx["tx_hash"], 0)
    assert not store.mark_failed(pid, "too late")
    assert store.payment(pid)["state"] == PaymentState.SETTLED
    refused = store.reserve(payment())
    assert store.refuse(refused, "insufficient_funds")
    assert not store.release(refused, "retry?")  # a refusal is final


def test_a_replay_key_locks_once(db_url):
    store = Store(db_url)
    row = payment()
    first = store.reserve(row)
    assert first and store.reserve(row) is None


def test_released_payment_pays_only_a_retry_of_the_same_request_with_the_same_payment(db_url):
    store = Store(db_url)
    row = payment(digest="request-A")
    pid = store.reserve(row)
    assert store.release(pid, "upstream failed")
    assert store.reserve({**row, "request_digest": "request-B"}) is None
    # (another payment under the same key — another authorization with the same nonce — is refused:
    # the row keeps the proof it was locked with, which its settlement is judged by)
    assert store.reserve({**row, "proof": '{"signature": "0xother"}'}) is None
    assert store.reserve({**row, "amount": row["amount"] + 1}) is None
    assert store.reserve({**row, "scheme": "mpp-permit2"}) is None
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


def test_attack_a_released_payment_retried_at_once_on_eight_replicas_is_reserved_once(db_url):
    """The retry of a call not served may reuse its payment: fired at eight replicas at once, one
    reserves it again; the others are refused, as a replay is."""
    stores = [Store(db_url) for _ in range(8)]
    row = payment(digest="request-A")
    assert stores[0].release(stores[0].reserve(row), "upstream failed")
    wins: list[str] = []
    barrier = threading.Barrier(len(stores))

    def race(store: Store) -> None:
        barrier.wait()
        got = store.reserve(row)
        if got:
            wins.append(got)

    run_concurrently(race, stores)
    assert len(wins) == 1


def test_each_lock_of_one_payer_sees_every_payment_locked_before_it(db_url):
    """Eight replicas lock payments of one payer at once, 5 each: what each lock reads as owed
    counts every payment locked before it, so the last one's confirm weighs them all against
    the payer's balance (on PostgreSQL a plain read would miss a reservation not yet committed)."""
    from tollway.ledger.store import credit_account

    stores = [Store(db_url) for _ in range(8)]
    template = payment(amount=100)
    account = credit_account(template["network"], template["asset"], template["payer"])
    owed: list[int] = []
    barrier = threading.Barrier(len(stores))

    def race(store: Store) -> None:
        barrier.wait()
        for _ in range(5):
            locked = store.lock({**template, "lock_key": uuid.uuid4().hex}, account, 0, call_id="c")
            assert locked is not None
            owed.append(locked.owed)

    run_concurrently(race, stores)
    assert sorted(owed) == [100 * n for n in range(1, 41)]


def test_outbox_nonces_are_unique_across_replicas_and_kinds(db_url):
    """Four replicas queue settlements and payouts from one account at once: every transaction
    gets its own nonce, with no gap (payouts and settlements cannot take each other's)."""
    from tollway.ledger.store import credit_account

    stores = [Store(db_url) for _ in range(4)]
    address = "0x" + uuid.uuid4().hex[:40]
    stores[0].sync_settler_nonce(address, 7)
    stores[1].sync_settler_nonce(address, 3)  # a lagging view of the chain never moves it back
    taken: list[int] = []
    lock = threading.Lock()

    def queue(store: Store) -> None:
        for i in range(25):
            if i % 5 == 0:
                account = credit_account("eip155:1", "0xtoken", "0xw" + uuid.uuid4().hex[:8])
                store.settle_call_credit(account, deposit=10, held=0, cost=0, call_id="c", payment_id=None)
                payout = store.request_payout(account, "0xw", 10, uuid.uuid4().hex, head=0)
                assert store.sign_payout([payout], address, signer())
                tx_hash = store.payout(payout)["tx_hash"]
            else:
                tx_hash = settling(store, store.reserve(payment()), address)["tx_hash"]
            with lock:
                taken.append(int(tx_hash[2:]))

    run_concurrently(queue, stores)
    assert sorted(taken) == list(range(7, 107))


def test_a_lock_reserves_reads_the_balance_and_holds_only_final_credit_at_once(db_url):
    """A call's first transaction: its payment reserved, the payer's balance read, and the part of
    the quote its payment does not cover held — from final credit only; a replayed key holds nothing."""
    from tollway.ledger.store import credit_account

    store = Store(db_url)
    row = payment(amount=100)
    account = credit_account(row["network"], row["asset"], row["payer"])
    funding = store.reserve(row)
    settling(store, funding)  # its deposit is credit, not final until the settlement is mined
    store.settle_call_credit(account, deposit=100, held=0, cost=0, call_id="c0", payment_id=funding)

    first = store.lock({**row, "lock_key": uuid.uuid4().hex, "amount": 0}, account, 60, call_id="c1")
    assert first is not None and first.balance == 100 and not first.held
    assert store.payment(first.payment_id)["state"] == "reserved"

    assert store.mark_settled(funding, "0xmined", 0)
    again = {**row, "lock_key": uuid.uuid4().hex, "amount": 0}
    second = store.lock(again, account, 60, call_id="c2")
    assert second is not None and second.balance == 100 and second.held
    assert store.credit_balance(account) == 40
    assert store.lock(again, account, 40, call_id="c3") is None  # the key is taken: nothing held
    assert store.credit_balance(account) == 40 and store.journal(account)["hold"] == -60


def test_unsettled_amount_counts_reserved_and_settling(db_url):
    store = Store(db_url)
    rows = [payment(amount=a) for a in (10, 20, 40, 80)]
    for r in rows:
        r["payer"] = "0xsame"
    ids = [store.reserve(r) for r in rows]
    settling(store, ids[1])
    store.release(ids[2], "not served")
    tx = settling(store, ids[3])
    assert store.unsettled_amount("eip155:31337", "0xtoken", "0xsame") == 110
    store.mark_settled(ids[3], tx["tx_hash"], 0)
    assert store.unsettled_amount("eip155:31337", "0xtoken", "0xsame") == 30


def test_a_reverted_settlement_takes_its_deposit_back(db_url):
    from tollway.ledger.store import InsufficientCredit, credit_account

    store = Store(db_url)
    row = payment(amount=700)
    account = credit_account(row["network"], row["asset"], row["payer"])
    pid = store.reserve(row)
    settling(store, pid)
    store.settle_call_credit(account, deposit=700, held=0, cost=100, call_id="c", payment_id=pid)
    assert store.credit_balance(account) == 600 and store.available_credit(account) == 0  # not final yet
    with pytest.raises(InsufficientCredit):  # unconfirmed credit cannot leave on chain
        store.request_payout(account, row["payer"], 1, "n1", head=0)
    assert store.mark_failed(pid, "transaction_failed")
    assert store.credit_balance(account) == -100  # the call was served on money that never came: a debt
    assert store.journal(account)["reversal"] == -700
    assert not store.mark_failed(pid, "again")  # reversed once


def test_a_negative_balance_never_stops_deposits_releases_or_charges(db_url):
    """After a revert left a debt, everything that is not a spend still posts: a call's deposit,
    its release and its charge, a stream's metering, a refund (finding: metering broke on a debt)."""
    from tollway.ledger.store import credit_account

    store = Store(db_url)
    row = payment(amount=100)
    account = credit_account(row["network"], row["asset"], row["payer"])
    pid = store.reserve(row)
    settling(store, pid)
    store.settle_call_credit(account, deposit=100, held=0, cost=100, call_id="c1", payment_id=pid)
    assert store.mark_failed(pid, "transaction_failed")
    assert store.credit_balance(account) == -100
    locked = store.lock(payment(amount=0), account, 1, call_id="c2")
    assert locked is not None and locked.balance == -100 and not locked.held  # a spend: refused
    store.release_credit(account, 5, call_id="c2")
    assert store.settle_call_credit(account, deposit=30, held=0, cost=50, call_id="c3", payment_id=None) == -115
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
    call = {"id": call_id, "status": "served", "cost": 80}
    assert store.finish_call(account, deposit=50, held=0, cost=80, payment_id=None, call=call, insert_row=False) == -145


def test_payout_claims_are_exclusive(db_url):
    from tollway.ledger.store import InsufficientCredit, credit_account

    store = Store(db_url)
    account = credit_account("eip155:1", "0xtoken", "0xwallet-" + uuid.uuid4().hex[:6])
    store.settle_call_credit(account, deposit=100, held=0, cost=0, call_id="c", payment_id=None)
    first = store.request_payout(account, "0xw", 40, uuid.uuid4().hex, head=0)
    with pytest.raises(InsufficientCredit):
        store.request_payout(account, "0xw", 61, uuid.uuid4().hex, head=0)
    second = store.request_payout(account, "0xw", 60, uuid.uuid4().hex, head=0)
    address = sender(store, 5)
    assert store.sign_payout([first], address, signer("0xa"))
    # A second worker that read both as pending cannot pay the first again, nor burn a nonce.
    assert not store.sign_payout([first, second], address, signer("0xb"))
    assert store.sign_payout([second], address, signer("0xc"))
    assert [store.payout(p)["tx_hash"] for p in (first, second)] == ["0xa5", "0xc6"]


def test_a_withdrawal_beside_a_call_finishing_takes_none_of_its_unconfirmed_money(db_url):
    """A call of the payer's finishes as the withdrawal is asked for: its payment moves to
    settling and its money is deposited in one transaction that has not committed yet. The
    withdrawal must see both or neither: the deposit is not final until the settlement is mined
    (on PostgreSQL it read what was unconfirmed before the call committed, then the balance after)."""
    from tollway.ledger.store import InsufficientCredit, Settlement, credit_account

    finishing, withdrawing = Store(db_url), Store(db_url)
    row = payment(amount=500)
    account = credit_account(row["network"], row["asset"], row["payer"])
    finishing.settle_call_credit(account, deposit=100, held=0, cost=0, call_id="c0", payment_id=None)  # final
    pid = finishing.reserve(row)
    settle = Settlement(None, sender(finishing), signer())
    began = threading.Event()

    def finish() -> None:
        with finishing._sql() as c:
            finishing._settle(c, pid, settle)
            finishing._settle_call(c, account, 500, 0, 0, "c1", pid)
            began.set()
            time.sleep(1.0)  # (not committed yet while the withdrawal is asked for)

    worker = threading.Thread(target=finish)
    worker.start()
    assert began.wait(10)
    with pytest.raises(InsufficientCredit):
        withdrawing.request_payout(account, "0xw", 550, uuid.uuid4().hex, head=0)
    worker.join()
    assert withdrawing.credit_balance(account) == 600  # (100 final, 500 settling)


def test_a_reverted_payout_is_refunded_once_across_replicas(db_url):
    """Two replicas conclude the same reverted payout at once: the credit comes back once
    (finding: deposit 1000, withdraw 1000, revert → balance 2000)."""
    from tollway.ledger.store import credit_account

    stores = [Store(db_url) for _ in range(2)]
    account = credit_account("eip155:1", "0xtoken", "0xwallet-" + uuid.uuid4().hex[:6])
    stores[0].settle_call_credit(account, deposit=1000, held=0, cost=0, call_id="c", payment_id=None)
    payout = stores[0].request_payout(account, "0xw", 1000, uuid.uuid4().hex, head=0)
    assert stores[0].sign_payout([payout], sender(stores[0]), signer())
    tx_id = stores[0].payout(payout)["tx_id"]
    barrier = threading.Barrier(2)

    def conclude(store: Store) -> None:
        barrier.wait()
        for _ in range(3):
            store.payouts_mined(tx_id, "0xmined", ok=False, error="payout transaction reverted")

    run_concurrently(conclude, stores)
    assert stores[0].credit_balance(account) == 1000
    assert stores[0].journal(account)["refund"] == 1000
    assert stores[1].payout(payout)["state"] == "failed"


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


def test_a_metered_payments_stream_metered_by_the_sweep_first_is_metered_once_and_no_error(db_url):
    """The sweep of streams left open meters a slow one (its payment settled at that cost); the
    stream's own metering then finds it done — it raised ("not reserved"), the stream's end lost."""
    from tollway.ledger.store import Settlement, credit_account

    store = Store(db_url)
    row = payment()
    account = credit_account(row["network"], row["asset"], row["payer"])
    payment_id = store.reserve(row)
    call_id = uuid.uuid4().hex
    stream = {"model": "m", "upstream_model": "m", "stream": True, "status": "streaming", "quote": 100}
    stream |= {"paid": 0, "from_credit": 0}
    store.insert_call({"id": call_id, "payment_id": payment_id, **stream})
    sweep = {"id": call_id, "status": "incomplete", "cost": 70}
    kw = {"held": 0, "payment_id": payment_id, "insert_row": False}
    assert store.finish_call(account, deposit=70, cost=70, call=sweep, settle=Settlement(70), **kw) == 0
    live = {"id": call_id, "status": "served", "cost": 40}
    assert store.finish_call(account, deposit=40, cost=40, call=live, settle=Settlement(40), **kw) is None
    assert store.metered_cost(call_id) == 70 and store.credit_balance(account) == 0
    store.close()


def test_a_gateway_ledger_is_checkpointed_by_a_thread_not_by_the_commit_that_fills_the_log(tmp_path):
    """SQLite: the gateway's connections never checkpoint (a few ms on one unlucky call); a thread
    moves the write-ahead log into the database file instead."""
    import os
    import time

    path = tmp_path / "ledger.sqlite3"
    store = Store(f"sqlite:///{path}", background_checkpoints=True)
    try:
        before = os.path.getsize(path)
        for _ in range(300):
            store.reserve(payment())
        dbapi = store._connection().connection.dbapi_connection
        assert dbapi.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert dbapi.execute("PRAGMA journal_size_limit").fetchone()[0] == LOG_SIZE_LIMIT
        deadline = time.monotonic() + 10
        while os.path.getsize(path) <= before:  # the pages reach the database file only by a checkpoint
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
    finally:
        store.close()


def test_a_ledger_log_written_without_a_pause_still_starts_over(tmp_path):
    """SQLite starts its write-ahead log over only when a commit finds every page of it copied into
    the database; under steady writes a passive checkpoint never gets there, and the log grew by
    every page ever written. The checkpointer's second step (RESTART) makes it start over: the log's
    checkpoint sequence number (its header's bytes 12-15) moves on while writes never pause."""
    import time
    from pathlib import Path

    path = tmp_path / "ledger.sqlite3"
    wal = Path(f"{path}-wal")
    store = Store(f"sqlite:///{path}", background_checkpoints=True)
    try:
        store.reserve(payment())

        def started_over() -> int:
            with wal.open("rb") as f:
                return int.from_bytes(f.read(16)[12:], "big")

        first = started_over()
        deadline = time.monotonic() + 2 + 10 * EVERY_SECONDS
        while started_over() == first:
            assert time.monotonic() < deadline, "the log was never started over"
            for _ in range(20):
                store.reserve(payment())
    finally:
        store.close()


def test_what_a_payer_owes_follows_every_state_move_through_the_partial_index(db_url):
    """Attack: a payer who wants to spend what has not reached us. ``ix_payments_owed`` holds only
    payments in flight; whatever state a payment moves to, it is owed exactly while it is reserved
    or settling — through the index, and the same as a full scan says — so an unconfirmed deposit
    is never spendable credit, and a refused or failed one is no longer counted."""
    from sqlalchemy import text

    store = Store(db_url)
    try:
        address = sender(store)
        first = payment(amount=100)
        network, asset, payer = first["network"], first["asset"], first["payer"]

        def owed() -> int:
            return store.unsettled_amount(network, asset, payer)

        def scanned() -> int:
            with store.engine.connect() as conn:
                q = "SELECT SUM(amount) FROM payments WHERE payer = :p AND state IN ('reserved', 'settling')"
                return int(conn.execute(text(q), {"p": payer}).scalar() or 0)

        ids = [store.reserve({**first}), store.reserve({**payment(amount=40), "payer": payer})]
        ids.append(store.reserve({**payment(amount=7), "payer": payer}))
        assert owed() == scanned() == 147
        settling(store, ids[0], address)  # reserved → settling: still owed
        assert owed() == scanned() == 147
        assert store.release(ids[1], "not served")  # reserved → released: not owed
        assert owed() == scanned() == 107
        assert store.mark_settled(ids[0], "0xmined", 0)  # settling → settled: on chain now
        assert owed() == scanned() == 7
        assert store.refuse(ids[2], "the chain refused it")  # reserved → refused
        assert owed() == scanned() == 0
        assert not store.mark_settled(ids[0], "0xagain", 0)  # (a settled payment moves nowhere)
        assert owed() == 0
    finally:
        store.close()


KILLED_WRITER = """
import sys, time
from tollway.ledger import Store
store = Store(sys.argv[1], background_checkpoints=True)
account = "eip155:1|0xtoken|0xpayer"
n = 0
while True:
    n += 1
    row = {"lock_key": f"k{n}", "scheme": "credit", "network": "eip155:1", "asset": "0xtoken", "payer": "0xpayer",
           "payee": "0xpayee", "amount": 0, "proof": "{}", "request_digest": "d"}
    store.lock(row, account, 0, call_id=f"c{n}")
    store.settle_call_credit(account, deposit=5, held=0, cost=2, call_id=f"c{n}", payment_id=None)
    print(n, flush=True)  # (both transactions of call n are committed)
"""


def test_a_gateway_killed_while_its_log_is_checkpointed_loses_no_committed_money(tmp_path):
    """Attack: the crash between steps. A process writing a paid call's two transactions without
    pause, its checkpointer copying and restarting the log under it, is killed (SIGKILL) at a
    random moment: every call it reported committed is there, and the balance is exactly what the
    journal says — nothing lost, nothing half-applied."""
    import signal
    import subprocess
    import sys
    import time

    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    Store(url).close()  # (migrated before the writer starts)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url], stdout=subprocess.PIPE, text=True)
    time.sleep(3.5)  # (past three checkpoints)
    proc.send_signal(signal.SIGKILL)
    reported = [int(line) for line in proc.communicate()[0].split()]
    assert len(reported) > 100
    store = Store(url)
    try:
        account = "eip155:1|0xtoken|0xpayer"
        calls = store.journal(account)
        paid = calls.get("deposit", 0) // 5
        assert paid >= reported[-1]  # every reported call survived (one more may have committed unreported)
        assert calls.get("charge", 0) == -2 * paid  # each call both deposited and charged, or neither
        assert store.credit_balance(account) == 3 * paid
        assert store.count_by_state().get("reserved", 0) >= paid  # (every lock of a counted call is there)
    finally:
        store.close()


def test_a_call_a_crash_left_unanswered_gives_back_what_it_held_once(db_url):
    """A process died while its calls (not streamed) ran: what they held comes back, once, whoever
    looks first — even where an undo the crash cut short had released part of it already, and for
    the retry of a call whose first try was not served."""
    from tollway.ledger.store import credit_account

    store = Store(db_url)
    rival = Store(db_url)  # another replica, looking at the same time
    held_call = payment(amount=0) | {"scheme": "credit"}  # credit alone pays: its quote is held
    payer = held_call["payer"]
    account = credit_account(held_call["network"], held_call["asset"], payer)
    store.release_credit(account, 1_000, call_id="funding")
    assert store.lock(held_call, account, 300, call_id="c-held", must_hold=True).held
    transfer = payment(amount=500) | {"scheme": "transfer", "payer": payer}  # its money moved first
    transfer_id = store.lock(transfer, account, 0, call_id="c-transfer").payment_id
    cut_short = payment(amount=100) | {"payer": payer}  # exact, short of the quote by 200
    assert store.lock(cut_short, account, 200, call_id="c-cut").held
    store.release_credit(account, 200, call_id="c-cut")  # its undo had released the hold, then died
    streamed = payment() | {"payer": payer}
    streamed_id = store.lock(streamed, account, 0, call_id="c-stream").payment_id
    store.insert_call(call_row("c-stream", streamed_id, "streaming"))
    retried = payment(amount=0) | {"payer": payer}  # its first try was not served...
    first = store.lock(retried, account, 100, call_id="c-first")
    store.release_credit(account, 100, call_id="c-first")
    store.release(first.payment_id, "not served")
    store.insert_call(call_row("c-first", first.payment_id, "failed"))
    before_retry = time.time()
    time.sleep(0.01)
    assert store.lock(retried, account, 100, call_id="c-retry").payment_id == first.payment_id  # ...its retry
    assert store.credit_balance(account) == 1_000 - 300 - 100

    def abandoned(before: float = float("inf")) -> dict[str, dict]:  # (this payer's: PostgreSQL is shared)
        return {r["id"]: r for r in store.abandoned_payments(before, limit=10**6) if r["payer"] == payer}

    assert abandoned(0) == {}  # nothing is older than the cutoff
    assert first.payment_id not in abandoned(before_retry)  # reserved again since: its retry may still run
    found = abandoned()
    assert streamed_id not in found and len(found) == 4  # (a stream is metered: see abandoned_streams)
    for row in found.values():
        results: list[bool] = []
        prepaid = row["scheme"] in ("credit", "transfer")
        run_concurrently(
            lambda s, row=row, p=prepaid, out=results: out.append(s.give_back(row, prepaid=p, error="x")),
            (store, rival),
        )
        assert sorted(results) == [False, True]  # one of the two gives it back

    assert store.credit_balance(account) == 1_000 + 500  # each hold released once; the transfer is credit
    late = store.undo_call(  # the call's own undo, had its process lived on: nothing more
        first.payment_id,
        "released",
        "late",
        account=account,
        held=100,
        deposit=0,
        row=call_row("c-retry", "", "failed"),
    )
    assert late is False and store.credit_balance(account) == 1_000 + 500
    assert {store.payment(pid)["state"] for pid in found} == {"settled", "released"}
    assert store.payment(transfer_id)["state"] == "settled" and store.payment(first.payment_id)["state"] == "released"
    assert abandoned() == {}
    assert store.reserve(cut_short) is not None  # released: it may pay a retry of the same request


def call_row(call_id: str, payment_id: str, status: str) -> dict:
    return {
        "id": call_id,
        "payment_id": payment_id,
        "model": "m",
        "upstream_model": "m",
        "stream": status == "streaming",
    } | {
        "status": status,
        "quote": 1,
        "paid": 0,
        "from_credit": 0,
    }


def test_a_stream_undone_as_it_began_is_not_metered_again_later(db_url):
    """A call undone after its stream's row was written (the stream never ran): the row is failed
    with the undo, so the hunt for streams a crash left open does not meter it (and release the
    credit held for it) a second time."""
    from tollway.ledger.store import credit_account

    store = Store(db_url)
    row = payment(amount=0) | {"scheme": "credit"}
    account = credit_account(row["network"], row["asset"], row["payer"])
    store.release_credit(account, 1_000, call_id="funding")
    locked = store.lock(row, account, 300, call_id="c-undone", must_hold=True)
    store.insert_call(call_row("c-undone", locked.payment_id, "streaming"))
    undone = call_row("c-undone", locked.payment_id, "failed") | {"error": "boom", "finished_at": time.time()}
    assert store.undo_call(locked.payment_id, "settled", "boom", account=account, held=300, deposit=0, row=undone)
    assert store.receipt("c-undone")["status"] == "failed"
    assert all(s["id"] != "c-undone" for s in store.abandoned_streams(float("inf"), float("inf")))
    assert store.credit_balance(account) == 1_000


def test_a_transaction_is_replaced_once_and_never_after_it_moved_or_was_signed_anew(db_url):
    """Its nonce was taken elsewhere: two replicas replacing it at once queue one replacement; one
    mined, or bumped (a new signature, maybe the one mined), meanwhile is not replaced at all."""
    stores = [Store(db_url), Store(db_url)]
    address = sender(stores[0])
    pids = [stores[0].reserve(payment()) for _ in range(3)]
    txs = [settling(stores[0], pid, address) for pid in pids]
    replaced: list = []
    run_concurrently(
        lambda s, out=replaced: out.append(s.replace_transaction(txs[0]["id"], txs[0]["hashes"], signer("0xnew"))),
        stores,
    )
    new = [r for r in replaced if r is not None]
    assert len(new) == 1 and stores[0].payment(pids[0])["tx_id"] == new[0]["id"]
    assert stores[0].transaction_mined(txs[1]["id"], txs[1]["tx_hash"], True)
    assert stores[0].replace_transaction(txs[1]["id"], txs[1]["hashes"], signer("0xlate")) is None  # mined
    assert stores[0].replace_transaction(txs[2]["id"], "0xolder", signer("0xlate")) is None  # signed anew since
    assert stores[0].payment(pids[2])["tx_id"] == txs[2]["id"]


def test_attack_a_given_back_payment_pays_nothing_else_and_the_gateway_sends_nothing_for_it(db_url):
    """A payer hoping a crash makes a payment free: a sign-in given back after a crash is spent
    (settled, it pays no call again); an exact authorization given back pays only a retry of its own
    request; and giving back queues no transaction (no gas for a call nobody paid)."""
    from tollway.ledger.store import credit_account

    store = Store(db_url)
    by_credit = payment(amount=0) | {"scheme": "credit"}
    account = credit_account(by_credit["network"], by_credit["asset"], by_credit["payer"])
    store.release_credit(account, 1_000, call_id="funding")
    store.lock(by_credit, account, 300, call_id="c-1", must_hold=True)
    exact = payment(amount=100, digest="request-A") | {"payer": by_credit["payer"]}
    store.lock(exact, account, 0, call_id="c-2")
    outbox = len(store.open_transactions("queued"))
    for row in store.abandoned_payments(float("inf"), limit=10**6):
        if row["payer"] == by_credit["payer"]:
            assert store.give_back(row, prepaid=row["scheme"] == "credit", error="stopped")
    assert store.reserve(by_credit) is None  # the sign-in paid once (it was given back as settled)
    assert store.reserve(exact | {"request_digest": "request-B"}) is None  # another request: refused
    assert store.reserve(exact) is not None  # its own request's retry: allowed
    assert len(store.open_transactions("queued")) == outbox
    assert store.credit_balance(account) == 1_000


def test_attack_a_live_undo_and_a_replicas_give_back_at_once_release_the_hold_once(db_url):
    """The same abandoned-looking call undone by its own process and given back by another replica
    at the same moment: one of them wins, the hold comes back once."""
    from tollway.ledger.store import credit_account

    stores = [Store(db_url), Store(db_url)]
    row = payment(amount=0) | {"scheme": "credit"}
    account = credit_account(row["network"], row["asset"], row["payer"])
    stores[0].release_credit(account, 1_000, call_id="funding")
    locked = stores[0].lock(row, account, 300, call_id="c-race", must_hold=True)
    abandoned = next(r for r in stores[1].abandoned_payments(float("inf"), limit=10**6) if r["id"] == locked.payment_id)
    results: list[bool] = []

    def race(i: int, out: list = results) -> None:
        if i == 0:
            undone = call_row("c-race", locked.payment_id, "failed") | {"finished_at": time.time()}
            out.append(
                stores[0].undo_call(locked.payment_id, "settled", "x", account=account, held=300, deposit=0, row=undone)
            )
        else:
            out.append(stores[1].give_back(abandoned, prepaid=True, error="stopped"))

    run_concurrently(race, (0, 1))
    assert sorted(results) == [False, True]
    assert stores[0].credit_balance(account) == 1_000


def test_an_idempotency_claim_taken_over_is_neither_released_nor_finished_by_its_first_holder(db_url):
    """A claim left in progress past its staleness is taken over by a retry; the first request,
    still running after all, must not then delete the retry's claim as it fails, nor overwrite
    the retry's answer as it ends."""
    store = Store(db_url)
    key, first = uuid.uuid4().hex, time.time() - 1000
    assert store.claim_request(key, "f", stale_before=first - 1, now=first) is None
    assert store.claim_request(key, "f", stale_before=first - 1, now=time.time())["state"] == "in_progress"
    retry = time.time()
    assert store.claim_request(key, "f", stale_before=retry - 10, now=retry) is None  # (stale: taken over)
    store.release_request(key, first)  # the first request fails late: the retry's claim stays
    assert store.claim_request(key, "f", stale_before=retry - 10, now=time.time())["state"] == "in_progress"
    store.finish_request(key, first, 200, {}, b"first", None)  # nor does its late answer replace the retry's
    store.finish_request(key, retry, 200, {}, b"retry", None)
    held = store.claim_request(key, "f", stale_before=time.time(), now=time.time())
    assert held["state"] == "done" and bytes(held["body"]) == b"retry"


def test_forgetting_old_answers_keeps_a_claim_whose_call_may_still_run_and_an_answer_just_given(db_url):
    """Idempotent answers are forgotten after idempotency_ttl_seconds (60 s at the least): a call
    longer than that lost its claim while it ran, or its answer as soon as it was given (dated from
    the claim) — and the client's retry under its key, with a new payment, was served and charged
    again. A claim is kept as long as its call may run, an answer dated from when it was given.
    (Adversarial reviews.)"""
    store = Store(db_url)
    now = time.time()
    forget_before = now - idempotency_kept(Settings(idempotency_ttl_seconds=60), 0.0)
    running, answered, dead = (uuid.uuid4().hex for _ in range(3))
    assert store.claim_request(running, "f", stale_before=now - 1000, now=now - 100) is None  # a long call
    assert store.claim_request(answered, "f", stale_before=now - 9000, now=now - 5000) is None
    store.finish_request(answered, now - 5000, 200, {}, b"answer", None)  # (answered just now: dated now)
    assert store.claim_request(dead, "f", stale_before=now - 9000, now=now - 5000) is None  # its process died
    store.forget_requests(forget_before)
    assert store.claim_request(running, "g", stale_before=now - 1000, now=now)["state"] == "in_progress"  # (a 409)
    assert bytes(store.claim_request(answered, "f", stale_before=now - 1000, now=now)["body"]) == b"answer"
    assert store.claim_request(dead, "g", stale_before=now - 1000, now=now) is None


def test_attack_one_key_claimed_at_once_by_two_replicas_with_two_payments_runs_once(db_url):
    """A client (or a thief of its key) sends one idempotency key with two different payments to two
    replicas at the same moment, eight times over: each time one claim runs, the other is told
    the key is held (409) — never both, whichever commits first."""
    stores = [Store(db_url), Store(db_url)]

    def claims(key: str, now: float) -> list[dict | None]:
        told: list[dict | None] = []
        run_concurrently(lambda i: told.append(stores[i].claim_request(key, f"payment-{i}", now - 1000, now)), (0, 1))
        return told

    for _ in range(8):
        told = claims(uuid.uuid4().hex, time.time())
        assert sum(t is None for t in told) == 1, told
        [held] = [t for t in told if t is not None]
        assert held["state"] == "in_progress"


def test_attack_a_claim_meeting_a_release_from_another_replica_still_holds_its_key(postgres_url):
    """Replica A's call under key K fails and A releases K just as replica B claims K for a retry:
    B's insert meets A's row, B cannot take it over (not stale), and A's delete commits before B
    reads the row. B was told to run — holding nothing: a third request with K ran too (a second
    charge under one key), and B's answer was never kept. (Adversarial review.)"""
    a, b, c = Store(postgres_url), Store(postgres_url), Store(postgres_url)
    key, first = uuid.uuid4().hex, time.time()
    assert a.claim_request(key, "fa", first - 1000, first) is None
    released: list[str] = []

    def release_before_the_read(conn, cursor, statement, *_: Any) -> None:
        if not released and statement.lstrip().upper().startswith("SELECT") and "idempotent_requests" in statement:
            released.append(statement)
            a.release_request(key, first)

    event.listen(b.engine, "before_cursor_execute", release_before_the_read)
    try:
        assert b.claim_request(key, "fb", time.time() - 1000, time.time()) is None  # B runs its retry…
    finally:
        event.remove(b.engine, "before_cursor_execute", release_before_the_read)
    assert released, "the interleaving was not reached"
    held = c.claim_request(key, "fb", time.time() - 1000, time.time())  # …holding K: a third waits (409)
    assert held is not None and held["state"] == "in_progress"


def test_attack_one_mined_deposit_concluded_by_two_replicas_at_once_counts_once(db_url):
    """Every replica's settlement worker polls the same outbox: two that see one deposit mined at the
    same moment conclude it once, and the channel holds it once."""
    from tollway.ledger.channels import ChannelUse

    stores = [Store(db_url), Store(db_url)]
    try:
        row = payment()
        cid = "0x" + uuid.uuid4().hex * 2
        use = ChannelUse(id=cid, config="{}", base=0, signed_max=10, signature="0x", deposit=10)
        locked = stores[0].lock(row, f"{row['network']}|{row['asset']}|{row['payer']}", 0, call_id="c", channel=use)
        assert locked is not None and stores[0].release(locked.payment_id, "not served")  # (the channel row stays)
        sender = "0x" + uuid.uuid4().hex[:40]
        stores[0].sync_settler_nonce(sender, 0)
        columns = {"to": "0x", "data": "0x", "gas": 1, "max_fee": 1, "tip": 1, "raw_tx": "0x", "tx_hash": "0x1"}
        tx = stores[0].queue_transaction("deposit", sender, lambda n: columns)
        concluded: list[bool] = []
        run_concurrently(lambda s: concluded.append(s.deposit_mined(tx["id"], "0x1", True, cid, 10)), stores)
        assert sorted(concluded) == [False, True]
        assert stores[0].channel(cid)["balance"] == 10
    finally:
        for s in stores:
            s.close()


def test_a_deposit_of_the_largest_amount_into_a_funded_channel_is_no_overflow(db_url):
    """A channel's balance plus a hostile deposit of 2^63 - 1 overflowed PostgreSQL's bigint (a
    500): the take compares without adding. (Taken, the deposit then fails on chain, before any call.)"""
    from tollway.ledger.channels import ChannelUse

    store = Store(db_url)
    try:
        row = payment()
        cid = "0x" + uuid.uuid4().hex * 2
        where = f"{row['network']}|{row['asset']}|{row['payer']}"
        use = ChannelUse(id=cid, config="{}", base=0, signed_max=10, signature="0x", deposit=10)
        first = store.lock(row, where, 0, call_id="c1", channel=use, channel_hold_seconds=60)
        assert first is not None
        assert store.release(first.payment_id, "not served")  # (which frees the channel)
        stand_in = "0x" + uuid.uuid4().hex[:40]
        store.sync_settler_nonce(stand_in, 0)
        columns = {"to": "0x", "data": "0x", "gas": 1, "max_fee": 1, "tip": 1, "raw_tx": "0x"}
        deposits = [
            store.queue_transaction("deposit", stand_in, lambda n: {**columns, "tx_hash": f"0x{n}"}) for _ in "abc"
        ]
        assert store.deposit_mined(deposits[0]["id"], "0x0", False, cid, 10)  # reverted: counts for nothing
        assert not store.deposit_mined(deposits[0]["id"], "0x0", True, cid, 10)  # (concluded once: never again)
        assert store.channel(cid)["balance"] == 0
        assert store.deposit_mined(deposits[1]["id"], "0x1", True, cid, 10)
        assert not store.deposit_mined(deposits[1]["id"], "0x1", True, cid, 10)  # (counted once)
        assert store.channel(cid)["balance"] == 10
        huge = ChannelUse(id=cid, config="{}", base=0, signed_max=2**63 - 1, signature="0x", deposit=2**63 - 1)
        second = store.lock(
            {**payment(), "payer": row["payer"]}, where, 0, call_id="c2", channel=huge, channel_hold_seconds=60
        )
        assert second is not None and second.channel is not None
        # Mined (an 18-decimal token's 9.3 tokens), it saturates the 64-bit balance: counted short, never a failure.
        assert store.deposit_mined(deposits[2]["id"], "0x2", True, cid, 2**63 - 1)
        assert store.channel(cid)["balance"] == 2**63 - 1
    finally:
        store.close()


def test_ids_sort_in_the_order_their_rows_were_made(db_url):
    """Payment (and call) ids begin with their time, so that each new row lands at the end of its
    indexes, not on a random page a grown ledger must read first; they stay unique and unguessable."""
    store = Store(db_url)
    ids = []
    for _ in range(5):
        ids.append(store.reserve(payment()))
        time.sleep(0.002)  # (ids of one millisecond are unordered among themselves)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    many = {new_id()[12:] for _ in range(1000)}  # the random part: 80 bits each
    assert len(many) == 1000


def test_past_free_tier_days_are_forgotten_a_chunk_at_a_time_and_today_is_kept(db_url):
    store = Store(db_url)
    for i in range(7):
        store.take_free_call(f"old-{i}", 100, 5)
        store.take_free_call(f"old-{i}", 99, 5)
    store.take_free_call("today", 101, 5)
    store.forget_free_calls(101, chunk=3)  # (14 rows to forget: five chunks, the last short)
    assert store.take_free_call("today", 101, 5) == 2  # (today's count stands)
    assert store.take_free_call("old-0", 100, 5) == 1  # (a past day's is gone: it counts from one again)
    with store._sql() as c:
        assert c.value("SELECT COUNT(*) FROM free_calls WHERE day < 100") == 0


def test_attack_a_call_not_served_frees_only_the_channel_its_own_payment_holds(db_url):
    """Freeing a channel goes through the payment's own channel, and only while that payment holds
    it: a call not served — undone live, given back after its process died, or undone late — never
    frees a channel another call holds (whose voucher would then be taken twice at once), and a
    crashed call's channel is freed for the payer's next voucher."""
    from tollway.ledger.channels import ChannelRefused, ChannelUse

    store = Store(db_url)
    try:
        row = payment()
        where = f"{row['network']}|{row['asset']}|{row['payer']}"
        use = ChannelUse(id="0x" + uuid.uuid4().hex * 2, config="{}", base=0, signed_max=10, signature="0x", deposit=10)

        def voucher_call(call_id: str):
            return store.lock({**payment(), "payer": row["payer"]}, where, 0, call_id=call_id, channel=use)

        first = voucher_call("c1")
        assert store.channel(use.id)["busy"] == first.payment_id
        other = store.lock({**payment(), "payer": row["payer"]}, where, 0, call_id="c2")  # (no channel)
        assert store.release(other.payment_id, "not served")
        assert store.channel(use.id)["busy"] == first.payment_id  # (another's undo freed nothing)
        with pytest.raises(ChannelRefused):
            voucher_call("c3")  # (held: the same voucher is not taken twice at once)
        crashed = {"id": first.payment_id, **{k: row[k] for k in ("network", "asset", "payer")}, "amount": 0}
        assert store.give_back(crashed, prepaid=False, error="its process died")
        assert store.channel(use.id)["busy"] is None
        third = voucher_call("c4")
        assert store.channel(use.id)["busy"] == third.payment_id
        assert not store.release(first.payment_id, "a late undo")  # (no longer reserved: frees nothing)
        assert store.channel(use.id)["busy"] == third.payment_id
    finally:
        store.close()


def test_attack_a_crash_clean_up_never_releases_a_hold_twice_whichever_way_its_release_was_posted(db_url):
    """What a crashed call held comes back once: less what was released for it already — with its
    payment named (as releases are now) or without (before 0009) — and once only, however many
    replicas look at the same time."""
    from tollway.ledger.models import EntryKind
    from tollway.ledger.store import credit_account

    stores = [Store(db_url), Store(db_url)]
    try:
        row = payment(amount=0) | {"scheme": "credit"}
        account = credit_account(row["network"], row["asset"], row["payer"])
        stores[0].release_credit(account, 1_000, call_id="funding")
        locked = stores[0].lock(row, account, 300, call_id="c", must_hold=True)
        assert locked.held and stores[0].credit_balance(account) == 700
        with stores[0]._sql() as c:  # (an undo that released part, and died before the rest)
            stores[0]._post(c, account, [(EntryKind.RELEASE, 100)], call_id="c", payment_id=locked.payment_id)
            stores[0]._post(c, account, [(EntryKind.RELEASE, 50)], call_id="c")
        crashed = {"id": locked.payment_id, **{k: row[k] for k in ("network", "asset", "payer")}, "amount": 0}
        given: list[bool] = []
        run_concurrently(lambda s: given.append(s.give_back(crashed, prepaid=True, error="its process died")), stores)
        assert sorted(given) == [False, True]
        assert stores[0].credit_balance(account) == 1_000  # (150 given back: never more than was held)
        assert not stores[1].give_back(crashed, prepaid=True, error="again")
        assert stores[0].credit_balance(account) == 1_000
    finally:
        for s in stores:
            s.close()


def test_a_key_with_a_nul_names_no_row_and_is_no_error(db_url):
    """An id read from a request's path (``/v1/receipts/%00``) is looked up as it is: PostgreSQL's
    text holds no NUL, and its driver would raise (a 500) rather than find nothing."""
    store = Store(db_url)
    for key in ("\x00", "a\x00b", "0x" + "00" * 31 + "\x00"):
        assert store.receipt(key) is None
        assert store.payout(key) is None
        assert store.channel(key) is None


def test_a_connection_postgresql_dropped_is_opened_anew(postgres_url):
    """One statement finds the connection gone (503, ``ledger_unavailable``); the next opens another."""
    from support import drop_sessions
    from tollway.errors import LedgerUnavailable
    from tollway.ledger.store import credit_account

    store = Store(postgres_url)
    account = credit_account("eip155:1", "0xtoken", "0xw-" + uuid.uuid4().hex[:8])
    try:
        assert store.credit_balance(account) == 0  # (this thread's connection is open)
        assert drop_sessions(postgres_url) >= 1
        with pytest.raises(LedgerUnavailable):
            store.credit_balance(account)
        assert [store.credit_balance(account) for _ in range(3)] == [0, 0, 0]
        assert store.count_by_state() is not None  # (SQLAlchemy Core statements too)
    finally:
        store.close()


def test_credit_leaves_on_chain_once_its_latest_settlement_is_final(db_url):
    """A new wallet pays a stream with exact: its settlement is mined (final at block 100) while the
    stream runs — no credits row yet — and the stream's surplus is deposited as it ends. A
    withdrawal before block 100 waits; a later settlement's lower block moves nothing back."""
    store = Store(db_url)
    row = payment(amount=700)
    account = credit_account(row["network"], row["asset"], row["payer"])
    locked = store.lock(row, account, 0, call_id="c1")  # (no hold: the payment covers the quote)
    tx = settling(store, locked.payment_id)
    [(_, settled)] = store.settlements_mined([(tx["id"], tx["tx_hash"], True, lambda p: True, 100)])
    assert settled
    store.settle_call_credit(account, deposit=700, held=0, cost=100, call_id="c1", payment_id=locked.payment_id)
    assert store.available_credit(account) == 600
    with pytest.raises(NotFinal) as refused:
        store.request_payout(account, row["payer"], 600, uuid.uuid4().hex, head=99)
    assert refused.value.block == 100 and store.available_credit(account) == 600  # (nothing taken)
    later = store.reserve({**row, "lock_key": uuid.uuid4().hex})
    assert store.mark_settled(later, settling(store, later)["tx_hash"], 50)
    with pytest.raises(NotFinal):
        store.request_payout(account, row["payer"], 600, uuid.uuid4().hex, head=99)
    assert store.request_payout(account, row["payer"], 600, uuid.uuid4().hex, head=100) is not None


def test_attack_two_replicas_withdraw_at_once_as_the_deposit_turns_final(db_url):
    """A payer who wants the gateway to pay twice: at the block its deposit turns final, two
    withdrawals of the whole credit at once, one on each replica (sign-ins of their own): one pays,
    the other finds no credit — and one a block early pays nothing."""
    stores = [Store(db_url), Store(db_url)]
    row = payment(amount=700)
    account = credit_account(row["network"], row["asset"], row["payer"])
    locked = stores[0].lock(row, account, 0, call_id="c1")
    tx = settling(stores[0], locked.payment_id)
    stores[0].settlements_mined([(tx["id"], tx["tx_hash"], True, lambda p: True, 100)])
    stores[0].settle_call_credit(account, deposit=700, held=0, cost=100, call_id="c1", payment_id=locked.payment_id)
    with pytest.raises(NotFinal):
        stores[1].request_payout(account, row["payer"], 600, uuid.uuid4().hex, head=99)
    outcomes: list[object] = []

    def withdraw(store: Store) -> None:
        try:
            outcomes.append(store.request_payout(account, row["payer"], 600, uuid.uuid4().hex, head=100))
        except Exception as exc:  # (the loser's refusal)
            outcomes.append(type(exc).__name__)

    run_concurrently(withdraw, stores)
    assert sorted(outcomes, key=str)[1] == "InsufficientCredit" and stores[0].payout(str(sorted(outcomes, key=str)[0]))
    assert stores[0].credit_balance(account) == 0 and stores[0].available_credit(account) == 0
