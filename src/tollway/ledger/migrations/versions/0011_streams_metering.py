"""calls: a stream waiting for its usage after the fact is ``metering`` (every replica's sweep of
streams a crash left open leaves it alone until its wait is over); ix_calls_streaming holds both

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 02:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

BEFORE = sa.text("status = 'streaming'")
AFTER = sa.text("status IN ('streaming', 'metering')")


def _index(where: sa.TextClause) -> None:
    op.drop_index("ix_calls_streaming", table_name="calls")
    op.create_index("ix_calls_streaming", "calls", ["created_at"], sqlite_where=where, postgresql_where=where)


def upgrade() -> None:
    _index(AFTER)


def downgrade() -> None:
    op.execute("UPDATE calls SET status = 'streaming' WHERE status = 'metering'")
    _index(BEFORE)
