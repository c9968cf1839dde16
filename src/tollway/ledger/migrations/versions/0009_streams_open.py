"""ix_calls_streaming: the streams not metered yet, by when they began — what the housekeeping
pass looks for every 10 s (streams a crash left open). Without it that query read the index of
every call's start (~0.2 s at a million calls, on the event loop).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 00:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

STREAMING = sa.text("status = 'streaming'")


def upgrade() -> None:
    op.create_index("ix_calls_streaming", "calls", ["created_at"], sqlite_where=STREAMING, postgresql_where=STREAMING)


def downgrade() -> None:
    op.drop_index("ix_calls_streaming", table_name="calls")
