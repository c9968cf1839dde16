"""indexes a paid call's commits no longer write: the unused calls.upstream and credit_entries.call_id
go; payments.tx_id holds only payments with a settlement in the outbox, and ix_payments_owed only
payments in flight (reserved, settling)

Each index costs a page written to SQLite's log on every commit that touches its table (~29 pages a
credit call over its two commits, each page two system calls). These were ~6 of them: lookups no
query makes (calls by upstream, journal entries by call), rows no query looks for there (payments
without a transaction: credit, vouchers, transfers, every payment before it settles; payments
settled), and a settled payment's entry moved within ix_payments_owed rather than only removed.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 19:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

HAS_TX = sa.text("tx_id IS NOT NULL")
IN_FLIGHT = sa.text("state IN ('reserved', 'settling')")
OWED = ["network", "asset", "payer", "state", "amount"]


def upgrade() -> None:
    op.drop_index("ix_calls_upstream", table_name="calls")
    op.drop_index("ix_credit_entries_call_id", table_name="credit_entries")
    op.drop_index("ix_payments_tx_id", table_name="payments")
    op.create_index("ix_payments_tx_id", "payments", ["tx_id"], sqlite_where=HAS_TX, postgresql_where=HAS_TX)
    op.drop_index("ix_payments_owed", table_name="payments")
    op.create_index("ix_payments_owed", "payments", OWED, sqlite_where=IN_FLIGHT, postgresql_where=IN_FLIGHT)


def downgrade() -> None:
    op.drop_index("ix_payments_owed", table_name="payments")
    op.create_index("ix_payments_owed", "payments", OWED)
    op.drop_index("ix_payments_tx_id", table_name="payments")
    op.create_index("ix_payments_tx_id", "payments", ["tx_id"])
    op.create_index("ix_credit_entries_call_id", "credit_entries", ["call_id"])
    op.create_index("ix_calls_upstream", "calls", ["upstream"])
