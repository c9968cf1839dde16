"""A credit call's two ledger transactions, in-process, as the ledger grows: ``Store.lock`` (the
payment reserved, the quote held from credit) and ``Store.finish_call`` (the metered cost charged,
the call recorded, the payment settled), on a SQLite ledger of its own, timed after ``--calls``
earlier calls. ``--random-ids`` makes the ledger's ids random (as they were before they began with
the time they were made), for an A/B of where new rows land in the indexes.

    taskset -c 1 .venv/bin/python scripts/bench_ledger.py --calls 100000
    taskset -c 1 .venv/bin/python scripts/bench_ledger.py --calls 100000 --random-ids

The running gateway takes 2-3× these figures (``scripts/bench --stages``: cold caches). Filling a
ledger of 100,000 calls takes ~20 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import tollway.ledger.store as ledger
from tollway.ledger.store import Settlement, Store

ACCOUNT = "eip155:31337|0xtoken|0xpayer"
QUOTE, COST = 1000, 10


def credit_call(store: Store) -> None:
    call_id = ledger.new_id()
    payment = {
        "lock_key": f"eip155:31337:0xtoken:sign-in:0xpayer:{os.urandom(16).hex()}",  # (a sign-in's nonce)
        "scheme": "credit",
        "network": "eip155:31337",
        "asset": "0xtoken",
        "payer": "0xpayer",
        "payee": "0xpayee",
        "amount": 0,
        "proof": "{}",
        "request_digest": os.urandom(32).hex(),
    }
    locked = store.lock(payment, ACCOUNT, QUOTE, call_id=call_id, must_hold=True)
    assert locked is not None
    now = time.time()
    call = {
        "id": call_id,
        "payment_id": locked.payment_id,
        "model": "mock/echo",
        "upstream_model": "mock/echo",
        "api": "chat",
        "stream": False,
        "byok": False,
        "quote": QUOTE,
        "prompt_bound": 100,
        "paid": 0,
        "from_credit": QUOTE,
        "created_at": now,
        "status": "served",
        "upstream": "mock",
        "finished_at": now,
        "cost": COST,
    }
    store.finish_call(
        ACCOUNT,
        deposit=0,
        held=QUOTE,
        cost=COST,
        payment_id=locked.payment_id,
        call=call,
        insert_row=True,
        settle=Settlement(COST),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100_000, help="earlier calls in the ledger (100,000)")
    p.add_argument("--timed", type=int, default=3000, help="calls timed, in rounds of 500 (3,000)")
    p.add_argument("--random-ids", action="store_true", help="random ids, not ordered by time")
    a = p.parse_args()
    if a.random_ids:
        ledger.new_id = lambda: os.urandom(16).hex()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/ledger.sqlite3", background_checkpoints=True)  # (as the gateway runs it)
        try:
            with store._sql() as c:
                store._post(c, ACCOUNT, [("deposit", 10**15)])
            for _ in range(a.calls):
                credit_call(store)
            rounds = []
            for _ in range(max(a.timed // 500, 1)):
                t = time.perf_counter()
                for _ in range(500):
                    credit_call(store)
                rounds.append((time.perf_counter() - t) / 500 * 1e6)
        finally:
            store.close()
    ids = "random ids" if a.random_ids else "ids ordered by time"
    print(
        f"a credit call's lock + finish_call after {a.calls:,} calls ({ids}): "
        f"median {statistics.median(rounds):.0f} µs, best {min(rounds):.0f} µs (rounds of 500)"
    )


if __name__ == "__main__":
    main()
