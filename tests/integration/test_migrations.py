"""The ledger's schema comes from alembic migrations: they build exactly the models' tables, replicas
starting together upgrade once, and a ledger made by ``create_all`` before migrations is adopted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import inspect, text

from tollway.ledger import Store
from tollway.ledger import migrate as migrations
from tollway.ledger.store import PAGE_SIZE, make_engine


@pytest.fixture
def fresh_pg(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the test PostgreSQL cluster."""
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return request.getfixturevalue("fresh_pg")


def test_migrations_build_exactly_the_models_tables(empty_db):
    engine = make_engine(empty_db)
    try:
        assert migrations.migrate(engine) is True
        with engine.connect() as conn:
            assert migrations.current(conn) == migrations.head()
            diff = migrations.schema_diff(conn)
        assert not diff, (
            f"ledger/models.py and ledger/migrations disagree ({engine.dialect.name}): {diff}\n"
            f"After changing the models, {migrations.HOW_TO_ADD}"
        )
        assert migrations.migrate(engine) is False  # at the newest revision: nothing to do
    finally:
        engine.dispose()


def test_stores_opened_together_migrate_once(empty_db, monkeypatch):
    upgrades: list[str] = []
    real_upgrade = migrations._upgrade

    def counting_upgrade(conn) -> None:
        upgrades.append(threading.current_thread().name)
        real_upgrade(conn)

    monkeypatch.setattr(migrations, "_upgrade", counting_upgrade)
    start = threading.Barrier(8)
    stores: list[Store] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        start.wait()
        try:
            stores.append(Store(empty_db))
        except BaseException as exc:  # every replica must start
            errors.append(exc)

    threads = [threading.Thread(target=open_store, name=f"replica-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert len(stores) == 8 and len(upgrades) == 1, upgrades
        with stores[0].engine.connect() as conn:
            assert migrations.current(conn) == migrations.head()
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            assert not migrations.schema_diff(conn)
    finally:
        for s in stores:
            s.close()


def made_before_migrations(engine) -> None:
    """The ledger every tollway before migrations made with ``create_all``: the baseline's schema,
    without alembic's table."""
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "0001")
        conn.execute(text("DROP TABLE alembic_version"))


def test_a_create_all_ledger_is_adopted_with_its_rows(empty_db):
    engine = make_engine(empty_db)
    made_before_migrations(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO meta (key, value) VALUES ('quote_secret', 'kept')"))
    engine.dispose()

    store = Store(empty_db)
    try:
        with store.engine.connect() as conn:
            assert migrations.current(conn) == migrations.head()
            assert conn.execute(text("SELECT value FROM meta WHERE key = 'quote_secret'")).scalar() == "kept"
            assert not migrations.schema_diff(conn)
        assert migrations.migrate(store.engine) is False
    finally:
        store.close()


def test_replicas_opening_a_new_sqlite_ledger_together_all_connect(tmp_path):
    """Switching a new SQLite file to WAL mode needs the file to itself, and SQLite answers a second
    connection trying it "database is locked" at once, without waiting: one of eight replicas
    opening a new ledger together failed that way about once in 25 tries. Every one must connect."""
    errors: list[BaseException] = []

    def connect(url: str, start: threading.Barrier) -> None:
        engine = make_engine(url)
        start.wait()
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA page_size").scalar() == PAGE_SIZE  # (a new ledger's)
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    for attempt in range(150):
        start = threading.Barrier(8)
        url = f"sqlite:///{tmp_path / f'ledger-{attempt}.sqlite3'}"
        threads = [threading.Thread(target=connect, args=(url, start)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, (attempt, errors)


def test_an_older_ledger_gets_the_tables_and_indexes_it_lacks(empty_db):
    engine = make_engine(empty_db)
    made_before_migrations(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE payouts"))
        conn.execute(text("DROP INDEX ix_payments_owed"))
    try:
        assert migrations.migrate(engine) is True
        with engine.connect() as conn:
            assert "payouts" in inspect(conn).get_table_names()
            assert not migrations.schema_diff(conn)
    finally:
        engine.dispose()


def test_an_older_ledger_missing_a_column_is_refused_and_left_as_it_was(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    engine = make_engine(url)
    made_before_migrations(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE calls DROP COLUMN upstream_cost"))
    engine.dispose()

    with pytest.raises(migrations.SchemaMismatch, match=r"lacks calls\.upstream_cost"):
        Store(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert migrations.current(conn) is None  # the upgrade was rolled back
            assert "alembic_version" not in inspect(conn).get_table_names()
    finally:
        engine.dispose()


def test_the_documented_revision_command_writes_the_next_migration(tmp_path):
    """``python -m tollway.ledger.migrate revision`` (module docstring) after a model change writes a
    migration that brings a ledger to the changed models; with no change it writes nothing."""
    agree = subprocess.run(
        [sys.executable, "-m", "tollway.ledger.migrate", "revision", "nothing"], capture_output=True, text=True
    )
    assert agree.returncode == 1 and "agree" in agree.stderr, agree.stderr

    scripts = tmp_path / "migrations"
    shutil.copytree(migrations.MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    program = textwrap.dedent(
        f"""
        import sqlalchemy as sa
        from tollway.ledger import migrate, models
        migrate.MIGRATIONS = __import__("pathlib").Path({str(scripts)!r})
        models.Call.__table__.append_column(sa.Column("region", sa.String(), nullable=True))
        assert migrate.main(["revision", "calls.region"]) == 0
        migrate.head.cache_clear()
        engine = sa.create_engine("sqlite:///{tmp_path / "next.sqlite3"}")
        assert migrate.migrate(engine)
        with engine.connect() as conn:
            assert migrate.current(conn) == migrate.head() == {f"{int(migrations.head()) + 1:04d}"!r}, migrate.head()
            assert migrate.schema_diff(conn) == [], migrate.schema_diff(conn)
        """
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    written = sorted(p.name for p in Path(scripts, "versions").glob("*.py"))
    new = f"{int(migrations.head()) + 1:04d}_calls_region.py"
    assert written[-1] == new and len(written) == int(migrations.head()) + 1, written
    assert "region" in Path(scripts, "versions", new).read_text()


def test_the_money_queries_find_their_partial_indexes(empty_db):
    """ix_payments_owed holds only payments in flight, ix_payments_tx_id only those with a
    transaction, ix_calls_streaming only streams not metered yet: a query uses such an index only if
    its own condition implies the index's (SQLite needs the very term), else it scans every payment
    ever made on each paid call (or, looking for streams a crash left open, every call)."""
    from tollway.ledger import store

    engine = make_engine(empty_db)
    try:
        migrations.migrate(engine)
        params = {"network": "n", "asset": "a", "payer": "p", "tx_id": "t", "before": 0, "limit": 1}
        params |= {"metering_before": 0, "state": "queued", "day": 0, "chunk": 1, "account": "a", "payment_id": "p"}
        queries = {
            store.OWED: "ix_payments_owed",
            store.UNCONFIRMED: "ix_payments_owed",
            "SELECT * FROM payments WHERE tx_id = :tx_id AND state = 'settling'": "ix_payments_tx_id",
            store.ABANDONED_STREAMS: "ix_calls_streaming",
            store.ABANDONED_PAYMENTS: "ix_payments_state",
            store.OPEN_TRANSACTIONS: "ix_transactions_open",  # (the settlement worker's, every pass)
            store.OPEN_DEPOSITS: "ix_transactions_open",
            store.FORGET_FREE_CALLS: "ix_free_calls_day",  # (housekeeping, every 10 s)
            store.HELD_FOR_PAYMENT: "ix_credit_entries_payment (account=? AND payment_id=?)",  # (crash clean-up)
            store.DEPOSITED: "ix_credit_entries_payment (account=? AND payment_id=?)",
        }
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SET enable_seqscan = off"))  # (an empty table: a scan would be cheapest)
                explain = "EXPLAIN"
            else:
                explain = "EXPLAIN QUERY PLAN"
            for query, index in queries.items():
                plan = " ".join(str(r) for r in conn.execute(text(f"{explain} {query}"), params))
                scans = (
                    "Seq Scan",
                    "SCAN payments",
                    "SCAN c",
                    "SCAN transactions",
                    "SCAN free_calls",
                    "SCAN h",
                    "SCAN r",
                )
                scans += ("(account=?)",)  # (a payer's whole journal)
                assert not any(scan in plan for scan in scans), (query, plan)
                if engine.dialect.name == "sqlite":  # (PostgreSQL's planner may pick another one it can use)
                    assert index in plan, (query, plan)
    finally:
        engine.dispose()


def sqlite_plan(tmp_path, query: str, params: dict) -> str:
    """SQLite's plan for ``query`` on a new, migrated ledger (the gateway never runs ANALYZE)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    try:
        migrations.migrate(engine)
        with engine.connect() as conn:
            return " ".join(str(r) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {query}"), params))
    finally:
        engine.dispose()


def test_a_claims_pass_looks_up_each_refunds_transaction_not_the_whole_outbox(tmp_path):
    """The channels held for a refund find their transaction by its id (the hold's tail): joined on
    the hold alone, SQLite read every mined or reverted transaction the outbox ever had (one per
    settlement), scanning the channels for each, on every pass of the claims worker. (PostgreSQL
    plans by its statistics: with an empty outbox it rightly reads it whole.)"""
    from tollway.ledger import channels

    plan = sqlite_plan(tmp_path, channels.REFUNDS_LEFT, channels.REFUNDS_LEFT_PARAMS)
    assert "SEARCH t USING INDEX sqlite_autoindex_transactions_1 (id=?)" in plan, plan
    assert "ix_transactions_open" not in plan and "SCAN t" not in plan, plan


def test_a_call_not_served_frees_its_channel_without_scanning_the_channels(tmp_path):
    """Every call not served (of any scheme) frees the channel its payment held: found through the
    payment, by id — the channels are never deleted, and a scan of them ran on each such call."""
    from tollway.ledger import channels

    plan = sqlite_plan(tmp_path, channels.FREE, {"payment": "p", "now": 0})
    assert "SCAN" not in plan, plan
    assert "SEARCH channels USING INDEX sqlite_autoindex_channels_1 (id=?)" in plan, plan
