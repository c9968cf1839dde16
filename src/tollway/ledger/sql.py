"""Plain SQL on the DB-API connection under SQLAlchemy's, for the statements money moves by.

A paid call runs a handful of statements; through SQLAlchemy Core each costs several times what
SQLite takes to run it (the whole ledger work of a call: ~1.2 ms against ~0.4 ms). These
statements are written once, in SQL that SQLite and PostgreSQL both speak, with ``:name``
parameters (sqlite3's own style; rewritten to ``%(name)s`` for psycopg, which then prepares
them server-side), and run on the same connection, so they share its transactions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_NAMED = re.compile(r"(?<![:\w]):(\w+)")


@functools.lru_cache(maxsize=256)  # (the statements are a few dozen; IN lists vary in length)
def _pyformat(sql: str) -> str:
    return _NAMED.sub(r"%(\1)s", sql)


class Dialect:
    """How one database takes parameters, and what its driver raises for a broken constraint."""

    def __init__(self, name: str, dbapi: Any) -> None:
        self.pyformat = name != "sqlite"
        self.one_writer = name == "sqlite"  # a write transaction excludes every other until it ends
        self.IntegrityError: type[Exception] = dbapi.IntegrityError
        self.Error: type[Exception] = dbapi.Error  # (what the driver raises, a dropped connection included)

    def text(self, sql: str) -> str:
        return _pyformat(sql) if self.pyformat else sql


class Cursor:
    """A DB-API cursor that takes ``:name`` SQL and answers in rows, values and dicts."""

    def __init__(self, dialect: Dialect, cursor: Any) -> None:
        self.dialect = dialect
        self.cursor = cursor

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Execute; the number of rows it changed."""
        self.cursor.execute(self.dialect.text(sql), params or {})
        return int(self.cursor.rowcount)

    def many(self, sql: str, params: Sequence[Mapping[str, Any]]) -> None:
        self.cursor.executemany(self.dialect.text(sql), params)

    def row(self, sql: str, params: Mapping[str, Any] | None = None) -> tuple[Any, ...] | None:
        self.cursor.execute(self.dialect.text(sql), params or {})
        got = self.cursor.fetchone()
        self.cursor.fetchall()  # (sqlite3 finishes a RETURNING statement only when it is read out)
        return got

    def value(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        got = self.row(sql, params)
        return None if got is None else got[0]

    def dicts(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        self.cursor.execute(self.dialect.text(sql), params or {})
        names = [d[0] for d in self.cursor.description]
        return [dict(zip(names, r, strict=True)) for r in self.cursor.fetchall()]


_inserts: dict[tuple[str, tuple[str, ...]], str] = {}
_updates: dict[tuple[str, tuple[str, ...], str], str] = {}


def insert(table: str, columns: Iterable[str]) -> str:
    """``INSERT INTO table (columns) VALUES (:columns)``, built once per column set."""
    key = (table, tuple(columns))
    got = _inserts.get(key)
    if got is None:
        names = ", ".join(f'"{c}"' for c in key[1])
        values = ", ".join(f":{c}" for c in key[1])
        got = _inserts[key] = f"INSERT INTO {table} ({names}) VALUES ({values})"
    return got


def update(table: str, columns: Iterable[str], where: str) -> str:
    """``UPDATE table SET column = :column, ... WHERE where``, built once per column set."""
    key = (table, tuple(columns), where)
    got = _updates.get(key)
    if got is None:
        sets = ", ".join(f'"{c}" = :{c}' for c in key[1])
        got = _updates[key] = f"UPDATE {table} SET {sets} WHERE {where}"
    return got


def placeholders(prefix: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """An IN list: ``(:p0, :p1, ...)`` and its parameters."""
    params = {f"{prefix}{i}": v for i, v in enumerate(values)}
    return "(" + ", ".join(f":{k}" for k in params) + ")", params
