"""transactions: ix_transactions_state goes — ix_transactions_open, on (state, nonce), serves every
query by state

Every settlement's row moves queued → sent → mined, and each move rewrote its entry in both indexes:
a page more written to SQLite's log (two system calls) on the request path and twice in the
settlement worker, and an index as large as the outbox, which grows without end, kept for nothing.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 13:20:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_transactions_state", table_name="transactions")


def downgrade() -> None:
    op.create_index("ix_transactions_state", "transactions", ["state"])
