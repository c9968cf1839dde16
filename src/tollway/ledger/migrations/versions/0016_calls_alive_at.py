"""calls.alive_at: a live stream's process says so, every few seconds

A sweep meters a stream left open past its limit by its estimate. Within the clock skew allowed
between replicas, a stream that only looks past its limit may be another replica's live one: it was
left alone while its events moved, and metered once two sweeps found them where they were — which a
live stream whose model paused for longer than a sweep also does. Its process now touches
``alive_at`` while it relays it, and a sweep meters it only once that stops moving too.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03 07:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("calls", sa.Column("alive_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("alive_at")
