"""alembic's environment for the ledger: always run on a connection handed in by ``tollway.ledger.migrate``
(``config.attributes["connection"]``), never from an alembic.ini or a URL of its own."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from tollway.ledger import models  # noqa: F401  (registers the tables on SQLModel.metadata)


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render SQLModel's ``AutoString`` as a plain ``sa.String``: a migration must not depend on the models' types."""
    if kind == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


connection: sa.Connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters a table by copying it
    render_item=render_item,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
