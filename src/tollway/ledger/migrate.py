"""Schema migrations of the ledger (alembic), run by ``Store`` when it opens a database.

``migrate(engine)`` upgrades the database to the newest revision, once: in one transaction under
a lock (PostgreSQL: ``pg_advisory_xact_lock``; SQLite: ``BEGIN IMMEDIATE``), so replicas that
start together never race, and an upgrade that fails leaves the database as it was. A database
already at the newest revision costs one query and takes no lock.

A database made by ``create_all`` before migrations existed (the tables, no ``alembic_version``)
is adopted: the baseline creates only what it lacks, and its existing tables are then checked
against the models (a missing column refuses to start, naming it).

The migrations are plain alembic scripts in ``migrations/versions``, shipped in the package; no
alembic.ini is needed. After changing ``models.py``, write the next migration with

    .venv/bin/python -m tollway.ledger.migrate revision "what changed"

It upgrades a scratch SQLite database to the newest revision and autogenerates what the models
add, as ``migrations/versions/NNNN_what_changed.py``. Read it before committing: autogenerate
takes a renamed column for a drop and an add, and a new NOT NULL column on a table with rows
needs a ``server_default`` or a data step. ``tests/integration/test_migrations.py`` fails while
the models and the migrations disagree, on SQLite and on PostgreSQL.

``python -m tollway.ledger.migrate upgrade URL`` upgrades a database without starting a gateway.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from . import models  # noqa: F401  (registers the tables on SQLModel.metadata)

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
LOCK_KEY = 0x746F6C6C776179  # "tollway": the PostgreSQL advisory lock that serialises upgrades
HOW_TO_ADD = 'write a migration: .venv/bin/python -m tollway.ledger.migrate revision "what changed"'


class SchemaMismatch(RuntimeError):
    """The database's tables lack what the models need (an old ``create_all`` ledger)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """alembic's configuration, built in code: the packaged scripts, run on ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head() -> str:
    """The newest revision."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the ledger's migrations have {len(heads)} heads {heads}: merge them (alembic merge)")
    return heads[0]


def current(conn: Connection) -> str | None:
    """The database's revision (None: never migrated)."""
    return MigrationContext.configure(conn).get_current_revision()


def schema_diff(conn: Connection) -> list[Any]:
    """What alembic's autogenerate finds between the database and the models (empty: they agree)."""
    return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata))


def _lock(conn: Connection) -> None:
    """Begin the upgrade's transaction holding the database's migration lock (until it ends)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock: a second writer waits (busy_timeout)


def _upgrade(conn: Connection) -> None:
    command.upgrade(alembic_config(conn), "head")


def migrate(engine: Engine) -> bool:
    """Upgrade the database to the newest revision; True when this call changed it."""
    target = head()
    with engine.connect() as conn:
        was = current(conn)
        conn.rollback()
        if was == target:
            return False
        _lock(conn)
        was = current(conn)
        if was == target:  # another replica upgraded it while we waited for the lock
            conn.rollback()
            return False
        adopted = was is None and bool(set(inspect(conn).get_table_names()) & set(SQLModel.metadata.tables))
        _upgrade(conn)
        if adopted:
            _check_adopted(conn)
        conn.commit()
    how = " (adopted a ledger made by create_all)" if adopted else ""
    log.info("ledger schema upgraded: %s -> %s%s", was or "empty", target, how)
    return True


def _check_adopted(conn: Connection) -> None:
    """An adopted ledger must have every column the models read (an older one may lack some)."""
    missing = [d for d in schema_diff(conn) if isinstance(d, tuple) and d[0] == "add_column"]
    if missing:
        cols = ", ".join(f"{d[2]}.{d[3].name}" for d in missing)
        raise SchemaMismatch(
            f"the ledger at {conn.engine.url.render_as_string(hide_password=True)} was made by an older tollway "
            f"(before migrations) and lacks {cols}: start from a new ledger, or add them by hand"
        )


def _revision(message: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{tmp}/scratch.sqlite3")
        try:
            migrate(engine)
            with engine.connect() as conn:
                if not schema_diff(conn):
                    print("the models and the migrations agree: nothing to write", file=sys.stderr)
                    return 1
                script = command.revision(
                    alembic_config(conn), message, autogenerate=True, rev_id=f"{int(head()) + 1:04d}"
                )
        finally:
            engine.dispose()
    path = getattr(script, "path", None)
    print(f"wrote {path}: read it, then run .venv/bin/python -m pytest -q tests/integration/test_migrations.py")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tollway.ledger.migrate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rev = sub.add_parser("revision", help="write the next migration from what the models add")
    rev.add_argument("message", help="what changed, e.g. 'calls.region'")
    up = sub.add_parser("upgrade", help="upgrade a database to the newest revision (Store does it when it opens one)")
    up.add_argument("url", help="a database URL, e.g. sqlite:///var/tollway.sqlite3")
    args = parser.parse_args(argv)
    if args.command == "revision":
        return _revision(args.message)
    from .store import make_engine

    engine = make_engine(args.url)
    try:
        print("upgraded" if migrate(engine) else "already at the newest revision", head())
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
