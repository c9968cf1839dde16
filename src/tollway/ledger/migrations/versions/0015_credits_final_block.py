"""credits.final_block: the block before which an account's credit may not leave on chain

A settlement is believed as soon as it is mined, and the credit its payment deposited can be spent
on calls at once; a withdrawal, though, pays it out on chain, where a reorganisation that undid the
settlement (its payer's tokens spent elsewhere meanwhile) would leave the payout standing. Each
settlement moves its payer's ``final_block`` to its block plus the chain's confirmations; a
withdrawal waits until the chain is there.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 07:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("credits", sa.Column("final_block", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("credits") as batch:
        batch.drop_column("final_block")
