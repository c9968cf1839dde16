"""Ledger tables. Amounts are integers in the asset's atomic units; times are UNIX seconds.

Payments (what reached us, per scheme) are separate from credit (what a wallet holds with us):
a call charges its metered cost against the payer's credit account, which its payment funded.
The journal (``credit_entries``) re-derives every balance:
deposits + reversals + refunds = charges + balance + withdrawals.

A payment moves through explicit states; ``store.py`` makes every move one guarded UPDATE:

    reserved ──► settling ──► settled
        │            └──────► failed     (reverted: its deposit is reversed, which may leave a debt)
        ├──► released ──► reserved   (an unserved authorization may pay a retry of its call)
        ├──► refused                 (the chain said it cannot settle, before anything was served)
        └──► settled                 (prepaid: the money moved before the call — transfer, credit)

Every transaction the gateway signs (settlements, payouts) is a row of the outbox
(``transactions``), numbered by the sender's nonce counter in the same database transaction that
creates it: replicas never share a nonce, a crash leaves no gap, and the worker broadcasts, bumps
fees and confirms every kind the same way.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import BigInteger, Column, Index, LargeBinary, UniqueConstraint, text
from sqlmodel import Field, SQLModel

# Partial indexes: a payment is in them only while a query can look for it there, so that the
# paid call's commits write fewer index pages. A query must name the condition itself to use one.
IN_FLIGHT = "state IN ('reserved', 'settling')"  # what a payer owes that the chain may not show yet
HAS_TX = "tx_id IS NOT NULL"  # a settlement in the outbox
# A stream not metered yet (what a crash may leave open): relayed, or waiting for its usage after the fact
OPEN_STREAM = "status IN ('streaming', 'metering')"


class PaymentState(StrEnum):
    RESERVED = "reserved"  # verified, nonce locked, call in progress
    RELEASED = "released"  # call not served: never settled, the payer owes nothing
    REFUSED = "refused"  # the chain said it cannot settle (funds, nonce, signature); never served
    SETTLING = "settling"  # settlement transaction signed (hash known), being broadcast/confirmed
    SETTLED = "settled"  # confirmed on chain
    FAILED = "failed"  # settlement reverted or cannot happen; see ``error``


class Payment(SQLModel, table=True):
    __tablename__ = "payments"
    __table_args__ = (
        Index(
            "ix_payments_owed",
            *("network", "asset", "payer", "state", "amount"),
            sqlite_where=text(IN_FLIGHT),
            postgresql_where=text(IN_FLIGHT),
        ),
        Index("ix_payments_tx_id", "tx_id", sqlite_where=text(HAS_TX), postgresql_where=text(HAS_TX)),
    )

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
    tx_id: str | None = None  # its settlement in the outbox
    tx_hash: str | None = None  # the transaction that moved (or will move) the money
    error: str | None = None
    channel: str | None = None  # the batch-settlement channel it pays through ...
    deposit: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))  # ... into
    created_at: float
    updated_at: float


class Call(SQLModel, table=True):
    __tablename__ = "calls"
    __table_args__ = (
        Index("ix_calls_streaming", "created_at", sqlite_where=text(OPEN_STREAM), postgresql_where=text(OPEN_STREAM)),
    )

    id: str = Field(primary_key=True)  # the receipt id
    payment_id: str | None = Field(default=None, index=True)
    model: str
    upstream_model: str
    api: str | None = None  # chat, messages, responses or embeddings (None: recorded before it was kept)
    upstream: str | None = None  # which upstream served it
    stream: bool
    byok: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})  # the payer's own key
    status: str  # pending | streaming | metering (its usage after the fact) | served | incomplete | failed
    quote: int = Field(sa_column=Column(BigInteger, nullable=False))
    prompt_bound: int | None = None  # the quote's bound on prompt tokens (a stream without usage is charged by it)
    events: int | None = None  # data events a stream delivered (saved as it goes: a crash leaves it to meter)
    alive_at: float | None = None  # a live stream's process says so, every few seconds (gateway.ALIVE_SECONDS)
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
    added_ms: float | None = None  # the gateway's own time before the answer's first byte (the rest)
    duration_ms: float | None = None
    error: str | None = None
    # Every upstream tried for the call, in order: [[upstream, outcome, ms], ...], the outcome
    # "served" or the error code of a failure before the first byte (see upstream/router.py).
    attempts: str | None = None
    created_at: float = Field(index=True)
    finished_at: float | None = Field(default=None, index=True)  # (live stats read calls as they finish)


class FreeCall(SQLModel, table=True):
    """Free-tier calls taken per identity (a keyed hash of a client address or wallet) and UTC day."""

    __tablename__ = "free_calls"
    __table_args__ = (Index("ix_free_calls_day", "day"),)  # (the sweep of past days; the key leads by identity)

    identity: str = Field(primary_key=True)
    day: int = Field(primary_key=True)
    calls: int


class SettlerNonce(SQLModel, table=True):
    """Next transaction nonce of each account the gateway sends from, shared by all replicas."""

    __tablename__ = "settler_nonces"

    address: str = Field(primary_key=True)
    next_nonce: int


class TxState(StrEnum):
    QUEUED = "queued"  # signed, not yet accepted by the node
    SENT = "sent"  # accepted by the node, waiting to be mined (fees bumped while it waits)
    MINED = "mined"  # mined and succeeded
    REVERTED = "reverted"  # mined and reverted
    REPLACED = "replaced"  # its nonce was used by a transaction we did not sign: re-queued as another row


class ChainTx(SQLModel, table=True):
    """The outbox: one row per (sender, nonce). Bumping its fees re-signs the same nonce; every
    hash it ever had is kept in ``hashes`` (any of them may be the one mined)."""

    __tablename__ = "transactions"
    # (no index on state alone: ix_transactions_open, led by state, serves every query by state)
    __table_args__ = (UniqueConstraint("sender", "nonce"), Index("ix_transactions_open", "state", "nonce"))

    id: str = Field(primary_key=True)
    purpose: str  # settlement | payout | claim | deposit | refund
    sender: str
    nonce: int
    to: str
    data: str  # 0x calldata
    gas: int
    max_fee: int = Field(sa_column=Column(BigInteger, nullable=False))  # wei per gas
    tip: int = Field(sa_column=Column(BigInteger, nullable=False))
    tx_hash: str  # the latest signature's hash
    raw_tx: str
    hashes: str  # every hash signed for this nonce, space-separated, oldest first
    state: str
    broadcast_at: float | None = None  # last sent to the node
    fee_at: float  # when its fees were last set (bumping waits from here)
    mined_hash: str | None = None
    error: str | None = None
    created_at: float
    updated_at: float


class Meta(SQLModel, table=True):
    """Settings that every replica must share (the quote secret, the chain the ledger belongs to)."""

    __tablename__ = "meta"

    key: str = Field(primary_key=True)
    value: str


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
    # the block the chain must reach before the credit may leave on chain: its latest settlement's
    # block plus the chain's confirmations (a reorganisation may yet undo a settlement less deep)
    final_block: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    updated_at: float


class CreditEntry(SQLModel, table=True):
    __tablename__ = "credit_entries"
    # (an account's journal, and within it a payment's entries: one index serves both)
    __table_args__ = (Index("ix_credit_entries_payment", "account", "payment_id"),)

    id: int | None = Field(default=None, primary_key=True)
    account: str
    kind: str
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))  # signed
    call_id: str | None = None
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
    tx_id: str | None = Field(default=None, index=True)  # its transfer in the outbox
    tx_hash: str | None = None
    error: str | None = None
    created_at: float
    updated_at: float


class Channel(SQLModel, table=True):
    """An x402 ``batch-settlement`` channel paying our payee: what the escrow holds for it (as far as
    we know: deposits we accepted count from the moment we did), the best voucher its payer signed,
    what we charged against it and what we claimed. ``busy`` is the payment whose call holds it:
    one call per channel at a time, across replicas."""

    __tablename__ = "channels"

    id: str = Field(primary_key=True)  # 0x channel id, lower-case
    network: str
    asset: str
    payer: str = Field(index=True)
    config: str  # JSON ChannelConfig, as a claim or refund sends it
    balance: int = Field(sa_column=Column(BigInteger, nullable=False))  # escrowed, our pending deposits included
    charged: int = Field(sa_column=Column(BigInteger, nullable=False))  # cumulative, by metered calls
    signed_max: int = Field(sa_column=Column(BigInteger, nullable=False))  # the best voucher's maxClaimableAmount
    signature: str  # ... and its signature
    claimed: int = Field(sa_column=Column(BigInteger, nullable=False))  # totalClaimed on chain
    claim_tx: str | None = Field(default=None, index=True)  # a claim in the outbox ...
    claim_to: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))  # ... up to this total
    refunded: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))  # returned to the payer
    refund_nonce: int = 0
    # withdrawRequestedAt on chain (0: none): the channel takes no more vouchers and is claimed now
    withdraw_at: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    busy: str | None = None
    busy_until: float = 0
    created_at: float
    updated_at: float


class Idempotent(SQLModel, table=True):
    """A request sent with an idempotency key (x402's ``payment-identifier``, or ``Idempotency-Key``):
    in progress, then its outcome — what a repeat with the same payload is answered with."""

    __tablename__ = "idempotent_requests"

    key: str = Field(primary_key=True)
    fingerprint: str  # sha-256 of the request body and its payment (or sign-in) header
    state: str  # in_progress | done
    status: int | None = None
    headers: str | None = None  # JSON: the answer's headers worth repeating
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))  # None: a receipt
    receipt_id: str | None = None
    created_at: float = Field(index=True)
