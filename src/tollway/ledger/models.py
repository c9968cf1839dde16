"""Ledger tables. Amounts are integers in the asset's atomic units; times are UNIX seconds.

Payments (what reached us, per scheme) are separate from credit (what a wallet holds with us):
a call charges its metered cost against the payer's credit account, which its payment funded.
The journal (``credit_entries``) re-derives every balance:
deposits + reversals + refunds = charges + balance + withdrawals.

A payment moves through explicit states; ``store.py`` makes every move one guarded UPDATE:

    reserved ──► settling ──► settled
        │            └──────► failed
        ├──► released ──► reserved   (an unserved authorization may pay a retry of its call)
        └──► settled                 (prepaid: the money moved before the call — transfer, credit)
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import BigInteger, Column, Index
from sqlmodel import Field, SQLModel


class PaymentState(StrEnum):
    RESERVED = "reserved"  # verified, nonce locked, call in progress
    RELEASED = "released"  # call not served: never settled, the payer owes nothing
    SETTLING = "settling"  # settlement transaction signed (hash known), being broadcast/confirmed
    SETTLED = "settled"  # confirmed on chain
    FAILED = "failed"  # settlement reverted or cannot happen; see ``error``


class Payment(SQLModel, table=True):
    __tablename__ = "payments"
    __table_args__ = (Index("ix_payments_owed", "network", "asset", "payer", "state", "updated_at", "amount"),)

    id: str = Field(primary_key=True)
    lock_key: str = Field(unique=True)  # scheme-specific replay key, e.g. network:asset:payer:nonce
    scheme: str
    network: str
    asset: str
    payer: str
    payee: str
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: str = Field(index=True)
    proof: str  # the scheme's payload (JSON), enough to settle again
    request_digest: str  # the call this payment is bound to
    tx_hash: str | None = None
    raw_tx: str | None = None
    tx_nonce: int | None = None
    settler: str | None = None
    broadcast_at: float | None = None
    attempts: int = 0
    error: str | None = None
    created_at: float
    updated_at: float


class Call(SQLModel, table=True):
    __tablename__ = "calls"

    id: str = Field(primary_key=True)  # the receipt id
    payment_id: str | None = Field(default=None, index=True)
    model: str
    upstream_model: str
    upstream: str | None = Field(default=None, index=True)  # which upstream served it
    stream: bool
    status: str  # pending | served | incomplete | failed
    quote: int = Field(sa_column=Column(BigInteger, nullable=False))
    paid: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))  # by the payment, on chain
    from_credit: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))  # held from credit
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # None: the upstream did not say
    cache_write_tokens: int | None = None
    expected_cached_tokens: int | None = None  # what tollway expected the upstream to have cached
    cache_discount: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # passed on
    upstream_cost: str | None = None  # the upstream's own USD figure, as it stated it
    cost: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # metered, charged
    credit_after: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    usage_dialect: str | None = None
    upstream_latency_ms: float | None = None  # to the upstream's first byte
    duration_ms: float | None = None
    error: str | None = None
    created_at: float = Field(index=True)
    finished_at: float | None = None


class SettlerNonce(SQLModel, table=True):
    """Next transaction nonce of each settlement account, shared by all replicas."""

    __tablename__ = "settler_nonces"

    address: str = Field(primary_key=True)
    next_nonce: int


class EntryKind(StrEnum):
    DEPOSIT = "deposit"  # a payment's amount, when its call ends
    HOLD = "hold"  # credit set aside for a call in progress (negative) ...
    RELEASE = "release"  # ... and given back when it ends (positive)
    CHARGE = "charge"  # the call's metered cost (negative)
    WITHDRAWAL = "withdrawal"  # paid out on chain (negative)
    REFUND = "refund"  # a withdrawal whose payout failed (positive)
    REVERSAL = "reversal"  # a deposit whose settlement reverted on chain (negative; may leave a debt)


class Credit(SQLModel, table=True):
    """A wallet's balance with the gateway, per network and asset (atomic units). Negative only as
    a debt, after a settlement reverted; only credit whose payments are final can be spent."""

    __tablename__ = "credits"

    account: str = Field(primary_key=True)  # network|asset|wallet, lower-case
    balance: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    updated_at: float


class CreditEntry(SQLModel, table=True):
    __tablename__ = "credit_entries"

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(index=True)
    kind: str
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))  # signed
    call_id: str | None = Field(default=None, index=True)
    payment_id: str | None = None
    payout_id: str | None = None
    created_at: float


class Payout(SQLModel, table=True):
    """A withdrawal of credit, paid on chain by the payout worker."""

    __tablename__ = "payouts"

    id: str = Field(primary_key=True)
    account: str = Field(index=True)
    wallet: str
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: str = Field(index=True)  # pending | sending | sent | failed
    request_nonce: str = Field(unique=True)  # the signed request's nonce: one payout per signature
    tx_hash: str | None = None
    raw_tx: str | None = None
    tx_nonce: int | None = None
    error: str | None = None
    created_at: float
    updated_at: float
