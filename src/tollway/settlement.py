"""Settlement: sign on the request path, broadcast and confirm in a durable background worker.

Every transaction the gateway signs — a payment's settlement, a payout of withdrawn credit — is a
row of the ledger's outbox, numbered with its sender's next nonce in the same database
transaction that creates it (one counter per sender, shared by all replicas: no two rows share a
nonce and a crash leaves no gap). ``Settler.sign`` runs inside the request, so the settlement's
hash is known before it is sent and the response carries it.

The worker, in each process, is scheme-agnostic and loops over the outbox:
- it broadcasts queued rows in one batch (idempotent: the same bytes have the same hash);
- it polls the receipts of every hash a sent row ever had, and concludes mined rows through the
  row's purpose (a settlement moves its payment, a payout its withdrawals);
- it re-broadcasts a row the node seems to have dropped, and **bumps its fees** when it waits too
  long (same nonce, +25%, up to ``fee_ceiling``), so one under-priced transaction never stalls
  the ones behind it;
- a row whose nonce was taken by a transaction we did not sign is re-queued with a new nonce —
  keeping every hash the row had, one of which may yet turn out mined (a node answering receipts
  late) — unless it is a payout: a token transfer has no replay guard on chain, so signing it
  anew after a late receipt would pay twice; it is left for the operator, logged as an error;
- a revert is believed once ``confirmations`` blocks are on top of it (a stream it pays is cut at
  once): a reorganisation may mine the transaction again, and it may pay then;
- a settlement that reverted because its authorization was already used — someone front-ran our
  transaction, and the payee was paid by theirs — is settled, not failed: ``settled_elsewhere``
  (from the payment's scheme) finds the transaction that paid.

Streams whose settlement fails are told (``watch``), so they can be cut within a block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from functools import partial
from typing import Any

from coincurve import PrivateKey
from eth_account import Account
from rlp.codec import encode_raw

from .bounded import Recently
from .errors import ChainUnavailable
from .keccak import keccak
from .ledger import Store
from .ledger.channels import ChannelUse
from .ledger.models import PaymentState, TxState
from .ledger.store import Settlement
from .payments.chain import Chain, RpcError, quantity, receipt_status, transfers_in
from .payments.channel import deposit_of

log = logging.getLogger("tollway.settlement")

PASS_INTERVAL = 0.05  # seconds between worker passes while transactions are pending
RECEIPT_POLL = 0.25  # seconds between receipt polls while transactions are pending
IDLE_POLL = 2.0  # seconds between passes when nothing is pending (a wake-up comes sooner)
STRANDED_EVERY = 30.0  # seconds between looks for settlements mined but never judged (see ``_judge_stranded``)
REBROADCAST_AFTER = 15.0  # seconds without a receipt before sending the raw transaction again
BUMP_AFTER = 10.0  # seconds a transaction may wait at its fees before they are raised
# Seconds a transaction's nonce must have been seen taken, with no receipt of any of its own
# signatures, before it is signed anew with another: a node behind a load balancer may answer a
# receipt late, and signing anew a transaction that was mined after all would pay twice.
REPLACE_AFTER = 15.0
BUMP = Decimal("1.25")  # each bump: +25% (nodes replace a pending transaction at +10%)
PAYOUT_GAS = 100_000
GWEI = 10**9

SettledElsewhere = Callable[[dict[str, Any]], Awaitable[str | None]]


class Settler:
    def __init__(
        self,
        store: Store,
        chain: Chain,
        *,
        key: str,
        chain_id: int,
        gas_limit: int,
        max_fee_gwei: Decimal | None,
        priority_fee_gwei: Decimal,
        fee_ceiling_gwei: Decimal = Decimal(100),
        payout_key: str | None = None,
        token: str | None = None,
        settled_elsewhere: SettledElsewhere | None = None,
        confirmations: int = 0,
    ) -> None:
        self.store = store
        self.chain = chain
        self.account = Account.from_key(key)
        self.address = self.account.address
        self.payout_account = Account.from_key(payout_key) if payout_key else None
        self._keys = {a.address: PrivateKey(bytes(a.key)) for a in (self.account, self.payout_account) if a}
        self.token = token
        self.chain_id = chain_id
        self.gas_limit = gas_limit
        self.ceiling = int(fee_ceiling_gwei * GWEI)
        self.fixed_max_fee = int(max_fee_gwei * GWEI) if max_fee_gwei is not None else None
        self.tip = min(int(priority_fee_gwei * GWEI), self.ceiling)
        self.max_fee = min(self.fixed_max_fee or 2 * GWEI, self.ceiling)
        self.bump_after = BUMP_AFTER
        self.replace_after = REPLACE_AFTER
        # transaction id → when its nonce was first seen taken, and last looked at (monotonic)
        self._taken: dict[str, tuple[float, float]] = {}
        self._left: set[str] = set()  # payouts whose nonce was taken, left for the operator (logged once)
        self._told = Recently(60)  # what the operator was told moments ago (not again each pass)
        self.settled_elsewhere = settled_elsewhere
        # Blocks on top of a revert's own before it is believed: a reorganisation may mine the same
        # transaction again with another outcome (a success believed at once that a reorganisation
        # drops goes back to the pool, and is mined again: the same bytes, our nonce).
        self.confirmations = confirmations
        self._reverted: set[str] = set()  # transactions mined reverted, not yet that deep (at the last poll)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._polled = 0.0  # when receipts were last polled (monotonic)
        self._polled_head: int | None = None  # the chain's head block then
        self._swept = float("-inf")  # when stranded settlements were last looked for (monotonic)
        self._busy = False  # transactions were open at the last poll
        self._watchers: dict[str, Callable[[str], None]] = {}
        self.last_error: str | None = None

    # -- request path -----------------------------------------------------------------------

    def settlement(
        self, amount: int | None, call: tuple[str, bytes] | None, channel: ChannelUse | None = None
    ) -> Settlement:
        """How a payment that moves ``amount`` settles: its transaction ``call`` (to, calldata),
        signed once the ledger gives it a nonce — or, with no call, as it stands — and, through a
        ``channel``, the channel charged ``amount``. For ``Store.insert_call``/``finish_call(settle=...)``;
        ``wake()`` the worker once committed."""
        if call is None:
            return Settlement(amount, channel=channel)
        return Settlement(amount, self.address, Signing(self, *call), channel)

    def sign(self, payment_id: str, to: str, data: bytes, amount: int | None = None) -> str:
        """Queue the settlement transaction of a reserved payment on its own; returns its hash."""
        signing = Signing(self, to, data)
        if self.store.sign_settlement(payment_id, self.address, signing, amount) is None:
            raise RuntimeError(f"payment {payment_id} was not in the reserved state")
        self.wake()
        return signing.tx_hash

    async def send(self, purpose: str, to: str, data: bytes, *, timeout: float) -> str | None:
        """Queue a transaction of ours and wait until the worker sees it mined: its hash, or None
        if it reverted. Raises ``ChainUnavailable`` after ``timeout`` (it may still be mined)."""
        return await self.mined(self.store.queue_transaction(purpose, self.address, Signing(self, to, data)), timeout)

    async def mined(self, row: dict[str, Any], timeout: float) -> str | None:
        """Wait until the worker sees the queued transaction ``row`` mined: as ``send``."""
        tx = await self.concluded(row, timeout)
        return str(tx["mined_hash"]) if tx["state"] == TxState.MINED else None

    async def concluded(self, row: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The outbox row of the queued transaction ``row`` once the worker sees it mined or
        reverted — or of the one that replaced it, signed anew with another nonce (see the module's
        docstring). Raises ``ChainUnavailable`` after ``timeout`` (it may still be mined)."""
        self.wake()
        deadline = time.monotonic() + timeout
        tx_id = row["id"]
        while time.monotonic() < deadline:
            await asyncio.sleep(RECEIPT_POLL / 2)
            tx = self.store.transaction(tx_id)
            if tx is not None and tx["state"] == TxState.REPLACED:
                tx = self.store.successor(tx) or tx
                tx_id = tx["id"]
            if tx is not None and tx["state"] in (TxState.MINED, TxState.REVERTED):
                return tx
        raise ChainUnavailable(
            f"the {row['purpose']} transaction {row['tx_hash']} was not mined within {timeout:.0f} s"
        )

    def wake(self) -> None:
        """Something was queued: broadcast it at the next pass (no waiting for the idle poll)."""
        self._wake.set()

    def watch(self, payment_id: str, on_failure: Callable[[str], None]) -> None:
        """Call ``on_failure(reason)`` if this payment's settlement fails (a stream cuts itself)."""
        self._watchers[payment_id] = on_failure

    def unwatch(self, payment_id: str) -> None:
        self._watchers.pop(payment_id, None)

    def _signed(
        self,
        sender: str,
        nonce: int,
        to: str,
        data: bytes,
        gas: int,
        max_fee: int | None = None,
        tip: int | None = None,
    ) -> dict[str, Any]:
        """The outbox columns of a signed EIP-1559 transaction."""
        tip = self.tip if tip is None else tip
        max_fee = max(self.max_fee if max_fee is None else max_fee, tip)
        fields = [self.chain_id, nonce, tip, max_fee, gas, bytes.fromhex(to[2:]), 0, data, []]
        tx_hash, raw = sign_eip1559(self._keys[sender], fields)
        return {
            "to": to,
            "data": "0x" + data.hex(),
            "gas": gas,
            "max_fee": max_fee,
            "tip": tip,
            "tx_hash": tx_hash,
            "raw_tx": raw,
        }

    # -- worker -------------------------------------------------------------------------------

    async def start(self) -> None:
        for account in {self.address, *([self.payout_account.address] if self.payout_account else [])}:
            # (a nonce an outside transaction holds in the pool is taken over by ours, or ours is
            # signed anew once it is mined: see the module's docstring; never a gap that stalls the rest)
            self.store.sync_settler_nonce(account, await self.chain.mined_nonce(account))
        await self._refresh_fees()
        self._task = asyncio.create_task(self._run(), name="tollway-settler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _refresh_fees(self) -> None:
        if self.fixed_max_fee is None:
            self.max_fee = min(2 * await self.chain.base_fee() + self.tip, self.ceiling)

    async def _run(self) -> None:
        last_fees = time.monotonic()
        busy = True  # look for work left by an earlier run straight away
        while True:
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=IDLE_POLL)
            # Let transactions gather, so that one pass broadcasts and polls them together, off
            # the requests' critical path.
            await asyncio.sleep(PASS_INTERVAL)
            self._wake.clear()
            try:
                busy = await self.run_once()
                if time.monotonic() - last_fees > 5:
                    await self._refresh_fees()
                    last_fees = time.monotonic()
                self.last_error = None
            except (ChainUnavailable, RpcError) as exc:
                self.last_error = str(exc)
                log.warning("settlement worker: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:  # the worker must outlive any one bad row
                log.exception("settlement worker iteration failed")
                await asyncio.sleep(1.0)

    async def run_once(self) -> bool:
        """One pass over the outbox. Returns True while transactions remain open.

        Queued transactions are broadcast every pass; receipts are polled (and stuck transactions
        re-broadcast or bumped) every ``RECEIPT_POLL`` seconds — blocks come no faster, and a pass
        must stay cheap."""
        await self._queue_payouts()
        queued = self.store.open_transactions(TxState.QUEUED)
        await self._broadcast(queued)
        if time.monotonic() - self._polled < RECEIPT_POLL:
            return bool(queued) or self._busy
        self._polled = time.monotonic()
        sent = self.store.open_transactions(TxState.SENT)
        await self._poll(sent)
        await self._check_watched()
        if time.monotonic() - self._swept > STRANDED_EVERY:
            self._swept = time.monotonic()
            await self._judge_stranded()
        self._busy = bool(sent or queued)
        return self._busy

    async def _broadcast(self, rows: list[dict[str, Any]], *, resend: bool = False) -> None:
        """Send rows to the node in one batch and record its answers (a row whose nonce was seen
        taken, at most every ``RECEIPT_POLL``: see ``_nonce_used``)."""
        now = time.monotonic()
        rows = [r for r in rows if now - self._taken.get(r["id"], (0.0, -math.inf))[1] >= RECEIPT_POLL]
        if not rows:
            return
        answers = await self.chain.batch([("eth_sendRawTransaction", [r["raw_tx"]]) for r in rows], errors=True)
        sent, errors, underpriced = [], {}, []
        for row, answer in zip(rows, answers, strict=True):
            msg = answer.message.lower() if isinstance(answer, RpcError) else ""
            if not isinstance(answer, RpcError) or "already known" in msg or "already imported" in msg:
                sent.append(row["id"])
                self._taken.pop(row["id"], None)  # (a "nonce too low" seen before no longer counts)
            elif "nonce too low" in msg or "nonce has already been used" in msg:
                await self._nonce_used(row)
            elif "fee" in msg or "underpriced" in msg:  # below the base fee, or the one it replaces
                underpriced.append(row)
            elif not resend:
                if ("broadcast", row["id"]) not in self._told:  # (a lasting refusal: told once a minute)
                    self._told.add(("broadcast", row["id"]))
                    log.warning("broadcast of %s (%s) failed: %s", row["tx_hash"], row["purpose"], answer.message)
                errors[row["id"]] = answer.message
        self.store.transactions_sent(sent, errors)
        if underpriced:
            await self._refresh_fees()
            await self._bump(underpriced)

    async def _nonce_used(self, row: dict[str, Any]) -> None:
        """The node says the row's nonce is used: by one of its own signatures (conclude it), or by a
        transaction we did not sign (queue the call again with a new nonce, once no receipt of its
        own has come for ``replace_after`` seconds)."""
        receipts = await self._receipts([row])
        now = time.monotonic()
        first = self._taken.get(row["id"], (now, now))[0]
        if receipts[0] is not None:
            head = await self.chain.head()
            if self._believed(receipts[0][1], receipts[0][0], head):
                self._taken.pop(row["id"], None)
                await self._conclude([(row, *receipts[0])], head)
            else:  # (a revert not that deep yet: looked at again as it is sent again, no sooner)
                self._taken[row["id"]] = (first, now)
            return
        if len(self._taken) > 10_000:  # (rows concluded otherwise leave theirs: only a delay is lost)
            self._taken.clear()
        payout = row["purpose"] == "payout"  # (no replay guard on chain: see the module's docstring)
        if now - first < self.replace_after or payout:
            self._taken[row["id"]] = (first, now)  # (looked at again as it is sent again)
            if now - first >= self.replace_after and row["id"] not in self._left:
                self._left.add(row["id"])
                log.error(
                    "payout transaction %s (nonce %d of %s): the node says its nonce is used, and no receipt of "
                    "its own came in %.0f s. It is not signed anew (a transfer mined after all would be paid "
                    "twice): check the chain; it stays open until its receipt comes",
                    row["tx_hash"],
                    row["nonce"],
                    row["sender"],
                    now - first,
                )
            return
        del self._taken[row["id"]]
        if row["sender"] not in self._keys:
            log.error("%s transaction %s: no key of %s to sign it anew", row["purpose"], row["id"], row["sender"])
            return
        new = self.store.replace_transaction(
            row["id"],
            row["hashes"],  # (only if none was added since: one of those might be the one mined)
            lambda nonce: self._signed(row["sender"], nonce, row["to"], bytes.fromhex(row["data"][2:]), row["gas"]),
        )
        if new is not None:
            log.warning(
                "%s transaction %s re-signed as %s: its nonce was taken", row["purpose"], row["id"], new["tx_hash"]
            )

    async def _receipts(self, rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]] | None]:
        """For each row, (hash, receipt) of whichever of its signatures was mined, if any."""
        calls = [(row, h) for row in rows for h in row["hashes"].split()]
        if not calls:
            return []
        answers = await self.chain.batch([("eth_getTransactionReceipt", [h]) for _, h in calls])
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for (row, h), receipt in zip(calls, answers, strict=True):
            status = receipt_status(receipt, h)
            if status is not None and (row["id"] not in found or status == 1):  # (a success over a revert)
                found[row["id"]] = (h, receipt)
        return [found.get(row["id"]) for row in rows]

    def _believed(self, receipt: dict[str, Any], tx_hash: str, head: int) -> bool:
        """A success at once; a revert once ``confirmations`` blocks are on top of its own."""
        if self.confirmations == 0 or receipt_status(receipt, tx_hash) == 1:
            return True
        try:
            return head - int(receipt["blockNumber"], 16) >= self.confirmations
        except (KeyError, TypeError, ValueError):
            return False

    async def _cut_unpaid(self, tx_ids: set[str]) -> None:
        """Settlements just mined reverted (not believed yet): the streams they pay stop now — unless
        someone else's transaction paid (a front-run authorization: the payee has the money)."""
        if not self._watchers or not tx_ids:
            return
        for payment in self.store.settled_by(list(tx_ids)):
            if payment["id"] not in self._watchers:
                continue
            try:
                if self.settled_elsewhere is not None and await self.settled_elsewhere(payment) is not None:
                    continue
            except ChainUnavailable:
                pass  # (cannot tell: cut, as a revert says)
            self._fire(payment["id"], "settlement reverted")

    async def _poll(self, rows: list[dict[str, Any]]) -> None:
        """Conclude the rows that were mined; bump or re-send those waiting too long. Receipts are
        asked for only when the chain has a new block since the last time: on a 12 s chain with
        a poll every 0.25 s, every open transaction would otherwise be asked after ~48 times."""
        if not rows:
            return
        head = await self.chain.head()
        asked = head != self._polled_head
        receipts = await self._receipts(rows) if asked else [None] * len(rows)
        mined = [(row, *m) for row, m in zip(rows, receipts, strict=True) if m is not None]
        believed = [m for m in mined if self._believed(m[2], m[1], head)]
        await self._conclude(believed, head)
        self._polled_head = head  # (only once concluded: a failed conclusion asks again at the next poll)
        if asked:
            reverted = {m[0]["id"] for m in mined} - {m[0]["id"] for m in believed}
            await self._cut_unpaid(reverted - self._reverted)
            self._reverted = reverted
        now = time.time()
        # (a revert not yet deep enough to believe waits as it is: neither bumped nor sent again)
        waiting = [row for row, m in zip(rows, receipts, strict=True) if m is None and row["id"] not in self._reverted]
        await self._bump([r for r in waiting if now - r["fee_at"] > self.bump_after])
        stale = [r for r in waiting if now - (r["broadcast_at"] or 0) > REBROADCAST_AFTER]
        await self._broadcast(stale, resend=True)

    async def _bump(self, rows: list[dict[str, Any]]) -> None:
        """Raise the fees of transactions that waited too long (same nonce), up to the ceiling."""
        bumped = []
        for row in rows:
            max_fee = min(max(int(row["max_fee"] * BUMP) + 1, self.max_fee), self.ceiling)
            tip = min(max(int(row["tip"] * BUMP) + 1, self.tip), max_fee)
            if max_fee <= row["max_fee"] or tip <= row["tip"]:
                continue  # at the ceiling: it waits there
            if row["sender"] not in self._keys:  # (a key no longer configured: nothing else may wait on it)
                log.error("%s transaction %s: no key of %s to bump its fees", row["purpose"], row["id"], row["sender"])
                continue
            signed = self._signed(
                row["sender"], row["nonce"], row["to"], bytes.fromhex(row["data"][2:]), row["gas"], max_fee, tip
            )
            if self.store.bump_transaction(row["id"], row["tx_hash"], signed):
                log.warning(
                    "%s transaction %s: fees bumped to %d wei/gas (%s)",
                    row["purpose"],
                    row["id"],
                    max_fee,
                    signed["tx_hash"],
                )
                bumped.append({**row, **signed})
        await self._broadcast(bumped, resend=True)

    async def _conclude(self, mined: list[tuple[dict[str, Any], str, dict[str, Any]]], head: int) -> None:
        """Conclude mined rows, each (row, the hash mined, its receipt; ``head`` is the chain's as
        the receipts were read): the settlements together, in one ledger transaction; the rest each
        through its purpose, in nonce order (a refund's escrow read counts the deposits before it:
        they must be counted first)."""
        settlements = []
        for row, tx_hash, receipt in mined:
            ok = receipt_status(receipt, tx_hash) == 1
            if row["purpose"] == "settlement":
                settlements.append((row, tx_hash, receipt, ok))
            else:
                self._conclude_one(row, tx_hash, ok)
        if not settlements:
            return
        concluded = self.store.settlements_mined(
            [
                (row["id"], h, ok, partial(paid_in, receipt), self._final(receipt, head))
                for row, h, receipt, ok in settlements
            ]
        )
        for (_, tx_hash, _, ok), (payment, settled) in zip(settlements, concluded, strict=True):
            if settled:
                log.info(
                    "settled payment %s of %d by %s in %s", payment["id"], payment["amount"], payment["payer"], tx_hash
                )
            elif payment is not None:
                await self._failed_settlement(payment, tx_hash, ok)

    def _final(self, receipt: dict[str, Any], head: int) -> int:
        """The block from which what a settlement mined in ``receipt``'s block paid is final: a
        reorganisation less deep may undo it (credit it deposited does not leave on chain before).
        Its block is taken for no later than ``head``, the chain's as its receipt was read (a block
        number a node got wrong holds no wallet's credit for ever, nor stops a conclusion)."""
        try:
            block = min(quantity(receipt.get("blockNumber")), head)
        except ChainUnavailable:
            block = head
        return block + self.confirmations

    def _conclude_one(self, row: dict[str, Any], tx_hash: str, ok: bool) -> None:
        """Conclude a mined transaction that settles no payment, with what it did in the ledger."""
        if row["purpose"] == "payout":
            self.store.payouts_mined(row["id"], tx_hash, ok, "" if ok else "payout transaction reverted")
        elif row["purpose"] == "claim":
            if self.store.claim_mined(row["id"], tx_hash, ok) and not ok:
                log.error("claim %s reverted: its channels will be claimed again", tx_hash)
        elif row["purpose"] == "deposit":  # (counted here, not by the request that sent it: it may stop waiting)
            self.store.deposit_mined(row["id"], tx_hash, ok, *deposit_of(bytes.fromhex(row["data"][2:]), self.chain_id))
        else:  # a refund: its sender waits for it (``send``), then reads the escrow
            self.store.transaction_mined(row["id"], tx_hash, ok)

    async def _failed_settlement(self, payment: dict[str, Any], tx_hash: str, ok: bool) -> None:
        """A settlement was mined without paying: paid by someone else's transaction first, or
        failed. If the chain cannot tell now, the payment stays settling until ``_judge_stranded``
        asks again."""
        try:
            paid_by = await self.settled_elsewhere(payment) if self.settled_elsewhere else None
        except ChainUnavailable as exc:
            log.warning("settlement %s of %s: cannot tell yet whether it was paid: %s", tx_hash, payment["id"], exc)
            return
        if paid_by is not None:
            log.warning("settlement of %s reverted, but %s paid it first: settled", payment["id"], paid_by)
            try:  # (its block: theirs was mined before ours, now or earlier)
                final = await self.chain.head() + self.confirmations
            except ChainUnavailable as exc:
                log.warning("settlement of %s: cannot read the chain's head yet: %s", payment["id"], exc)
                return  # (judged again: ``_judge_stranded``)
            self.store.mark_settled(payment["id"], paid_by, final)
            return
        reason = "transaction_failed: settlement reverted on chain" if not ok else "transfer_event_mismatch"
        if self.store.mark_failed(payment["id"], reason):
            log.error("settlement %s of payment %s failed: %s", tx_hash, payment["id"], reason)
            self._fire(payment["id"], reason)

    async def _judge_stranded(self) -> None:
        """Settlements whose transaction was concluded but whose payment was never judged (the chain
        failed while it was, or the process died between the two) are judged now."""
        for payment in self.store.stranded_settlements():
            try:
                await self._failed_settlement(payment, payment["mined_hash"], payment["tx_state"] == TxState.MINED)
            except Exception:  # (one that cannot be judged, say its scheme is gone, holds up no other)
                log.exception("settlement of payment %s could not be judged", payment["id"])

    def _fire(self, payment_id: str, reason: str) -> None:
        callback = self._watchers.pop(payment_id, None)
        if callback is not None:
            callback(reason)

    async def _check_watched(self) -> None:
        """Streams watching payments another replica concluded learn of a failure here."""
        if not self._watchers:
            return
        for payment_id, state in self.store.payment_states(list(self._watchers)).items():
            if state == PaymentState.FAILED:
                self._fire(payment_id, "settlement failed")
            elif state == PaymentState.SETTLED:
                self._watchers.pop(payment_id, None)

    # -- payouts ------------------------------------------------------------------------------

    def request_payout(self) -> None:
        self._wake.set()

    async def _queue_payouts(self) -> None:
        """Pending withdrawals become transfers: one per account, however many requests it made —
        as far as the payout account's tokens go (the pending state: the transfers in flight
        taken). A transfer it cannot pay would revert, give the credit back for another try, and
        cost gas each time: those wait, pending, and the operator is told."""
        if self.payout_account is None or self.token is None:
            return
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in self.store.payouts("pending"):
            groups.setdefault(row["account"], []).append(row)
        if not groups:
            return
        sender, token = self.payout_account.address, self.token
        try:
            funds = await self.chain.token_balance(token, sender, "pending")
        except (ChainUnavailable, RpcError, ValueError) as exc:
            log.warning("withdrawals wait: the payout account's balance cannot be read: %s", exc)
            return
        for rows in groups.values():
            total = sum(r["amount"] for r in rows)
            if total > funds:
                if "short" not in self._told:
                    self._told.add("short")
                    log.error(
                        "withdrawals wait: the payout account %s holds %d units of %s, short of a payout of %d",
                        sender, funds, token, total,
                    )  # fmt: skip
                continue
            funds -= total
            data = ERC20_TRANSFER + bytes(12) + bytes.fromhex(rows[0]["wallet"][2:]) + total.to_bytes(32, "big")
            # The nonce, the signature and the claim of exactly these rows in one transaction: a
            # replica that claimed any of them first makes this roll back, so nothing is paid twice.
            self.store.sign_payout(
                [r["id"] for r in rows],
                sender,
                lambda nonce, data=data: self._signed(sender, nonce, token, data, PAYOUT_GAS),
            )


def paid_in(receipt: dict[str, Any], payment: dict[str, Any]) -> bool:
    """Whether a settlement's receipt moved what its payment owed, payer to payee."""
    return (payment["payer"], payment["payee"], payment["amount"]) in transfers_in(receipt, payment["asset"])


class Signing:
    """Signs one settlement with the nonce the ledger hands it; remembers the hash."""

    def __init__(self, settler: Settler, to: str, data: bytes, gas: int | None = None) -> None:
        self.settler, self.to, self.data = settler, to, data
        self.gas = settler.gas_limit if gas is None else gas
        self.sender = settler.address
        self.tx_hash = ""

    def __call__(self, nonce: int) -> dict[str, Any]:
        signed = self.settler._signed(self.sender, nonce, self.to, self.data, self.gas)
        self.tx_hash = signed["tx_hash"]
        return signed


def sign_eip1559(key: PrivateKey, fields: list[Any]) -> tuple[str, str]:
    """Sign an EIP-1559 transaction [chainId, nonce, tip, maxFee, gas, to, value, data, accessList]:
    (hash, raw), both 0x-hex. The same bytes as eth-account's ``sign_transaction`` in a quarter
    of the time (this runs on the request path): the integers are turned into RLP's big-endian
    bytes here, so that RLP only frames bytes (its own inference of each item's type cost 40%)."""
    items = [_rlp_int(f) if isinstance(f, int) else f for f in fields]
    digest = keccak(b"\x02" + encode_raw(items))
    sig = key.sign_recoverable(digest, hasher=None)
    raw = b"\x02" + encode_raw([*items, _rlp_int(sig[64]), sig[:32].lstrip(b"\0"), sig[32:64].lstrip(b"\0")])
    return "0x" + keccak(raw).hex(), "0x" + raw.hex()


def _rlp_int(n: int) -> bytes:
    """An unsigned integer as RLP has it: big-endian, no leading zero bytes (0 is empty)."""
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


ERC20_TRANSFER = keccak(b"transfer(address,uint256)")[:4]
