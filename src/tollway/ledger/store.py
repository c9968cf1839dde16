"""The only module that speaks SQL.

Every state change is one statement guarded by the expected previous state, so replicas
sharing one database (SQLite file or PostgreSQL) can never double-spend or double-settle:
the nonce lock is the ``lock_key`` unique constraint, and a transition that finds the row in
another state changes nothing and reports False.

Every statement by which money moves is plain SQL on the DB-API connection (``sql.py``): the
few a paid call runs cost less than SQLAlchemy's bookkeeping around them. Reports and reads off
the hot path are SQLAlchemy Core on the SQLModel tables. Calls are synchronous: on SQLite they
take tens of microseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import case, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..errors import LedgerUnavailable
from . import channels, sql
from .channels import ChannelUse
from .checkpoint import LOG_SIZE_LIMIT, Checkpointer
from .models import (
    IN_FLIGHT,
    OPEN_STREAM,
    Call,
    ChainTx,
    CreditEntry,
    EntryKind,
    Idempotent,
    Meta,
    Payment,
    PaymentState,
    Payout,
    SettlerNonce,
    TxState,
)

P = Payment.__table__  # type: ignore[attr-defined]
C = Call.__table__  # type: ignore[attr-defined]
N = SettlerNonce.__table__  # type: ignore[attr-defined]
E = CreditEntry.__table__  # type: ignore[attr-defined]
PO = Payout.__table__  # type: ignore[attr-defined]
T = ChainTx.__table__  # type: ignore[attr-defined]
M = Meta.__table__  # type: ignore[attr-defined]
ID = Idempotent.__table__  # type: ignore[attr-defined]
NO_FLOOR = -(2**62)  # deposits, releases, charges, refunds and reversals post whatever the balance


FINISHED_CALLS = (
    "SELECT id, model, upstream, stream, status, attempts, upstream_latency_ms, added_ms, duration_ms,"
    " prompt_tokens, completion_tokens, cached_tokens, expected_cached_tokens, finished_at FROM calls"
    " WHERE (finished_at > :t OR (finished_at = :t AND id > :id)) AND finished_at <= :until"
    " ORDER BY finished_at, id LIMIT :limit"
)
USAGE_BY_MODEL = (
    "SELECT model, COUNT(*) AS calls, COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,"
    " COALESCE(SUM(completion_tokens), 0) AS completion_tokens FROM calls"
    " WHERE created_at >= :since AND status IN ('served', 'incomplete') GROUP BY model"
)

TAKE_FREE_CALL = (
    "INSERT INTO free_calls (identity, day, calls) VALUES (:identity, :day, 1)"
    " ON CONFLICT (identity, day) DO UPDATE SET calls = free_calls.calls + 1"
    " WHERE free_calls.calls < :quota RETURNING calls"
)
RETURN_FREE_CALL = "UPDATE free_calls SET calls = calls - 1 WHERE identity = :identity AND day = :day AND calls > 0"
# A new key; or a released one, for a retry of the same request with the same payment. (Another
# payment under a released key — another authorization with the same nonce, say — is refused: the
# row keeps its first proof, which a payer could still put on chain, and a settlement front-run by
# it would be judged by the proof the row holds.)
RESERVE = (
    " ON CONFLICT (lock_key) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
    " WHERE payments.state = 'released' AND payments.request_digest = excluded.request_digest"
    " AND payments.scheme = excluded.scheme AND payments.amount = excluded.amount AND payments.proof = excluded.proof"
    " RETURNING id"
)
_PAYER = "network = :network AND asset = :asset AND payer = :payer"
# What a payer owes us that a balance read from the chain may not show yet: its payments in
# progress and its settlements not yet confirmed (one just mined is counted twice for a moment:
# that errs on the safe side). One index range per state (an OR would scan), in the partial index
# of payments in flight, which SQLite uses only for a query that names its condition.
_RESERVED = f"{_PAYER} AND state = 'reserved' AND {IN_FLIGHT}"
_SETTLING = f"{_PAYER} AND state = 'settling' AND {IN_FLIGHT}"
OWED = (  # (in progress, settling)
    f"SELECT (SELECT COALESCE(SUM(amount), 0) FROM payments WHERE {_RESERVED}),"
    f" (SELECT COALESCE(SUM(amount), 0) FROM payments WHERE {_SETTLING})"
)
UNCONFIRMED = f"SELECT COALESCE(SUM(amount), 0) FROM payments WHERE {_SETTLING}"
BALANCE = "SELECT balance FROM credits WHERE account = :account"
SETTLED = (
    "UPDATE payments SET state = 'settled', tx_hash = :tx_hash, error = NULL, updated_at = :now"
    " WHERE id = :id AND state = 'settling' RETURNING network, asset, payer"
)
FINAL_BLOCK = "SELECT final_block FROM credits WHERE account = :account"
FINAL_AT = (  # a settlement of the payer's is believed: its credit is final once the chain is past this
    # (the account opened if need be: a stream's deposit may come after its settlement is mined)
    "INSERT INTO credits (account, balance, final_block, updated_at) VALUES (:account, 0, :block, :now)"
    " ON CONFLICT (account) DO UPDATE SET final_block = CASE WHEN credits.final_block > excluded.final_block"
    " THEN credits.final_block ELSE excluded.final_block END"
)
APPLY = (  # add to a credit balance (opening it) unless it would end below a floor
    "INSERT INTO credits (account, balance, updated_at) SELECT CAST(:account AS VARCHAR), :delta, :now"
    " WHERE :delta >= :floor OR EXISTS (SELECT 1 FROM credits WHERE account = :account)"
    " ON CONFLICT (account) DO UPDATE SET balance = credits.balance + excluded.balance,"
    " updated_at = excluded.updated_at WHERE credits.balance + excluded.balance >= :floor"
    " RETURNING balance"
)
ABANDONED_STREAMS = (  # (by ix_calls_streaming, which only a query naming its condition uses)
    "SELECT c.id, c.payment_id, c.model, c.upstream, c.byok, c.quote, c.prompt_bound, c.events, c.paid,"
    " c.from_credit, c.status, c.created_at, c.alive_at,"
    " p.scheme, p.state AS payment_state, p.proof, p.amount, p.network, p.asset, p.payer, p.channel"
    f" FROM calls c JOIN payments p ON c.payment_id = p.id WHERE c.{OPEN_STREAM} AND c.created_at < :before"
    " AND (c.status = 'streaming' OR c.created_at < :metering_before)"
    " AND p.state NOT IN ('released', 'refused')"  # (a stream undone before it began: nothing to meter)
)
ABANDONED_PAYMENTS = (
    "SELECT id, scheme, network, asset, payer, amount FROM payments p WHERE state = 'reserved' AND updated_at < :before"
    f" AND NOT EXISTS (SELECT 1 FROM calls WHERE calls.payment_id = p.id AND calls.{OPEN_STREAM})"
    " ORDER BY updated_at LIMIT :limit"
)
# (call, what is still held for it): a call's holds, posted with its payment, less what was
# released for the call since (by an undo of tollway before 0009, which released first and moved
# the payment after, in transactions of their own: a release with the payment, or with none). Each
# read is a range of ix_credit_entries_payment (account, payment_id): by account alone, it read
# the payer's whole journal, three times, while holding the ledger's write lock.
_RELEASED = "SELECT COALESCE(SUM(r.amount), 0) FROM credit_entries r WHERE r.account = :account AND r.payment_id {}"
HELD_FOR_PAYMENT = (
    "SELECT h.call_id, -SUM(h.amount)"
    f" - ({_RELEASED.format('= :payment_id')} AND r.call_id = h.call_id AND r.kind = 'release')"
    f" - ({_RELEASED.format('IS NULL')} AND r.call_id = h.call_id AND r.kind = 'release') AS held"
    " FROM credit_entries h WHERE h.account = :account AND h.payment_id = :payment_id AND h.kind = 'hold'"
    " GROUP BY h.call_id"
)
DEPOSITED = "SELECT 1 FROM credit_entries WHERE account = :account AND payment_id = :payment_id AND kind = 'deposit'"
# A call undone as its stream began has a row already: it is failed too, or it would be metered
# later as a stream a crash left open (and the credit held for it released a second time).
FAIL_STREAM_ROW = (
    " ON CONFLICT (id) DO UPDATE SET status = excluded.status, error = excluded.error,"
    f" finished_at = excluded.finished_at WHERE calls.{OPEN_STREAM}"
)
TAKE_NONCE = "UPDATE settler_nonces SET next_nonce = next_nonce + 1 WHERE address = :address RETURNING next_nonce"
MOVED = "id = :b_id AND state = :b_from"
STREAMING = f"id = :b_id AND {OPEN_STREAM}"
FORGET_FREE_CALLS = (  # (by ix_free_calls_day)
    "DELETE FROM free_calls WHERE (identity, day) IN"
    " (SELECT identity, day FROM free_calls WHERE day < :day LIMIT :chunk)"
)
# (by ix_transactions_open)
OPEN_TRANSACTIONS = "SELECT * FROM transactions WHERE state = :state ORDER BY nonce LIMIT :limit"
OPEN_DEPOSITS = "SELECT data FROM transactions WHERE state IN ('queued', 'sent') AND purpose = 'deposit'"
OPEN = ("queued", "sent")  # outbox states a transaction can still leave
CLAIM_ATTEMPTS = 8  # (each one lost to a release another replica committed in between)


def new_id() -> str:
    """A unique id, 32 hex digits that sort by creation time: the milliseconds since 1970 (12 digits),
    then 80 random bits — UUIDv7's layout, without building a UUID (hot path). Rows made one after the
    other land at the end of their indexes rather than on random pages, which a ledger that has grown
    past SQLite's page cache must read first (``scripts/bench_ledger.py``: a credit call's two
    transactions after 100,000 calls, 162–165 µs against 176–190 with random ids; ~157 for either
    after 1,000)."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def _storable(key: str) -> bool:
    """Whether a key a request names (in its path) can name a row at all: PostgreSQL's text holds no
    NUL, and its driver refuses a query that carries one."""
    return "\x00" not in key


def credit_account(network: str, asset: str, wallet: str) -> str:
    return f"{network}|{asset.lower()}|{wallet.lower()}"


class NotFinal(Exception):
    """Credit a settlement not yet ``confirmations`` deep deposited cannot leave on chain before ``block``."""

    def __init__(self, block: int) -> None:
        super().__init__(f"credit final at block {block}")
        self.block = block


class InsufficientCredit(Exception):
    pass


class _NotReserved(Exception):
    pass


class _Taken(Exception):
    pass


SignTx = Callable[[int], dict[str, Any]]
"""Signs a transaction with a nonce: the outbox columns to (re)write — ``to, data, gas, max_fee,
tip, tx_hash, raw_tx`` (see ``settlement.Settler``)."""


@dataclass(frozen=True)
class Settlement:
    """How a payment settles as its call is recorded: with ``sign``, its transaction is queued
    (signed with ``sender``'s next nonce) and the payment is ``settling``; without, nothing
    (more) moves on chain and it is ``settled`` as it stands. ``amount`` is what it moves to the
    payee (a metered payment moves less than it authorised, maybe nothing)."""

    amount: int | None  # None: the payment's own amount
    sender: str | None = None
    sign: SignTx | None = None
    channel: ChannelUse | None = None  # a channel payment: the channel is charged ``amount`` (and freed)


class _AlreadyMetered(Exception):
    pass


@dataclass(frozen=True)
class Locked:
    """A call's payment, reserved: the payer's credit balance as it was (negative: a debt),
    whether the hold asked for was made, and what the payer owes us that the chain may not show
    yet (see ``unsettled_amount``; this payment included)."""

    payment_id: str
    balance: int
    held: bool
    owed: int
    channel: dict[str, Any] | None = None  # the channel the payment took, as it took it


BUSY_SECONDS = 30  # how long a SQLite connection waits for another's lock
# A paid call's two commits write each page they change to the write-ahead log, and the checkpoint
# copies it again: half SQLite's default page size halves those bytes (the rows fit either way).
# ~10% less ledger time a call (``scripts/bench --stages``).
PAGE_SIZE = 2048


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_SECONDS})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(BUSY_SECONDS * 1000)}")
            cur.execute(f"PRAGMA page_size={PAGE_SIZE}")  # (a new ledger's: an existing one keeps its own)
            wal_mode(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def wal_mode(cur: Any) -> None:
    """Put a SQLite ledger in WAL mode. Switching a new file to it needs the file to itself, and
    when replicas open a new ledger together SQLite answers one of them "locked" at once rather than
    wait (the two would deadlock): that one waits and tries again."""
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Store:
    def __init__(self, url: str, *, background_checkpoints: bool = False) -> None:
        """``background_checkpoints``: a SQLite ledger's write-ahead log is moved into the database
        file by a thread of its own, not by the commit that fills it (see ``checkpoint.py``)."""
        self.engine = make_engine(url)
        from .migrate import migrate  # (alembic loads only where a store opens)

        migrate(self.engine)  # the schema: alembic's migrations, once, under a lock
        self.dialect = sql.Dialect(self.engine.dialect.name, self.engine.dialect.loaded_dbapi)
        self._local = threading.local()
        self._connections: list[Connection] = []
        database = self.engine.url.database
        self._checkpointer = None
        if background_checkpoints and self.engine.dialect.name == "sqlite" and database not in (None, "", ":memory:"):
            self._checkpointer = Checkpointer(database)

    def close(self) -> None:
        for conn in self._connections:
            conn.close()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()

    def _connection(self) -> Connection:
        """This thread's own connection, kept open for the life of the store: a pool checkout per
        statement costs more than the statement (the event loop is one thread)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.engine.connect()
            self._connections.append(conn)
            if self._checkpointer is not None:
                dbapi = conn.connection.dbapi_connection
                dbapi.execute("PRAGMA wal_autocheckpoint=0")  # type: ignore[union-attr]
                dbapi.execute(f"PRAGMA journal_size_limit={LOG_SIZE_LIMIT}")  # type: ignore[union-attr]
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A transaction in SQLAlchemy Core."""
        conn = self._connection()
        try:
            with conn.begin():
                yield conn
        except DBAPIError as exc:
            if exc.connection_invalidated or self._gone(conn):
                raise self._lost() from exc
            raise

    @contextlib.contextmanager
    def _sql(self) -> Iterator[sql.Cursor]:
        """A transaction in plain SQL (``sql.py``) on the same connection."""
        conn = self._connection()
        dbapi = conn.connection.dbapi_connection
        try:
            cursor = dbapi.cursor()  # type: ignore[union-attr]
        except self.dialect.Error as exc:
            if self._gone(conn):
                raise self._lost() from exc
            raise
        try:
            yield sql.Cursor(self.dialect, cursor)
            dbapi.commit()  # type: ignore[union-attr]
        except BaseException as exc:
            if isinstance(exc, self.dialect.Error) and self._gone(conn):
                raise self._lost() from exc
            dbapi.rollback()  # type: ignore[union-attr]
            raise
        finally:
            with contextlib.suppress(self.dialect.Error):
                cursor.close()

    def _gone(self, conn: Connection) -> bool:
        """Whether the database dropped this connection (a PostgreSQL restart, a fail-over, an idle
        session's timeout): the driver marks it closed once a statement finds out."""
        dbapi = conn.connection.dbapi_connection if not conn.invalidated else None
        return dbapi is None or bool(getattr(dbapi, "closed", False) or getattr(dbapi, "broken", False))

    def _lost(self) -> LedgerUnavailable:
        """Forget this thread's dropped connection (its next statement opens another): the error to raise."""
        conn, self._local.conn = self._local.conn, None
        with contextlib.suppress(ValueError):
            self._connections.remove(conn)
        with contextlib.suppress(Exception):  # (it is broken: closing it may fail too)
            conn.invalidate()
            conn.close()
        return LedgerUnavailable("the ledger's database dropped the connection: try again")

    # -- payments -------------------------------------------------------------------------

    def reserve(self, row: dict[str, Any]) -> str | None:
        """Lock a payment's replay key. Returns the payment id, or None if the key is taken.

        A key whose payment was released (never settled) may be reserved again, for the same
        request only: that is a retry of a call that was not served.
        """
        with self._sql() as c:
            return self._reserve(c, row)

    @staticmethod
    def _reserve(c: sql.Cursor, row: dict[str, Any]) -> str | None:
        now = time.time()
        row = {"id": new_id(), **row, "state": PaymentState.RESERVED.value, "created_at": now, "updated_at": now}
        got = c.value(sql.insert("payments", row) + RESERVE, row)
        return None if got is None else str(got)

    def lock(
        self,
        row: dict[str, Any],
        account: str,
        hold: int,
        *,
        call_id: str,
        channel: ChannelUse | None = None,
        channel_hold_seconds: float = 0.0,
        must_hold: bool = False,
    ) -> Locked | None:
        """A call's first transaction: reserve its payment (see ``reserve``; None if the key is
        taken), read the payer's credit balance and what they owe, and hold ``hold`` of their
        final credit for the call.

        Two calls of one payer lock one after the other, so the later one's ``owed`` counts the
        earlier one's payment: SQLite has one writer at a time; on PostgreSQL, where a read does
        not see a reservation not yet committed, the payer's credit row is locked first (an empty
        posting opens it).

        A payment through a ``channel`` also takes the channel for the call, for at most
        ``channel_hold_seconds`` (see ``channels.take``: raises ``ChannelRefused``, and then
        nothing is locked).

        ``must_hold``: a call that credit alone pays — if the final credit does not cover ``hold``,
        raises ``InsufficientCredit`` and nothing is locked (its key stays free for a retry)."""
        if channel is not None:  # (the payment names its channel: that is how ``channels.free`` finds it)
            row = {**row, "channel": channel.id}
        with self._sql() as c:
            payment_id = self._reserve(c, row)
            if payment_id is None:
                return None
            taken = None
            if channel is not None:
                where = {"network": row["network"], "asset": row["asset"], "payer": row["payer"]}
                taken = channels.take(c, channel, payment_id, where, channel_hold_seconds)
            balance = None if self.dialect.one_writer else self._post(c, account, [])
            network, asset, payer = account.split("|")
            in_progress, settling = c.row(OWED, {"network": network, "asset": asset, "payer": payer})  # type: ignore[misc]
            held = False
            if hold:
                with contextlib.suppress(*(() if must_hold else (InsufficientCredit,))):
                    entry = [(EntryKind.HOLD, -hold)]
                    after = self._post(c, account, entry, int(settling), call_id=call_id, payment_id=payment_id)
                    balance, held = after + hold, True  # (the balance as it was: no second read)
            if balance is None:
                balance = self._balance(c, account)
        return Locked(payment_id, balance, held, int(in_progress) + int(settling), taken)

    @staticmethod
    def _moved(c: sql.Cursor, payment_id: str, frm: str, to: str, **values: Any) -> bool:
        """Move a payment ``frm → to`` inside transaction ``c``; False if it was not in ``frm``."""
        params = {"state": to, "updated_at": time.time(), **values}
        return c.run(sql.update("payments", params, MOVED), {**params, "b_id": payment_id, "b_from": frm}) == 1

    def _move(self, payment_id: str, frm: str, to: str, **values: Any) -> bool:
        with self._sql() as c:
            return self._moved(c, payment_id, frm, to, **values)

    def release(self, payment_id: str, error: str) -> bool:
        return self._undo(payment_id, PaymentState.RELEASED, error)

    def refuse(self, payment_id: str, error: str) -> bool:
        """The chain says this payment cannot settle: it is never served, nor tried again."""
        return self._undo(payment_id, PaymentState.REFUSED, error)

    def _undo(self, payment_id: str, to: PaymentState, error: str) -> bool:
        with self._sql() as c:
            return self._undone(c, payment_id, to, error)

    def _undone(self, c: sql.Cursor, payment_id: str, to: PaymentState, error: str) -> bool:
        """Inside ``c``: a reserved payment's call will not be served — the payment moves to ``to``
        and a channel it took is free again. False, and nothing done, if it was not reserved."""
        if not self._moved(c, payment_id, PaymentState.RESERVED, to, error=error):
            return False
        channels.free(c, payment_id)
        return True

    def undo_call(
        self,
        payment_id: str,
        to: PaymentState,
        error: str,
        *,
        account: str,
        held: int,
        deposit: int,
        row: dict[str, Any],
    ) -> bool:
        """A call will not be served, at once: its payment moves to ``to`` (see ``_undone``), the
        credit ``held`` for it is released, a prepaid payment's ``deposit`` becomes credit, and the
        call is recorded (``row``). Nothing is done — False — if the payment was not reserved: the
        call was charged already, or another process gave the payment back (``give_back``)."""
        with self._sql() as c:
            if not self._undone(c, payment_id, to, error):
                return False
            if held or deposit:
                entries = [(EntryKind.RELEASE, held), (EntryKind.DEPOSIT, deposit)]
                self._post(c, account, entries, call_id=row["id"], payment_id=payment_id)
            row = {"created_at": time.time(), **row}
            c.run(sql.insert("calls", row) + FAIL_STREAM_ROW, row)
        return True

    def mark_prepaid(self, payment_id: str) -> bool:
        """A payment whose money moved before the call (a transfer, or credit): nothing to settle."""
        return self._move(payment_id, PaymentState.RESERVED, PaymentState.SETTLED)

    def mark_settled(self, payment_id: str, tx_hash: str, final_block: int) -> bool:
        """A settling payment was paid by ``tx_hash``: settled, its credit final at ``final_block``."""
        with self._sql() as c:
            return self._settled(c, payment_id, tx_hash, final_block)

    def _settled(self, c: sql.Cursor, payment_id: str, tx_hash: str, final_block: int) -> bool:
        """Inside ``c``: settling → settled, and the payer's credit may leave on chain once the chain
        reaches ``final_block`` (a reorganisation less deep may undo the settlement)."""
        params = {"tx_hash": tx_hash, "now": time.time(), "id": payment_id}
        row = c.row(SETTLED, params)
        if row is None:
            return False
        c.run(FINAL_AT, {"account": credit_account(*row), "block": final_block, "now": params["now"]})
        return True

    def mark_failed(self, payment_id: str, error: str) -> bool:
        """The settlement reverted: the payment never arrived, so its deposit is taken back from
        the payer's credit in the same transaction — into debt if it was already spent (a debt
        is repaid by the next payment before credit can pay anything)."""
        with self._sql() as c:
            row = c.row(
                "SELECT network, asset, payer, amount FROM payments WHERE id = :id AND state = 'settling'",
                {"id": payment_id},
            )
            if row is None or not self._moved(c, payment_id, PaymentState.SETTLING, PaymentState.FAILED, error=error):
                return False
            network, asset, payer, amount = row
            self._post(c, credit_account(network, asset, payer), [(EntryKind.REVERSAL, -amount)], payment_id=payment_id)
        return True

    def payment(self, payment_id: str) -> dict[str, Any] | None:
        with self._tx() as c:
            row = c.execute(select(P).where(P.c.id == payment_id)).mappings().first()
        return dict(row) if row else None

    def payment_states(self, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        with self._tx() as c:
            return {str(i): str(st) for i, st in c.execute(select(P.c.id, P.c.state).where(P.c.id.in_(ids)))}

    def settled_by(self, tx_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The payments these outbox transactions settle."""
        if not tx_ids:
            return []
        with self._tx() as c:
            return [dict(r) for r in c.execute(select(P).where(P.c.tx_id.in_(tx_ids))).mappings()]

    def unsettled_amount(
        self, network: str, asset: str, payer: str, *, through: str | None = None, schemes: Sequence[str] = ()
    ) -> int:
        """What a payer owes us that a balance read from the chain may not show yet: payments in
        progress (this one included) and settlements not yet confirmed — only those locked no later
        than the payment ``through`` (what a call checked again must still cover: the payer's later
        calls are theirs to cover), only of ``schemes`` if any are named."""
        params: dict[str, Any] = {"network": network, "asset": asset, "payer": payer}
        query = OWED
        if through is not None or schemes:
            names = {f"s{i}": s for i, s in enumerate(schemes)}
            query = f"SELECT COALESCE(SUM(amount), 0) FROM payments WHERE {_PAYER} AND {IN_FLIGHT}"
            if through is not None:
                query += " AND created_at <= (SELECT created_at FROM payments WHERE id = :through)"
                params["through"] = through
            if names:
                query += f" AND scheme IN ({', '.join(':' + n for n in names)})"
            params.update(names)
        with self._sql() as c:
            return sum(map(int, c.row(query, params)))  # type: ignore[arg-type]

    def settlement_lag(self, now: float) -> float:
        """Seconds since the oldest payment still settling started settling (0: none is)."""
        with self._sql() as c:
            oldest = c.value("SELECT MIN(updated_at) FROM payments WHERE state = 'settling'")
        return 0.0 if oldest is None else max(now - float(oldest), 0.0)

    def unclaimed_total(self) -> int:
        """What every channel's vouchers owe that is not claimed yet."""
        with self._sql() as c:
            return int(c.value("SELECT COALESCE(SUM(charged - claimed), 0) FROM channels"))

    def count_by_state(self) -> dict[str, int]:
        with self._tx() as c:
            rows = c.execute(select(P.c.state, func.count()).group_by(P.c.state)).all()
        return {str(s): int(n) for s, n in rows}

    # -- settlement account nonces ----------------------------------------------------------

    def sync_settler_nonce(self, address: str, chain_next: int) -> None:
        """Make sure the shared counter is not behind the chain (e.g. after an outside tx)."""
        with self._tx() as c:
            got = c.execute(
                update(N)
                .where(N.c.address == address)
                .values(
                    next_nonce=func.max(N.c.next_nonce, chain_next)
                    if self.engine.dialect.name == "sqlite"
                    else func.greatest(N.c.next_nonce, chain_next)
                )
            )
            if got.rowcount == 0:
                try:
                    with c.begin_nested():
                        c.execute(insert(N).values(address=address, next_nonce=chain_next))
                except IntegrityError:
                    pass

    @staticmethod
    def _take_nonce(c: sql.Cursor, address: str) -> int:
        got = c.value(TAKE_NONCE, {"address": address})
        if got is None:
            raise RuntimeError(f"transaction nonce for {address} was never synced with the chain")
        return int(got) - 1

    # -- the outbox: every transaction we sign -----------------------------------------------

    def _enqueue(self, c: sql.Cursor, purpose: str, sender: str, sign: SignTx, earlier: str = "") -> dict[str, Any]:
        """Take ``sender``'s next nonce and add the transaction ``sign`` makes with it, inside ``c``
        (``earlier``: hashes of the row it replaces, kept ahead of its own)."""
        nonce = self._take_nonce(c, sender)
        now = time.time()
        row = {
            "id": new_id(),
            "purpose": purpose,
            "sender": sender,
            "nonce": nonce,
            "state": TxState.QUEUED.value,
            "created_at": now,
            "updated_at": now,
            "fee_at": now,
            **sign(nonce),
        }
        row["hashes"] = f"{earlier} {row['tx_hash']}".lstrip()
        c.run(sql.insert("transactions", row), row)
        return row

    def _settle(self, c: sql.Cursor, payment_id: str | None, settle: Settlement | None) -> dict[str, Any] | None:
        """Inside ``c``: settle a reserved payment as ``settle`` says; raises _NotReserved (which
        rolls everything back, the nonce included) if it was not reserved."""
        if settle is None or payment_id is None:
            return None
        amount = {} if settle.amount is None else {"amount": settle.amount}
        if settle.channel is not None and not channels.charge(c, settle.channel, payment_id, settle.amount or 0):
            raise _NotReserved  # (the call no longer holds its channel: the worker's hold ran out)
        if settle.sign is None:
            if not self._moved(c, payment_id, PaymentState.RESERVED, PaymentState.SETTLED, **amount):
                raise _NotReserved
            return None
        tx = self._enqueue(c, "settlement", str(settle.sender), settle.sign)
        moved = dict(tx_id=tx["id"], tx_hash=tx["tx_hash"], **amount)
        if not self._moved(c, payment_id, PaymentState.RESERVED, PaymentState.SETTLING, **moved):
            raise _NotReserved
        return tx

    def queue_transaction(self, purpose: str, sender: str, sign: SignTx) -> dict[str, Any]:
        """Queue a transaction that settles nothing in the ledger (a channel's deposit)."""
        with self._sql() as c:
            return self._enqueue(c, purpose, sender, sign)

    def sign_settlement(
        self, payment_id: str, sender: str, sign: SignTx, amount: int | None = None
    ) -> dict[str, Any] | None:
        """Queue the settlement of a reserved payment and move it ``reserved → settling``, in one
        transaction. Returns the outbox row, or None if the payment was not reserved."""
        try:
            with self._sql() as c:
                return self._settle(c, payment_id, Settlement(amount, sender, sign))
        except _NotReserved:
            return None

    def open_deposits(self) -> list[str]:
        """The calldata of the channel deposits not mined yet."""
        with self._sql() as c:
            return [row["data"] for row in c.dicts(OPEN_DEPOSITS, {})]

    def open_transactions(self, state: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Outbox rows in ``state`` (queued or sent), lowest nonce first."""
        with self._sql() as c:
            return c.dicts(OPEN_TRANSACTIONS, {"state": state, "limit": limit})

    def transactions_sent(self, ids: Sequence[str], errors: dict[str, str]) -> None:
        """The node accepted ``ids`` (queued → sent); ``errors`` are the refusals to record on
        rows that stay queued."""
        now = time.time()
        with self._sql() as c:
            if ids:
                among, params = sql.placeholders("id", ids)
                c.run(
                    "UPDATE transactions SET state = 'sent', broadcast_at = :now, error = NULL, updated_at = :now"
                    f" WHERE id IN {among} AND state IN ('queued', 'sent')",
                    {"now": now, **params},
                )
            for tx_id, err in errors.items():
                c.run(
                    "UPDATE transactions SET error = :error, updated_at = :now WHERE id = :id",
                    {"error": err[:500], "now": now, "id": tx_id},
                )

    def bump_transaction(self, tx_id: str, old_hash: str, signed: dict[str, Any]) -> bool:
        """Replace a transaction's signature (same nonce, higher fees); its old hashes are kept."""
        now = time.time()
        with self._tx() as c:
            res = c.execute(
                update(T)
                .where(T.c.id == tx_id, T.c.state.in_(OPEN), T.c.tx_hash == old_hash)
                .values(**signed, hashes=T.c.hashes + " " + signed["tx_hash"], fee_at=now, updated_at=now)
            )
        return res.rowcount == 1

    def transaction_mined(self, tx_id: str, mined_hash: str, ok: bool) -> bool:
        """A transaction was mined (one of its hashes): sent or queued → mined | reverted, once."""
        with self._sql() as c:
            return self._mined(c, tx_id, mined_hash, ok)

    @staticmethod
    def _mined(c: sql.Cursor, tx_id: str, mined_hash: str, ok: bool) -> bool:
        state = TxState.MINED if ok else TxState.REVERTED
        params = {"state": state, "hash": mined_hash, "now": time.time(), "id": tx_id}
        return (
            c.run(
                "UPDATE transactions SET state = :state, mined_hash = :hash, updated_at = :now"
                " WHERE id = :id AND state IN ('queued', 'sent')",
                params,
            )
            == 1
        )

    def settlements_mined(
        self, mined: Sequence[tuple[str, str, bool, Callable[[dict[str, Any]], bool], int]]
    ) -> list[tuple[dict[str, Any] | None, bool]]:
        """Settlement transactions were mined, each (row id, the hash mined, whether it succeeded,
        ``moved``, the block its payer's credit is final at): each is concluded (once, whichever
        replica comes first) and, if ``moved(payment)`` says it moved what its payment owed, the
        payment is settled — all in one transaction (a poll concludes a block's worth). Returns for
        each (the payment, if this call concluded it and it was still settling; whether it is
        settled now) — one not settled is the worker's to judge."""
        out: list[tuple[dict[str, Any] | None, bool]] = []
        with self._sql() as c:
            for tx_id, mined_hash, ok, moved, final_block in mined:
                rows = (
                    c.dicts("SELECT * FROM payments WHERE tx_id = :tx_id AND state = 'settling'", {"tx_id": tx_id})
                    if self._mined(c, tx_id, mined_hash, ok)
                    else None  # another replica concluded it
                )
                if not rows:
                    out.append((None, False))
                    continue
                payment = rows[0]
                settled = ok and moved(payment)
                if settled:
                    self._settled(c, payment["id"], mined_hash, final_block)
                out.append((payment, settled))
        return out

    def stranded_settlements(self, limit: int = 100) -> list[dict[str, Any]]:
        """Payments still settling whose transaction is concluded (mined or reverted): a mined
        settlement that paid would have settled them with its conclusion, so their judgment — paid
        elsewhere, or failed — was cut short. Each with its transaction's ``tx_state`` and ``mined_hash``."""
        with self._sql() as c:
            return c.dicts(
                "SELECT p.*, t.state AS tx_state, t.mined_hash FROM payments p JOIN transactions t ON t.id = p.tx_id"
                " WHERE p.state = 'settling' AND t.state IN ('mined', 'reverted') LIMIT :limit",
                {"limit": limit},
            )

    def replace_transaction(self, tx_id: str, hashes: str, sign: SignTx) -> dict[str, Any] | None:
        """Another transaction of our sender used this one's nonce (the key was used elsewhere), and
        none of its signatures ``hashes`` was mined: queue the same call again with a new nonce, and
        point what it still settles or pays at it. None if the row moved, or was signed anew (bumped),
        meanwhile: another process is on it, and its new signature may be the one mined."""
        with self._sql() as c:
            old = c.row(  # (the move first: it takes the row, and only one process replaces it)
                "UPDATE transactions SET state = 'replaced', updated_at = :now"
                " WHERE id = :id AND state IN ('queued', 'sent') AND hashes = :hashes RETURNING purpose, sender",
                {"now": time.time(), "id": tx_id, "hashes": hashes},
            )
            if old is None:  # mined, or replaced, by another process meanwhile: nothing to send again
                return None
            # (it keeps the old row's hashes: one of them may turn out mined after all — a node
            # answering receipts late — and then it paid, and the new one reverts on its replay guard)
            new = self._enqueue(c, old[0], old[1], sign, earlier=hashes)
            moved = {"new": new["id"], "hash": new["tx_hash"], "old": tx_id}
            c.run("UPDATE payments SET tx_id = :new, tx_hash = :hash WHERE tx_id = :old AND state = 'settling'", moved)
            c.run("UPDATE payouts SET tx_id = :new, tx_hash = :hash WHERE tx_id = :old AND state = 'sending'", moved)
            c.run("UPDATE channels SET claim_tx = :new WHERE claim_tx = :old", moved)
            refund = {"new": channels.REFUND_HOLD + new["id"], "old": channels.REFUND_HOLD + tx_id}
            c.run("UPDATE channels SET busy = :new WHERE busy = :old", refund)
        return new

    def successor(self, tx: dict[str, Any]) -> dict[str, Any] | None:
        """The transaction that replaced ``tx`` (``replace_transaction``: its hashes lead with tx's)."""
        with self._sql() as c:
            rows = c.dicts(
                "SELECT * FROM transactions WHERE id <> :id AND hashes LIKE :prefix ORDER BY created_at DESC LIMIT 1",
                {"id": tx["id"], "prefix": tx["hashes"] + " %"},  # (hex and spaces: no wildcard in them)
            )
        return rows[0] if rows else None

    def transaction(self, tx_id: str) -> dict[str, Any] | None:
        with self._tx() as c:
            row = c.execute(select(T).where(T.c.id == tx_id)).mappings().first()
        return dict(row) if row else None

    # -- calls ----------------------------------------------------------------------------

    def insert_call(self, row: dict[str, Any], *, settle: Settlement | None = None) -> None:
        """Record a call — and, when its upstream has just committed, settle its payment in the
        same transaction: the money moves if and only if the call is on record."""
        try:
            with self._sql() as c:
                self._settle(c, row.get("payment_id"), settle)
                row = {"created_at": time.time(), **row}
                c.run(sql.insert("calls", row), row)
        except _NotReserved:
            raise RuntimeError(f"payment {row.get('payment_id')} was not reserved") from None

    def streams_alive(self, call_ids: Sequence[str], now: float, chunk: int = 500) -> None:
        """The streams ``call_ids`` are being relayed by this process (``Gateway.close_abandoned_streams``
        leaves them alone, also when their events do not move)."""
        for i in range(0, len(call_ids), chunk):
            ids, params = sql.placeholders("c", call_ids[i : i + chunk])
            alive = f"UPDATE calls SET alive_at = :now WHERE id IN {ids} AND status = 'streaming'"
            with self._sql() as c:
                c.run(alive, {**params, "now": now})

    def stream_progress(self, call_id: str, events: int) -> None:
        """How far a stream got: what metering uses if the process dies before the stream ends."""
        with self._sql() as c:
            c.run(sql.update("calls", ("events",), STREAMING), {"events": events, "b_id": call_id})

    def cache_stats(self, since: float, *, per_upstream: bool = True) -> list[dict[str, Any]]:
        """Per model (and upstream), since ``since``: prompt and cached tokens (observed vs
        expected) and the discount passed on, over metered calls. Calls whose upstream did not
        report cached tokens are counted apart: unknown is not zero."""
        reported = C.c.cached_tokens.is_not(None)
        # (of what a call was expected to find cached, what it found: never more than expected)
        survived = case(
            (~reported, 0),
            (C.c.cached_tokens < C.c.expected_cached_tokens, C.c.cached_tokens),
            else_=C.c.expected_cached_tokens,
        )
        keys = (C.c.model, C.c.upstream) if per_upstream else (C.c.model,)
        q = (
            select(
                *keys,
                func.count().label("calls"),
                func.count(C.c.cached_tokens).label("calls_reporting_cache"),
                func.coalesce(func.sum(C.c.prompt_tokens), 0).label("prompt_tokens"),
                func.coalesce(func.sum(case((reported, C.c.prompt_tokens), else_=0)), 0).label(
                    "prompt_tokens_reporting"
                ),
                func.coalesce(func.sum(C.c.cached_tokens), 0).label("cached_tokens"),
                func.coalesce(func.sum(case((reported, C.c.expected_cached_tokens), else_=0)), 0).label(
                    "expected_cached_tokens"
                ),
                func.coalesce(func.sum(survived), 0).label("survived_tokens"),
                func.coalesce(func.sum(C.c.cache_discount), 0).label("discount_passed"),
            )
            .where(C.c.created_at >= since, C.c.prompt_tokens.is_not(None))
            .group_by(*keys)
            .order_by(*keys)
        )
        with self._tx() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def finished_calls(self, after: tuple[float, str], until: float, limit: int) -> list[dict[str, Any]]:
        """Calls that finished after ``after`` (a call's ``(finished_at, id)``) and by ``until``, in
        that order, at most ``limit``: what live stats read (``stats.py``)."""
        with self._sql() as c:
            return c.dicts(FINISHED_CALLS, {"t": after[0], "id": after[1], "until": until, "limit": limit})

    def usage_by_model(self, since: float) -> list[dict[str, Any]]:
        """Per model, of the calls served since ``since``: how many, and their tokens."""
        with self._sql() as c:
            return c.dicts(USAGE_BY_MODEL, {"since": since})

    def take_free_call(self, identity: str, day: int, quota: int) -> int | None:
        """Count one more free-tier call of ``identity`` on ``day``: its number, or None when the
        quota is spent (one statement: replicas count together)."""
        if quota < 1:
            return None
        with self._sql() as c:
            got = c.value(TAKE_FREE_CALL, {"identity": identity, "day": day, "quota": quota})
        return None if got is None else int(got)

    def return_free_call(self, identity: str, day: int) -> None:
        """A free-tier call that was not served does not count."""
        with self._sql() as c:
            c.run(RETURN_FREE_CALL, {"identity": identity, "day": day})

    def forget_free_calls(self, before_day: int, chunk: int = 2000) -> None:
        """Forget the free tier's counts of days before ``before_day``, ``chunk`` rows a transaction
        (the first pass after midnight forgets a whole day's identities: one transaction would hold
        every other writer for seconds)."""
        while True:
            with self._sql() as c:
                if c.run(FORGET_FREE_CALLS, {"day": before_day, "chunk": chunk}) < chunk:
                    return

    def abandoned_payments(self, reserved_before: float, limit: int = 100) -> list[dict[str, Any]]:
        """Payments ``reserved`` before ``reserved_before`` (a retry of the same request reserves one
        again) and still reserved, whose call is not a stream: their process died while the call
        ran, and its answer never left (it leaves only once charged). (A stream's row is written as
        it starts; ``abandoned_streams`` meters those.)"""
        with self._sql() as c:
            return c.dicts(ABANDONED_PAYMENTS, {"before": reserved_before, "limit": limit})

    def give_back(self, payment: dict[str, Any], *, prepaid: bool, error: str) -> bool:
        """Undo, in one transaction, what the call of an abandoned payment (``abandoned_payments``)
        left: the credit held for it is released; a payment whose money moved before the call (a
        transfer) becomes credit and is settled, any other is released (it may pay a retry of the
        same request); a channel it took is free again. What an undo cut short already did is not
        done twice. False if the payment was no longer reserved (another process gave it back)."""
        payment_id = payment["id"]
        account = credit_account(payment["network"], payment["asset"], payment["payer"])
        with self._sql() as c:
            if not self._undone(c, payment_id, PaymentState.SETTLED if prepaid else PaymentState.RELEASED, error):
                return False
            refs = {"account": account, "payment_id": payment_id}
            for hold in c.dicts(HELD_FOR_PAYMENT, refs):
                if hold["held"] > 0:
                    entry = [(EntryKind.RELEASE, int(hold["held"]))]
                    self._post(c, account, entry, call_id=hold["call_id"], payment_id=payment_id)
            if prepaid and payment["amount"] and not c.value(DEPOSITED, refs):
                self._post(c, account, [(EntryKind.DEPOSIT, payment["amount"])], payment_id=payment_id)
        return True

    def abandoned_streams(self, started_before: float, metering_before: float) -> list[dict[str, Any]]:
        """Streams still ``streaming`` that began before ``started_before`` — or still ``metering``
        (waiting for their usage after the fact) that began before ``metering_before``: their
        process died, so they were never metered (and may still hold credit)."""
        with self._sql() as c:
            return c.dicts(ABANDONED_STREAMS, {"before": started_before, "metering_before": metering_before})

    def metering_later(self, call_id: str, events: int) -> None:
        """A stream ended (after ``events``) without its usage, which its upstream tells after the
        fact: every replica's sweep of streams left open leaves it alone while that is looked up."""
        with self._sql() as c:
            q = "UPDATE calls SET status = 'metering', events = :events WHERE id = :id AND status = 'streaming'"
            c.run(q, {"id": call_id, "events": events})

    def receipt(self, call_id: str) -> dict[str, Any] | None:
        """A call joined with its payment."""
        if not _storable(call_id):
            return None
        with self._tx() as c:
            row = (
                c.execute(
                    select(
                        C,
                        P.c.state.label("payment_state"),
                        P.c.scheme,
                        P.c.network,
                        P.c.asset,
                        P.c.payer,
                        P.c.payee,
                        P.c.amount,
                        P.c.tx_hash,
                        P.c.error.label("payment_error"),
                    )
                    .select_from(C.outerjoin(P, C.c.payment_id == P.c.id))
                    .where(C.c.id == call_id)
                )
                .mappings()
                .first()
            )
        return dict(row) if row else None

    # -- credit ---------------------------------------------------------------------------------

    def _post(
        self, c: sql.Cursor, account: str, entries: list[tuple[str, int]], floor: int | None = None, **refs: Any
    ) -> int:
        """Apply journal entries to an account inside transaction ``c``. Spends (holds and
        withdrawals) pass a ``floor`` the balance may not end below; everything else — deposits,
        releases, charges, refunds, reversals — posts whatever the balance, a debt included."""
        delta = sum(amount for _, amount in entries)
        now = time.time()
        params = {"account": account, "delta": delta, "now": now, "floor": NO_FLOOR if floor is None else floor}
        balance = c.value(APPLY, params)
        if balance is None:
            raise InsufficientCredit(account)
        rows = [{"account": account, "kind": k, "amount": a, "created_at": now, **refs} for k, a in entries if a]
        if rows:
            c.many(sql.insert("credit_entries", rows[0]), rows)
        return int(balance)

    def _spend(self, c: sql.Cursor, account: str, kind: str, amount: int, **refs: Any) -> bool:
        """Take ``amount`` of an account's final credit inside ``c`` (a hold or a withdrawal);
        False, and nothing posted, if it does not cover it. On PostgreSQL the account's row is
        locked before what is unconfirmed is read (see ``lock``): a call finishing meanwhile moves
        its payment to settling and deposits it in one transaction, seen whole or not at all."""
        if not self.dialect.one_writer:
            self._post(c, account, [])
        try:
            self._post(c, account, [(kind, -amount)], self._unconfirmed(c, account), **refs)
        except InsufficientCredit:
            return False
        return True

    @staticmethod
    def _balance(c: sql.Cursor, account: str) -> int:
        return int(c.value(BALANCE, {"account": account}) or 0)

    def credit_balance(self, account: str) -> int:
        with self._sql() as c:
            return self._balance(c, account)

    @staticmethod
    def _unconfirmed(c: sql.Cursor, account: str) -> int:
        """What of an account's credit is not final yet: its payments still settling on chain (a
        settlement can revert, and its deposit with it). Only final credit may be spent."""
        network, asset, payer = account.split("|")
        return int(c.value(UNCONFIRMED, {"network": network, "asset": asset, "payer": payer}))

    def available_credit(self, account: str) -> int:
        with self._sql() as c:
            return max(self._balance(c, account) - self._unconfirmed(c, account), 0)

    def release_credit(self, account: str, amount: int, *, call_id: str) -> None:
        with self._sql() as c:
            self._post(c, account, [(EntryKind.RELEASE, amount)], call_id=call_id)

    def settle_call_credit(
        self, account: str, *, deposit: int, held: int, cost: int, call_id: str, payment_id: str | None
    ) -> int:
        """A call ended: its payment is deposited, its hold released, its cost charged. Returns the balance."""
        with self._sql() as c:
            return self._settle_call(c, account, deposit, held, cost, call_id, payment_id)

    def _settle_call(
        self, c: sql.Cursor, account: str, deposit: int, held: int, cost: int, call_id: str, payment_id: str | None
    ) -> int:
        return self._post(
            c,
            account,
            [(EntryKind.DEPOSIT, deposit), (EntryKind.RELEASE, held), (EntryKind.CHARGE, -cost)],
            call_id=call_id,
            payment_id=payment_id,
        )

    def finish_call(
        self,
        account: str,
        *,
        deposit: int,
        held: int,
        cost: int,
        payment_id: str | None,
        call: dict[str, Any],
        insert_row: bool,
        settle: Settlement | None = None,
    ) -> int | None:
        """Charge a finished call and record it (insert, or update the row of a stream) — and
        settle its payment, for a call not streamed — at once. Returns the payer's credit balance
        after it; None if the stream had been metered already (by another process, or the sweep of
        streams left open: its charge stands)."""
        try:
            with self._sql() as c:
                self._settle(c, payment_id, settle)
                balance = self._settle_call(c, account, deposit, held, cost, call["id"], payment_id)
                if insert_row:
                    row = {"created_at": time.time(), **call, "credit_after": balance}
                    c.run(sql.insert("calls", row), row)
                else:
                    row = {k: v for k, v in call.items() if k != "id"} | {"credit_after": balance}
                    if c.run(sql.update("calls", row, STREAMING), {**row, "b_id": call["id"]}) != 1:
                        raise _AlreadyMetered  # another process closed it: roll back, charge once
        except _AlreadyMetered:
            return None
        except _NotReserved:
            if not insert_row and self.metered_cost(call["id"]) is not None:
                return None  # (and its payment settled then)
            raise RuntimeError(f"payment {payment_id} was not reserved") from None
        return balance

    def metered_cost(self, call_id: str) -> int | None:
        """What a call was charged, once metered (None while a stream runs, or with no such call)."""
        with self._sql() as c:
            rows = c.dicts(f"SELECT cost FROM calls WHERE id = :id AND NOT ({OPEN_STREAM})", {"id": call_id})
        return rows[0]["cost"] if rows else None

    # -- channels: claims ---------------------------------------------------------------------

    def channel(self, channel_id: str) -> dict[str, Any] | None:
        if not _storable(channel_id):
            return None
        with self._sql() as c:
            rows = c.dicts(channels.STATE, {"id": channel_id})
        return rows[0] if rows else None

    def unclaimed_authorizers(self, now: float) -> dict[str, int]:
        """The receiver authorizers that channels with charges not claimed yet name (each claim
        must be signed by its channel's), with what those channels owe us — but for channels whose
        payer's withdrawal could be finished by ``now``: what they owed is no longer claimable."""
        with self._sql() as c:
            rows = c.dicts(channels.OWING)
        out: dict[str, int] = {}
        for row in rows:
            config = json.loads(row["config"])
            if row["withdraw_at"] and now >= row["withdraw_at"] + int(config.get("withdrawDelay", 0)):
                continue
            authorizer = str(config.get("receiverAuthorizer", "")).lower()
            out[authorizer] = out.get(authorizer, 0) + int(row["owed"])
        return out

    def claimable_channels(self, network: str, asset: str, limit: int) -> list[dict[str, Any]]:
        """Channels charged more than they have claimed and not being claimed: those whose payer
        is withdrawing first, then the most unclaimed."""
        with self._sql() as c:
            return c.dicts(channels.CLAIMABLE, {"network": network, "asset": asset, "limit": limit})

    def queue_claim(self, totals: dict[str, int], sender: str, sign: SignTx) -> dict[str, Any] | None:
        """Queue one transaction claiming each channel up to its total, and mark them claiming by
        it, at once. Returns the outbox row; None if another process is claiming one of them."""
        try:
            with self._sql() as c:
                tx = self._enqueue(c, "claim", sender, sign)
                now = time.time()
                for channel_id, total in totals.items():
                    if c.run(channels.CLAIMING, {"tx": tx["id"], "to": total, "now": now, "id": channel_id}) != 1:
                        raise _Taken
                return tx
        except _Taken:
            return None

    def claim_mined(self, tx_id: str, mined_hash: str, ok: bool) -> bool:
        """A claim was mined: its channels have claimed what it claimed (or, reverted, nothing and
        may be claimed again), once, whichever replica comes first."""
        with self._sql() as c:
            if not self._mined(c, tx_id, mined_hash, ok):
                return False
            c.run(channels.CLAIMED if ok else channels.UNCLAIMED, {"tx": tx_id, "now": time.time()})
        return True

    def deposit_mined(self, tx_id: str, mined_hash: str, ok: bool, channel_id: str, amount: int) -> bool:
        """A deposit of ``amount`` into the channel was mined (``ok``: or reverted, and counts for
        nothing): the channel holds it, once, whichever replica comes first, in the transaction
        that concludes it — however long after its request stopped waiting."""
        with self._sql() as c:
            if not self._mined(c, tx_id, mined_hash, ok):
                return False
            if ok:
                c.run(channels.DEPOSITED, {"id": channel_id, "amount": amount, "now": time.time()})
        return True

    def take_for_refund(
        self, channel_id: str, charged: int, holder: str, payer: str, hold_seconds: float
    ) -> dict[str, Any]:
        """Take a channel for its payer's refund (see ``channels.take_for_refund``)."""
        with self._sql() as c:
            return channels.take_for_refund(c, channel_id, charged, holder, payer, hold_seconds)

    def refunded(self, channel_id: str, hold: str, *, balance: int, claimed: int, mined: bool) -> dict[str, Any] | None:
        """A refund held as ``hold`` was concluded (``mined``, or reverted): the channel holds what the
        escrow says (read since), and is free again. The channel, or None if the refund was
        concluded already (by the claimer, or the request)."""
        with self._sql() as c:
            params = {"id": channel_id, "holder": hold, "balance": balance, "claimed": claimed, "mined": int(mined)}
            if c.run(channels.REFUNDED, {**params, "now": time.time()}) != 1:
                return None
            return c.dicts(channels.STATE, {"id": channel_id})[0]

    def queue_refund(self, channel_id: str, holder: str, sender: str, sign: SignTx) -> dict[str, Any] | None:
        """Queue a channel's refund transaction, and hold the channel for it (``channels.REFUND_HOLD``)
        until its outcome is read (``refunded``), in one transaction. None, and nothing queued, if
        the channel is no longer held by ``holder`` (its hold for the refund lapsed)."""
        try:
            with self._sql() as c:
                tx = self._enqueue(c, "refund", sender, sign)
                params = {"refund": channels.REFUND_HOLD + tx["id"], "flight": channels.REFUND_IN_FLIGHT}
                if (
                    c.run(channels.REFUND_SENDING, {**params, "id": channel_id, "holder": holder, "now": time.time()})
                    != 1
                ):
                    raise _Taken
                return tx
        except _Taken:
            return None

    def refunds_left(self) -> list[dict[str, Any]]:
        """Channels still held for a refund whose transaction is concluded (mined or reverted): id,
        the hold (``busy``: ``refund:<its transaction>``), and the transaction's ``state``,
        ``mined_hash`` and ``tx_hash``."""
        with self._sql() as c:
            return c.dicts(channels.REFUNDS_LEFT, channels.REFUNDS_LEFT_PARAMS)

    def free_channel(self, channel_id: str, holder: str) -> None:
        with self._sql() as c:
            c.run(channels.FREE_HELD, {"id": channel_id, "holder": holder, "now": time.time()})

    def watched_channels(self, network: str, asset: str) -> list[dict[str, Any]]:
        """Channels holding money we have not claimed (charged or not): their payer may start a
        withdrawal, and vouchers against money withdrawn would never be claimed."""
        with self._sql() as c:
            return c.dicts(channels.WATCHED, {"network": network, "asset": asset})

    def channel_withdrawing(self, channel_id: str, requested_at: int) -> bool:
        """The payer started a timed withdrawal: the channel takes no more vouchers."""
        with self._sql() as c:
            return c.run(channels.WITHDRAWING, {"at": requested_at, "now": time.time(), "id": channel_id}) == 1

    def journal(self, account: str | None = None) -> dict[str, int]:
        """Sum of journal entries by kind (all accounts, or one)."""
        q = select(E.c.kind, func.sum(E.c.amount)).group_by(E.c.kind)
        if account:
            q = q.where(E.c.account == account)
        with self._tx() as c:
            return {str(k): int(v) for k, v in c.execute(q).all()}

    def request_payout(self, account: str, wallet: str, amount: int, request_nonce: str, *, head: int) -> str | None:
        """Debit credit and queue a payout, atomically, the chain being at block ``head``. None if
        the nonce was used; raises InsufficientCredit, or ``NotFinal`` before the account's
        ``final_block``."""
        payout_id, now = new_id(), time.time()
        row = {
            "id": payout_id,
            "account": account,
            "wallet": wallet,
            "amount": amount,
            "state": "pending",
            "request_nonce": request_nonce,
            "created_at": now,
            "updated_at": now,
        }
        try:
            with self._sql() as c:
                c.run(sql.insert("payouts", row), row)
                if not self._spend(c, account, EntryKind.WITHDRAWAL, amount, payout_id=payout_id):
                    raise InsufficientCredit(account)  # only final credit leaves on chain
                # (read with the account taken: a settlement concluding meanwhile is seen, or still counted
                # as settling and its deposit not spendable)
                final = int(c.value(FINAL_BLOCK, {"account": account}) or 0)
                if final > head:
                    raise NotFinal(final)
        except self.dialect.IntegrityError:
            return None
        return payout_id

    def payouts(self, state: str, limit: int = 100) -> Sequence[dict[str, Any]]:
        """Payouts in ``state``, oldest first (the settlement worker asks for pending ones every pass)."""
        with self._sql() as c:
            q = "SELECT * FROM payouts WHERE state = :state ORDER BY created_at LIMIT :limit"
            return c.dicts(q, {"state": state, "limit": limit})

    def payout(self, payout_id: str) -> dict[str, Any] | None:
        if not _storable(payout_id):
            return None
        with self._tx() as c:
            row = c.execute(select(PO).where(PO.c.id == payout_id)).mappings().first()
        return dict(row) if row else None

    def sign_payout(self, ids: list[str], sender: str, sign: SignTx) -> bool:
        """Claim pending payouts ``ids`` for one queued transaction, all at once: if any was
        claimed elsewhere first, nothing changes (not even the nonce)."""
        try:
            with self._sql() as c:
                tx = self._enqueue(c, "payout", sender, sign)
                among, params = sql.placeholders("id", ids)
                claimed = c.run(
                    "UPDATE payouts SET state = 'sending', tx_id = :tx_id, tx_hash = :tx_hash, updated_at = :now"
                    f" WHERE id IN {among} AND state = 'pending'",
                    {"tx_id": tx["id"], "tx_hash": tx["tx_hash"], "now": time.time(), **params},
                )
                if claimed != len(ids):
                    raise _NotReserved
        except _NotReserved:
            return False
        return True

    def payouts_mined(self, tx_id: str, tx_hash: str, ok: bool, error: str = "") -> bool:
        """The payout transaction ``tx_id`` was mined (``tx_hash``): it is concluded and its payouts
        are sent, or — reverted — failed and refunded to credit, in one transaction, once (False:
        another process concluded it)."""
        with self._sql() as c:
            if not self._mined(c, tx_id, tx_hash, ok):
                return False
            now = time.time()
            rows = c.dicts(
                "SELECT id, account, amount FROM payouts WHERE tx_id = :tx_id AND state = 'sending'", {"tx_id": tx_id}
            )
            for row in rows:
                moved = c.run(
                    "UPDATE payouts SET state = :state, tx_hash = :hash, error = :error, updated_at = :now"
                    " WHERE id = :id AND state = 'sending'",
                    {
                        "state": "sent" if ok else "failed",
                        "hash": tx_hash,
                        "error": error or None,
                        "now": now,
                        "id": row["id"],
                    },
                )
                if moved == 1 and not ok:
                    self._post(c, row["account"], [(EntryKind.REFUND, row["amount"])], payout_id=row["id"])
        return True

    # -- idempotent requests ---------------------------------------------------------------------

    def claim_request(self, key: str, fingerprint: str, stale_before: float, now: float) -> dict[str, Any] | None:
        """Start the request with idempotency ``key`` at ``now``: None if it is ours to run (new, or
        left in progress by a process that died before ``stale_before``); else the row that holds
        the key. ``now`` is the claim's own: only that claim finishes or releases it."""
        row = {"key": key, "fingerprint": fingerprint, "state": "in_progress", "created_at": now}
        with self._tx() as c:
            for _ in range(CLAIM_ATTEMPTS):
                try:
                    with c.begin_nested():
                        c.execute(insert(ID), row)
                    return None
                except IntegrityError:
                    pass
                taken = c.execute(
                    update(ID)
                    .where(ID.c.key == key, ID.c.state == "in_progress", ID.c.created_at < stale_before)
                    .where(ID.c.fingerprint == fingerprint)
                    .values(created_at=now)
                )
                if taken.rowcount == 1:
                    return None
                got = c.execute(select(ID).where(ID.c.key == key)).mappings().first()
                if got is not None:
                    return dict(got)
                # (PostgreSQL: another replica released the key between the insert and the read —
                # nobody holds it now: claim it again, or this call would run without holding it)
        return {"key": key, "fingerprint": fingerprint, "state": "in_progress"}  # (claimed and released over and over)

    def finish_request(
        self,
        key: str,
        claimed: float,
        status: int,
        headers: dict[str, str],
        body: bytes | None,
        receipt_id: str | None,
    ) -> None:
        """The request with ``key``, claimed at ``claimed``, was answered: its answer is kept, dated
        from now (a stream's: from its start)."""
        answer = {"status": status, "headers": json.dumps(headers), "body": body, "receipt_id": receipt_id}
        with self._tx() as c:
            c.execute(
                update(ID)
                .where(ID.c.key == key, ID.c.state == "in_progress", ID.c.created_at == claimed)
                .values(state="done", created_at=time.time(), **answer)
            )

    def release_request(self, key: str, claimed: float) -> None:
        """The request with ``key``, claimed at ``claimed``, was not served (nothing was charged):
        the key may be used again — unless another claim took it over meanwhile."""
        with self._tx() as c:
            c.execute(delete(ID).where(ID.c.key == key, ID.c.state == "in_progress", ID.c.created_at == claimed))

    def forget_requests(self, before: float) -> None:
        """Claims and answers dated before ``before`` (an answer by when it was given): their keys
        may be used again. ``before`` must be early enough that no call claimed then can still be
        running — a stream's answer is dated from its start — or a retry would find its key free,
        and pay again."""
        with self._tx() as c:
            c.execute(delete(ID).where(ID.c.created_at < before))

    # -- shared settings -------------------------------------------------------------------------

    def meta(self, key: str, default: Callable[[], str]) -> str:
        """A value every replica shares: the stored one, or ``default()`` stored by whoever comes first."""
        with self._tx() as c:
            got = c.execute(select(M.c.value).where(M.c.key == key)).first()
            if got is not None:
                return str(got[0])
            try:
                with c.begin_nested():
                    c.execute(insert(M).values(key=key, value=default()))
            except IntegrityError:
                pass
            return str(c.execute(select(M.c.value).where(M.c.key == key)).scalar_one())
