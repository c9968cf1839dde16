"""Baseline: the ledger as ``SQLModel.metadata.create_all`` made it before migrations.

A database made by ``create_all`` (tables, no ``alembic_version``) is adopted rather than
refused: only the tables and indexes it lacks are created here, and ``tollway.ledger.migrate``
then checks the columns of the ones it had.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    have = set(inspector.get_table_names())

    def table(name: str, *columns: sa.Column | sa.Constraint, indexes: dict[str, list[str]]) -> None:
        if name not in have:
            op.create_table(name, *columns)
        present = {ix["name"] for ix in inspector.get_indexes(name)} if name in have else set()
        for ix, cols in indexes.items():
            if ix not in present:
                op.create_index(ix, name, cols)

    table(
        "payments",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("lock_key", sa.String(), nullable=False),
        sa.Column("scheme", sa.String(), nullable=False),
        sa.Column("network", sa.String(), nullable=False),
        sa.Column("asset", sa.String(), nullable=False),
        sa.Column("payer", sa.String(), nullable=False),
        sa.Column("payee", sa.String(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("proof", sa.String(), nullable=False),
        sa.Column("request_digest", sa.String(), nullable=False),
        sa.Column("tx_id", sa.String(), nullable=True),
        sa.Column("tx_hash", sa.String(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("lock_key"),
        indexes={
            "ix_payments_owed": ["network", "asset", "payer", "state", "amount"],
            "ix_payments_state": ["state"],
            "ix_payments_tx_id": ["tx_id"],
        },
    )
    table(
        "calls",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("payment_id", sa.String(), nullable=True),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("upstream_model", sa.String(), nullable=False),
        sa.Column("upstream", sa.String(), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("quote", sa.BigInteger(), nullable=False),
        sa.Column("paid", sa.BigInteger(), nullable=False),
        sa.Column("from_credit", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("cached_tokens", sa.Integer(), nullable=True),
        sa.Column("cache_write_tokens", sa.Integer(), nullable=True),
        sa.Column("expected_cached_tokens", sa.Integer(), nullable=True),
        sa.Column("cache_discount", sa.BigInteger(), nullable=True),
        sa.Column("upstream_cost", sa.String(), nullable=True),
        sa.Column("cost", sa.BigInteger(), nullable=True),
        sa.Column("credit_after", sa.BigInteger(), nullable=True),
        sa.Column("usage_dialect", sa.String(), nullable=True),
        sa.Column("upstream_latency_ms", sa.Float(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        indexes={
            "ix_calls_created_at": ["created_at"],
            "ix_calls_payment_id": ["payment_id"],
            "ix_calls_upstream": ["upstream"],
        },
    )
    table(
        "settler_nonces",
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("next_nonce", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("address"),
        indexes={},
    )
    table(
        "transactions",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("sender", sa.String(), nullable=False),
        sa.Column("nonce", sa.Integer(), nullable=False),
        sa.Column("to", sa.String(), nullable=False),
        sa.Column("data", sa.String(), nullable=False),
        sa.Column("gas", sa.Integer(), nullable=False),
        sa.Column("max_fee", sa.BigInteger(), nullable=False),
        sa.Column("tip", sa.BigInteger(), nullable=False),
        sa.Column("tx_hash", sa.String(), nullable=False),
        sa.Column("raw_tx", sa.String(), nullable=False),
        sa.Column("hashes", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("broadcast_at", sa.Float(), nullable=True),
        sa.Column("fee_at", sa.Float(), nullable=False),
        sa.Column("mined_hash", sa.String(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sender", "nonce"),
        indexes={"ix_transactions_open": ["state", "nonce"], "ix_transactions_state": ["state"]},
    )
    table(
        "meta",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
        indexes={},
    )
    table(
        "credits",
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("account"),
        indexes={},
    )
    table(
        "credit_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("call_id", sa.String(), nullable=True),
        sa.Column("payment_id", sa.String(), nullable=True),
        sa.Column("payout_id", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        indexes={"ix_credit_entries_account": ["account"], "ix_credit_entries_call_id": ["call_id"]},
    )
    table(
        "payouts",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("wallet", sa.String(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("request_nonce", sa.String(), nullable=False),
        sa.Column("tx_id", sa.String(), nullable=True),
        sa.Column("tx_hash", sa.String(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_nonce"),
        indexes={"ix_payouts_account": ["account"], "ix_payouts_state": ["state"], "ix_payouts_tx_id": ["tx_id"]},
    )


def downgrade() -> None:
    for name in ["payouts", "credit_entries", "credits", "meta", "transactions", "settler_nonces", "calls", "payments"]:
        op.drop_table(name)  # with its indexes
