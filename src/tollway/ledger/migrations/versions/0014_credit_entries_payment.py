"""credit_entries: ix_credit_entries_account (account) becomes ix_credit_entries_payment (account,
payment_id)

Giving back what a crashed process's call held read the payer's whole journal up to three times
(its holds, releases and deposit for one payment), while holding the ledger's write lock: ~150 ms
for a wallet of 156,000 entries, each payment. The wider index finds a payment's entries at once and
still serves every read by account alone; a posting writes one index, as before.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 14:40:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_credit_entries_payment", "credit_entries", ["account", "payment_id"])
    op.drop_index("ix_credit_entries_account", table_name="credit_entries")


def downgrade() -> None:
    op.create_index("ix_credit_entries_account", "credit_entries", ["account"])
    op.drop_index("ix_credit_entries_payment", table_name="credit_entries")
