"""free_calls: the free tier's calls per identity and UTC day

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:25:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "free_calls",
        sa.Column("identity", sa.String(), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("identity", "day"),
    )


def downgrade() -> None:
    op.drop_table("free_calls")
