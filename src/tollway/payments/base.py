"""The payment-scheme contract: what every scheme plugin implements, and the values it trades.

A scheme knows one way to pay (x402 ``exact`` with EIP-3009, ...). The wire codecs (x402 v1/v2)
and the request binding of quotes live outside it; the pipeline only ever calls these methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..ledger.channels import ChannelUse

if TYPE_CHECKING:
    from ..config import Settings
    from ..ledger.store import Store
    from .chain import Chain


@dataclass(frozen=True)
class Quote:
    """The price of one request: an upper bound on its cost, valid until ``expires``."""

    model: str
    amount: int  # atomic units of the asset
    request_digest: str  # sha-256 of the canonical request body
    expires: int  # UNIX seconds
    prompt_bound: int
    max_tokens: int  # output tokens per choice
    choices: int = 1  # completions generated (n / best_of)
    origin: str = ""  # the gateway it was made by (scheme://host[:port]); tollway's messages name it


@dataclass(frozen=True)
class Offer:
    """One way to pay an amount: a protocol-neutral ``accepts`` entry."""

    scheme: str
    network: str  # CAIP-2, e.g. eip155:31337
    asset: str
    pay_to: str
    amount: int
    max_timeout_seconds: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Proof:
    """A decoded payment header, before any check."""

    version: int  # x402 version it came in (1 or 2)
    scheme: str
    network: str
    payload: dict[str, Any]
    accepted: dict[str, Any] | None = None  # v2 echoes the offer it pays
    extensions: dict[str, Any] | None = None  # v2 payment extensions (e.g. eip2612GasSponsoring)
    rail: str = "x402"  # the wire codec it came by: x402, or mpp (HTTP Payment authentication)
    challenge: str | None = None  # mpp: the id of the challenge it answers


@dataclass(frozen=True)
class Verified:
    """A proof that pays ``amount`` to us — locally checked, not yet confirmed on chain."""

    scheme: str
    network: str
    asset: str
    payer: str
    payee: str
    amount: int  # what reaches the payee on chain (0 for credit)
    lock_key: str  # unique per payment; the ledger refuses to lock it twice
    proof: dict[str, Any]  # what the scheme needs later to confirm and settle
    chain_nonce: bytes = b""
    channel: ChannelUse | None = None  # a payment through a channel: what it asks of the channel


@dataclass(frozen=True)
class Context:
    """What a scheme is built from."""

    settings: Settings
    chain: Chain  # the request path's chain client
    chain_id: int
    settler: str  # the address that sends settlement transactions (and pays their gas)
    outbox: Outbox | None = None  # sends a transaction before a call is served (a channel's deposit)
    store: Store | None = None  # the ledger (channel state)


class Outbox(Protocol):
    async def send(self, purpose: str, to: str, data: bytes, *, timeout: float) -> str | None:
        """Queue a transaction from the settlement account and wait until it is mined: its hash
        if it succeeded, None if it reverted; raises ``ChainUnavailable`` after ``timeout``."""
        ...


class PaymentScheme(Protocol):
    name: str
    rails: tuple[str, ...]  # the wire codecs that carry it: x402, mpp
    network: str
    metered: bool  # pays the metered cost (priced at the metered output cap), not the bound
    prepaid: bool  # the money moved before the call (a transfer; credit moves none)
    # Its funds can move, or its authorization be cancelled, while the call runs: a call that ran
    # long is confirmed again before its answer leaves (not credit, a transfer, nor a channel's
    # voucher: the escrow holds its deposit past the withdrawal delay).
    lapses: bool

    def offer(self, amount: int) -> Offer:
        """The ``accepts`` entry to put in a 402 for this amount."""
        ...

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        """Check a proof pays ``offer`` for this request; raises ``PaymentInvalid`` with a reason.

        Cheap and local where the scheme allows (exact: signature only); what needs the chain
        belongs in ``confirm``, which runs once the payment is locked against replay.
        """
        ...

    async def confirm(self, payment: Verified, owed: int, *, recheck: bool = False) -> None:
        """Make sure the payment will settle, before the upstream is asked anything: raises
        ``PaymentInvalid`` if it cannot. ``owed`` is what the payer owes us that the chain's mined
        state may not show yet (this payment included), read from the ledger *before* the chain:
        a settlement mined in between is then counted twice (the safe side), never not at all.
        ``recheck``: a call served is checked again (only this payment's own settling matters:
        nothing the payer's other calls found)."""
        ...

    def settled_amount(self, payment: Verified, due: int) -> int:
        """What this payment moves (or moved) to the payee once the call owes ``due``: its whole
        amount for a payment of the bound, ``min(due, maximum)`` for a metered one."""
        ...

    def settlement_call(self, proof: dict[str, Any], amount: int) -> tuple[str, bytes] | None:
        """The transaction (to, calldata) that moves ``amount`` under the payment ``proof``
        (``Verified.proof``, also kept in the ledger), or None if nothing is to move."""
        ...

    def extensions(self) -> dict[str, Any]:
        """x402 extensions this scheme declares in a 402 (e.g. ``eip2612GasSponsoring``)."""
        ...

    def response_extra(self, channel: dict[str, Any] | None, charged: int | None) -> dict[str, Any] | None:
        """``extra`` of the settlement response of a call: ``channel`` is the channel its payment took
        (as it took it), ``charged`` what the call was charged so far (None: not metered yet)."""
        ...

    async def settled_elsewhere(self, payment: dict[str, Any]) -> str | None:
        """After our settlement of ``payment`` (a ledger row) reverted: the hash of another
        transaction that paid the payee with this very authorization (a front-run), if any."""
        ...
