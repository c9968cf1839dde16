"""The ledger's side of x402 ``batch-settlement`` channels: statements on the ``channels`` table.

A channel's replay lock is its charged total: a voucher is taken only if it builds on exactly
what the channel has been charged (``maxClaimableAmount == charged + amount``), and only by one
call at a time (``busy``), so a voucher used twice finds the total moved or the channel busy. Every
function runs inside the caller's transaction (a ``sql.Cursor``), so a channel moves together with
the payment and the call it belongs to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..pricing import MAX_AMOUNT
from . import sql

OPEN = (  # a deposit opens a channel the ledger does not know yet: at nothing
    "INSERT INTO channels (id, network, asset, payer, config, balance, charged, signed_max, signature, claimed,"
    " claim_to, refunded, refund_nonce, withdraw_at, busy, busy_until, created_at, updated_at)"
    " VALUES (:id, :network, :asset, :payer, :config, 0, 0, 0, '0x', 0, 0, 0, 0, 0, NULL, 0, :now, :now)"
    " ON CONFLICT (id) DO NOTHING"
)
# A hold that ran out frees its channel only once its call's payment is no longer reserved: a
# stream's charge may come later than the hold (a slow reader, a usage lookup after the fact), and a
# call or refund taking the channel meanwhile would leave that charge nowhere to go. (A call whose
# process died is given back by ``Gateway.give_back_abandoned_payments``, which frees it then.)
FREE_TO_TAKE = (
    "(busy IS NULL OR (busy_until < :now AND NOT EXISTS"
    " (SELECT 1 FROM payments p WHERE p.id = channels.busy AND p.state = 'reserved')))"
)
HELD_BY_CALL = "SELECT 1 FROM payments WHERE id = :holder AND state = 'reserved'"
TAKE = (  # the voucher builds on the charged total, the channel is free, the escrow (and a deposit) covers it
    "UPDATE channels SET busy = :payment, busy_until = :until, updated_at = :now"
    f" WHERE id = :id AND charged = :base AND {FREE_TO_TAKE} AND withdraw_at = 0"
    " AND balance >= :signed_max - :deposit"  # (not balance + deposit: two bigints may overflow it)
)
STATE = "SELECT * FROM channels WHERE id = :id"
RETURNING = " RETURNING *"  # (a take answers with the channel as taken)
CHARGE = (  # the call is metered: the channel is charged and freed, and keeps the voucher that covers it
    "UPDATE channels SET charged = charged + :amount, signed_max = :signed_max, signature = :signature,"
    " busy = NULL, updated_at = :now WHERE id = :id AND busy = :payment AND charged + :amount <= :signed_max"
)
FREE = (  # the call was not served: its channel (the payment's, by id: no channel is scanned) is free again
    "UPDATE channels SET busy = NULL, updated_at = :now"
    " WHERE id = (SELECT channel FROM payments WHERE id = :payment) AND busy = :payment"
)
DEPOSITED = (  # once mined; saturating (counting less than the escrow holds refuses vouchers, loses nothing)
    f"UPDATE channels SET balance = CASE WHEN balance > {MAX_AMOUNT} - :amount THEN {MAX_AMOUNT}"
    " ELSE balance + :amount END,"
    " updated_at = :now WHERE id = :id"
)
CLAIMABLE = (
    "SELECT id, config, charged, signed_max, signature, claimed, withdraw_at FROM channels"
    " WHERE network = :network AND asset = :asset AND charged > claimed AND claim_tx IS NULL"
    " ORDER BY withdraw_at DESC, charged - claimed DESC LIMIT :limit"
)
OWING = "SELECT config, withdraw_at, charged - claimed AS owed FROM channels WHERE charged > claimed"
WATCHED = (  # money in the escrow not claimed by us: charged, or not yet (a voucher may spend it)
    "SELECT id, claimed, withdraw_at FROM channels WHERE network = :network AND asset = :asset AND balance > claimed"
)
CLAIMING = "UPDATE channels SET claim_tx = :tx, claim_to = :to, updated_at = :now WHERE id = :id AND claim_tx IS NULL"
CLAIMED = (  # (a refund may have claimed more meanwhile: claims only ever raise the total)
    "UPDATE channels SET claimed = CASE WHEN claim_to > claimed THEN claim_to ELSE claimed END,"
    " claim_tx = NULL, updated_at = :now WHERE claim_tx = :tx"
)
UNCLAIMED = "UPDATE channels SET claim_tx = NULL, updated_at = :now WHERE claim_tx = :tx"
TAKE_FOR_REFUND = (  # the refund's voucher is at the charged total, and the channel is free
    "UPDATE channels SET busy = :holder, busy_until = :until, updated_at = :now"
    f" WHERE id = :id AND payer = :payer AND charged = :charged AND {FREE_TO_TAKE}"
)
# A refund, as its transaction is queued, holds its channel as ``refund:<the transaction's id>``
# with no end (``REFUND_IN_FLIGHT``) until its outcome is read from the escrow — by its request, or,
# if that request ended first (it stopped waiting, or its process stopped), by the claimer once the
# transaction is concluded (``Store.refunds_left``): until then the ledger's balance may be above
# the escrow's, and no voucher may be taken against it.
REFUND_HOLD = "refund:"
REFUND_IN_FLIGHT = 2.0**40  # busy_until: a time no hold reaches
REFUND_SENDING = (
    "UPDATE channels SET busy = :refund, busy_until = :flight, updated_at = :now WHERE id = :id AND busy = :holder"
)
REFUNDS_LEFT = (  # held for a refund whose transaction is concluded: (channel, its hold, how it ended)
    # (each held channel's transaction looked up by its id, the hold's tail: joined on the hold alone,
    # every concluded transaction the outbox ever had was read, and the channels scanned for each)
    "SELECT c.id, c.busy, t.state, t.mined_hash, t.tx_hash FROM channels c JOIN transactions t"
    " ON t.id = substr(c.busy, :start) AND c.busy = CAST(:prefix AS VARCHAR) || t.id"
    " WHERE c.busy_until >= :flight AND t.state IN ('mined', 'reverted')"
)
REFUNDS_LEFT_PARAMS = {"prefix": REFUND_HOLD, "start": len(REFUND_HOLD) + 1, "flight": REFUND_IN_FLIGHT}
REFUNDED = (  # the escrow's balance and claimed total, read once the refund was concluded (what left
    # the channel is what its ledger balance had above the escrow's)
    "UPDATE channels SET refunded = refunded + CASE WHEN balance > :balance THEN balance - :balance ELSE 0 END,"
    " refund_nonce = refund_nonce + :mined, balance = :balance,"
    " claimed = CASE WHEN :claimed > claimed THEN :claimed ELSE claimed END, busy = NULL, busy_until = 0,"
    " updated_at = :now WHERE id = :id AND busy = :holder"
)
FREE_HELD = "UPDATE channels SET busy = NULL, busy_until = 0, updated_at = :now WHERE id = :id AND busy = :holder"
WITHDRAWING = "UPDATE channels SET withdraw_at = :at, updated_at = :now WHERE id = :id AND withdraw_at = 0"


@dataclass(frozen=True)
class ChannelUse:
    """What a payment through a channel asks of it: to be taken for one call with a voucher of
    ``signed_max`` built on the charged total ``base`` — covered by the channel's balance plus
    ``deposit``, a deposit this payment makes (counted once it is mined: ``Store.deposit_mined``)."""

    id: str  # 0x channel id, lower-case
    config: str  # JSON ChannelConfig
    base: int
    signed_max: int
    signature: str  # 0x hex
    deposit: int = 0


class ChannelRefused(Exception):
    """The channel did not take the voucher: ``reason`` is one of ``not_found``, ``withdrawing``,
    ``mismatch`` (it builds on another total: ``state`` tells the client which), ``busy``,
    ``exceeds_balance``."""

    def __init__(self, reason: str, state: dict[str, Any] | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.state = state


def take(c: sql.Cursor, use: ChannelUse, payment_id: str, where: dict[str, str], hold_seconds: float) -> dict[str, Any]:
    """Take the channel for the call of ``payment_id`` (``where``: its network, asset, payer);
    returns the channel as taken. Raises ``ChannelRefused`` — which rolls the caller's whole
    transaction back, the payment's reservation with it."""
    now = time.time()
    if use.deposit:
        c.run(OPEN, {"id": use.id, "config": use.config, "now": now, **where})
    params = {
        "id": use.id,
        "payment": payment_id,
        "until": now + hold_seconds,
        "deposit": use.deposit,
        "now": now,
        "base": use.base,
        "signed_max": use.signed_max,
    }
    return _taken(c, c.dicts(TAKE + RETURNING, params), use.id, where["payer"], use.base, now)


def take_for_refund(
    c: sql.Cursor, channel_id: str, charged: int, holder: str, payer: str, hold_seconds: float
) -> dict[str, Any]:
    """Take the channel for a refund whose voucher is at ``charged``; as ``take``."""
    now = time.time()
    params = {
        "id": channel_id,
        "holder": holder,
        "until": now + hold_seconds,
        "now": now,
        "charged": charged,
        "payer": payer,
    }
    return _taken(c, c.dicts(TAKE_FOR_REFUND + RETURNING, params), channel_id, payer, charged, now, refund=True)


def _taken(
    c: sql.Cursor,
    took: list[dict[str, Any]],
    channel_id: str,
    payer: str,
    base: int,
    now: float,
    *,
    refund: bool = False,
) -> dict[str, Any]:
    """The channel as taken (the row the take returned); or why it could not be."""
    if took:
        return took[0]
    rows = c.dicts(STATE, {"id": channel_id})
    state = rows[0] if rows else None
    if state is None or state["payer"] != payer:
        raise ChannelRefused("not_found", None)
    if state["withdraw_at"] and not refund:
        raise ChannelRefused("withdrawing", state)
    if state["charged"] != base:
        raise ChannelRefused("mismatch", state)
    if state["busy"] is not None and (state["busy_until"] >= now or c.value(HELD_BY_CALL, {"holder": state["busy"]})):
        raise ChannelRefused("busy", state)
    raise ChannelRefused("exceeds_balance", state)


def charge(c: sql.Cursor, use: ChannelUse, payment_id: str, amount: int) -> bool:
    """Charge the channel ``amount`` for the call of ``payment_id`` and free it; False if that
    call no longer holds it (or the voucher would not cover the total)."""
    params = {
        "id": use.id,
        "payment": payment_id,
        "amount": amount,
        "signed_max": use.signed_max,
        "signature": use.signature,
        "now": time.time(),
    }
    return c.run(CHARGE, params) == 1


def free(c: sql.Cursor, payment_id: str) -> None:
    c.run(FREE, {"payment": payment_id, "now": time.time()})
