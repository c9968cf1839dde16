"""Settlement: sign on the request path, broadcast and confirm in a durable background worker.

``Settler.sign`` runs inside the request: it takes the next nonce of the settlement account
from the ledger (one counter shared by all replicas), signs the transaction locally — so its
hash is known before it is sent — and stores it in the payment row (``reserved → settling``).
The response then carries that hash. The worker, in each process, loops over ``settling`` rows:
broadcasts the stored raw transaction (idempotent: same bytes, same hash), polls receipts in one
batched call, and moves rows to ``settled`` or ``failed``. A crash loses nothing: the rows are
the queue. Nonces left unused by a crash between taking one and storing the transaction are
filled with a zero-value self-transfer, so later settlements do not stall behind the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import rlp
from coincurve import PrivateKey
from eth_account import Account
from eth_account.typed_transactions import TypedTransaction
from eth_hash.auto import keccak
from eth_utils import to_checksum_address
from hexbytes import HexBytes

from .errors import ChainUnavailable
from .ledger import Store
from .payments.chain import Chain, RpcError, transfers_in

log = logging.getLogger("tollway.settlement")

REBROADCAST_AFTER = 15.0  # seconds without a receipt before sending the raw tx again
GAP_GRACE = 10.0  # seconds a nonce gap may last before it is filled
PASS_INTERVAL = 0.05  # seconds between worker passes while settlements are pending
RECEIPT_POLL = 0.25  # seconds between receipt polls while settlements are pending
IDLE_POLL = 2.0  # seconds between passes when nothing is pending (a wake-up comes sooner)
GWEI = 10**9


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
        payout_key: str | None = None,
        token: str | None = None,
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
        self.fixed_max_fee = int(max_fee_gwei * GWEI) if max_fee_gwei is not None else None
        self.tip = int(priority_fee_gwei * GWEI)
        self.max_fee = self.fixed_max_fee or 2 * GWEI
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._gap_since: float | None = None
        self._polled = 0.0  # when receipts were last polled (monotonic)
        self._payouts_sending = False  # as of the last poll
        self.gap_grace = GAP_GRACE
        self.last_error: str | None = None

    # -- request path -----------------------------------------------------------------------

    def sign(self, payment_id: str, to: str, data: bytes) -> str:
        """Sign the settlement transaction for a reserved payment; returns its hash."""
        done = self.store.sign_settlement(payment_id, self.address, lambda nonce: self._sign(nonce, to, data))
        if done is None:
            raise RuntimeError(f"payment {payment_id} was not in the reserved state")
        self._wake.set()
        return done[0]

    def _sign(self, nonce: int, to: str, data: bytes, gas: int | None = None, account: Any = None) -> tuple[str, str]:
        key = self._keys[(account or self.account).address]
        fee = max(self.max_fee, self.tip)
        fields = [self.chain_id, nonce, self.tip, fee, gas or self.gas_limit, bytes.fromhex(to[2:]), 0, data, []]
        return sign_eip1559(key, fields)

    # -- worker -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.store.sync_settler_nonce(self.address, await self.chain.pending_nonce(self.address))
        if self.payout_account and self.payout_account.address != self.address:
            addr = self.payout_account.address
            self.store.sync_settler_nonce(addr, await self.chain.pending_nonce(addr))
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
            self.max_fee = 2 * await self.chain.base_fee() + self.tip

    async def _run(self) -> None:
        last_fees = time.monotonic()
        busy = True  # look for work left by an earlier run straight away
        while True:
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=IDLE_POLL)
            # Let settlements gather, so that one pass broadcasts and polls them together, off
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
        """One pass over unconfirmed settlements and payouts. Returns True while any remain.

        New transactions are broadcast every pass; receipts are polled (and stuck transactions
        rebroadcast) every ``RECEIPT_POLL`` seconds — blocks come no faster, and a pass must stay cheap.
        """
        poll = time.monotonic() - self._polled >= RECEIPT_POLL
        if poll:
            self._polled = time.monotonic()
        busy = await self._payouts(poll)
        return await self._settlements(poll) or busy

    async def _settlements(self, poll: bool) -> bool:
        await self._send(self.store.settling(unsent=True))
        if not poll:
            return True
        rows = self.store.settling()
        if not rows:
            self._gap_since = None
            return False
        now = time.time()
        stale = [r for r in rows if r["broadcast_at"] is not None and now - r["broadcast_at"] > REBROADCAST_AFTER]
        await self._send(stale)
        resent = {r["id"] for r in stale}
        sent = [r for r in rows if r["broadcast_at"] is not None and r["id"] not in resent]
        receipts = await self.chain.batch([("eth_getTransactionReceipt", [r["tx_hash"]]) for r in sent]) if sent else []
        pending = [r for r in rows if r["broadcast_at"] is None or r["id"] in resent]
        for row, receipt in zip(sent, receipts, strict=True):
            if receipt is None:
                pending.append(row)
            else:
                self._conclude(row, receipt)
        if pending:
            await self._fill_gap(min(r["tx_nonce"] for r in pending))
        return True

    async def _send(self, rows: Sequence[dict[str, Any]]) -> None:
        """Broadcast settlement transactions in one batch and record the node's answers."""
        if not rows:
            return
        answers = await self.chain.batch([("eth_sendRawTransaction", [r["raw_tx"]]) for r in rows], errors=True)
        outcomes: dict[str, str | None] = {}
        for row, result in zip(rows, answers, strict=True):
            if not isinstance(result, RpcError):
                outcomes[row["id"]] = None
            elif not await self._refused(row, result):
                outcomes[row["id"]] = result.message
        self.store.mark_broadcast(outcomes)

    async def _refused(self, row: dict[str, Any], error: RpcError) -> bool:
        """Handle the node's refusal of one broadcast. True when the row was dealt with (it was
        already known, or its nonce was taken and it is re-signed); False to record the error and
        retry later."""
        msg = error.message.lower()
        if "already known" in msg or "already imported" in msg:
            self.store.mark_broadcast({row["id"]: None})
            return True
        if "nonce too low" in msg or "replacement transaction underpriced" in msg:
            # another transaction of this account holds our nonce (mined, or waiting in the pool)
            await self._nonce_taken(row)
            return True
        log.warning("broadcast of %s failed: %s", row["tx_hash"], error.message)
        return False

    async def _nonce_taken(self, row: dict[str, Any]) -> None:
        """Our nonce was used by another transaction: if ours is not the one mined, sign again."""
        if await self.chain.receipt(row["tx_hash"]) is not None:
            return
        nonce = self.store.take_settler_nonce(self.address)
        to, data = stored_call(row["raw_tx"])
        tx_hash, raw = self._sign(nonce, to, data)
        if self.store.resign(row["id"], old_tx=row["tx_hash"], tx_hash=tx_hash, raw_tx=raw, tx_nonce=nonce):
            log.warning("settlement of %s re-signed as %s (nonce taken)", row["id"], tx_hash)

    def _conclude(self, row: dict[str, Any], receipt: dict[str, Any]) -> None:
        if int(receipt.get("status", "0x0"), 16) != 1:
            self.store.mark_failed(row["id"], "transaction_failed: settlement reverted on chain")
            log.error("settlement %s of payment %s reverted", row["tx_hash"], row["id"])
            return
        wanted = (row["payer"], row["payee"], row["amount"])
        if wanted not in transfers_in(receipt, row["asset"]):
            self.store.mark_failed(row["id"], "transfer_event_mismatch: no matching Transfer log")
            return
        self.store.mark_settled(row["id"], row["tx_hash"])

    async def _fill_gap(self, lowest_pending: int) -> None:
        chain_next = int(await self.chain.request("eth_getTransactionCount", [self.address, "latest"]), 16)
        if lowest_pending <= chain_next:
            self._gap_since = None
            return
        if self._gap_since is None:
            self._gap_since = time.monotonic()
            return
        if time.monotonic() - self._gap_since < self.gap_grace:
            return
        for nonce in range(chain_next, lowest_pending):
            _, raw = self._sign(nonce, self.address, b"", gas=21_000)
            try:
                await self.chain.send_raw(raw)
                log.warning("filled settlement nonce gap at %d", nonce)
            except RpcError as exc:
                log.warning("gap fill at nonce %d: %s", nonce, exc.message)
        self._gap_since = None

    # -- payouts ------------------------------------------------------------------------------

    def request_payout(self) -> None:
        self._wake.set()

    async def _payouts(self, poll: bool) -> bool:
        """Pay pending withdrawals — one transfer per account, however many requests it made —
        then confirm those sent. A payout that reverts is refunded to credit."""
        if self.payout_account is None or self.token is None:
            return False
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in self.store.payouts("pending"):
            groups.setdefault(row["account"], []).append(row)
        for rows in groups.values():
            total = sum(r["amount"] for r in rows)
            data = ERC20_TRANSFER + bytes(12) + bytes.fromhex(rows[0]["wallet"][2:]) + total.to_bytes(32, "big")
            # Nonce, signature and the claim of exactly these rows in one transaction: a replica
            # that claimed any of them first makes this roll back, so nothing is paid twice.
            self.store.sign_payout(
                [r["id"] for r in rows],
                self.payout_account.address,
                lambda nonce, data=data: self._sign(nonce, self.token, data, gas=100_000, account=self.payout_account),
            )
        if not poll:
            return self._payouts_sending
        sending = self.store.payouts("sending")
        self._payouts_sending = bool(sending)
        by_tx: dict[str, list[dict[str, Any]]] = {}
        for row in sending:
            by_tx.setdefault(row["tx_hash"], []).append(row)
        receipts = await self.chain.batch([("eth_getTransactionReceipt", [tx]) for tx in by_tx]) if by_tx else []
        unmined = []
        for rows, receipt in zip(by_tx.values(), receipts, strict=True):
            if receipt is None:
                unmined.append(rows[0])
            elif int(receipt.get("status", "0x0"), 16) == 1:
                self.store.move_payouts([r["id"] for r in rows], "sending", "sent")
            else:
                self.store.fail_payouts([r["id"] for r in rows], "payout transaction reverted")
        if unmined:  # (re)broadcast: idempotent, the node answers "already known" if it has it
            answers = await self.chain.batch([("eth_sendRawTransaction", [r["raw_tx"]]) for r in unmined], errors=True)
            for row, answer in zip(unmined, answers, strict=True):
                if isinstance(answer, RpcError) and "already" not in answer.message.lower():
                    log.warning("payout %s: %s", row["tx_hash"], answer.message)
        return self._payouts_sending


def sign_eip1559(key: PrivateKey, fields: list[Any]) -> tuple[str, str]:
    """Sign an EIP-1559 transaction [chainId, nonce, tip, maxFee, gas, to, value, data, accessList]:
    (hash, raw), both 0x-hex. The same bytes as eth-account's ``sign_transaction`` in a quarter
    of the time (this runs on the request path)."""
    digest = keccak(b"\x02" + rlp.encode(fields))
    sig = key.sign_recoverable(digest, hasher=None)
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
    raw = b"\x02" + rlp.encode([*fields, sig[64], r, s])
    return "0x" + keccak(raw).hex(), "0x" + raw.hex()


ERC20_TRANSFER = keccak(b"transfer(address,uint256)")[:4]


def stored_call(raw_tx: str) -> tuple[str, bytes]:
    """The (to, calldata) of a signed transaction."""
    tx = TypedTransaction.from_bytes(HexBytes(raw_tx)).as_dict()
    return to_checksum_address(tx["to"]), bytes(tx["data"])
