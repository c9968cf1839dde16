"""Claiming what batch-settlement vouchers owe us: many channels in one transaction, on a schedule,
sooner once enough is owed, and at once for a channel whose payer started a timed withdrawal.

Each pass (every ``channels.watch_seconds``, in every replica):
- reads ``pendingWithdrawals`` on chain for the channels holding money not claimed yet (charged or
  not: a channel all claimed still holds its payer's balance, which vouchers may spend); a channel
  being withdrawn takes no more vouchers and is claimed now (the escrow's withdrawal delay is at
  least 15 minutes, so a watch every 30 s sees it long before the payer can finalise);
- claims when one is being withdrawn, when ``claim_interval_seconds`` passed since the last claim,
  or when the unclaimed total reaches ``claim_threshold_usd``: one
  ``multicall([claimWithSignature(claims, authorizer's signature), settle(payee, token)])`` for up to
  ``max_claims_per_transaction`` channels, each up to what it was charged, with its payer's latest
  voucher. The batch is simulated first; a channel whose claim would revert is left out (and logged).

A claim is an outbox transaction like a settlement: numbered in the ledger with the settlement
account's nonce, broadcast, re-broadcast and bumped by the settlement worker, which concludes it
(``Store.claim_mined``). The channels it claims are marked with it in the same database
transaction that queues it, so two replicas never claim one channel twice, and a crash between
broadcast and receipt loses nothing: the row is still in the outbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from .errors import ChainUnavailable
from .keccak import keccak
from .ledger import Store
from .ledger.models import TxState
from .payments import channel as ch
from .payments.batch import BatchSettlementEvm
from .payments.chain import Chain, RpcError
from .settlement import Settler, Signing

log = logging.getLogger("tollway.claims")

PENDING_WITHDRAWALS = keccak(b"pendingWithdrawals(bytes32)")[:4]
CHANNELS = keccak(b"channels(bytes32)")[:4]
CLAIM_GAS = 120_000  # a claim transaction: the multicall and the sweep ...
CLAIM_GAS_PER_CHANNEL = 60_000  # ... and each channel it claims


class Claimer:
    def __init__(
        self,
        store: Store,
        chain: Chain,
        settler: Settler,
        scheme: BatchSettlementEvm,
        *,
        interval: float,
        threshold: int,
        watch_every: float,
        batch: int,
    ) -> None:
        self.store, self.chain, self.settler, self.scheme = store, chain, settler, scheme
        self.interval, self.threshold, self.watch_every, self.batch = interval, threshold, watch_every, batch
        self.last_claim = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.watch_every)
            try:
                await self.run_once()
            except Exception:  # (an RPC outage: the next pass tries again)
                log.exception("claim pass failed")

    async def run_once(self, *, force: bool = False) -> dict[str, Any] | None:
        """One pass: watch for withdrawals, then claim if it is time. Returns the claim queued, if any."""
        s = self.scheme
        await self.watch()
        await self.conclude_refunds()
        rows = self.store.claimable_channels(s.network, s.token.lower(), self.batch)
        if not rows:
            return None
        due = (
            force
            or any(r["withdraw_at"] for r in rows)
            or time.monotonic() - self.last_claim >= self.interval
            or sum(r["charged"] - r["claimed"] for r in rows) >= self.threshold
        )
        if not due:
            return None
        claims = {r["id"]: self._claim(r) for r in rows}
        data = self._calldata(list(claims.values()))
        reverting = await self._reverting(data, claims)
        for channel_id in reverting:
            log.error("channel %s cannot be claimed now (its claim would revert): left out", channel_id)
            del claims[channel_id]
        if not claims:
            return None
        if reverting:
            data = self._calldata(list(claims.values()))
        gas = CLAIM_GAS + CLAIM_GAS_PER_CHANNEL * len(claims)
        signing = Signing(self.settler, ch.BATCH_SETTLEMENT_ADDRESS, data, gas)
        totals = {cid: c.total_claimed for cid, c in claims.items()}
        tx = self.store.queue_claim(totals, self.settler.address, signing)
        if tx is None:
            return None  # another replica is claiming one of them
        self.last_claim = time.monotonic()
        self.settler.wake()
        log.info("claiming %d channel(s), %d in all, in %s", len(claims), sum(totals.values()), tx["tx_hash"])
        return tx

    async def watch(self) -> None:
        """Channels whose payer started a timed withdrawal take no more vouchers."""
        s = self.scheme
        rows = [r for r in self.store.watched_channels(s.network, s.token.lower()) if not r["withdraw_at"]]
        if not rows:
            return
        reads = [PENDING_WITHDRAWALS + bytes.fromhex(r["id"][2:]) for r in rows]
        calls = [("eth_call", [{"to": ch.BATCH_SETTLEMENT_ADDRESS, "data": "0x" + d.hex()}, "latest"]) for d in reads]
        for row, answer in zip(rows, await self.chain.batch(calls), strict=True):
            initiated = int(answer[2 + 64 : 2 + 128], 16)
            if initiated and self.store.channel_withdrawing(row["id"], initiated):
                log.warning("the payer of channel %s started a withdrawal: claiming it now", row["id"])

    async def conclude_refunds(self) -> None:
        """Channels still held for a refund whose transaction is concluded (mined or reverted) but
        whose request did not read the outcome (it stopped waiting, or its process stopped): the
        escrow says what each holds (``Store.refunded``), and it takes vouchers again."""
        for row in self.store.refunds_left():
            mined = row["state"] == TxState.MINED
            try:
                balance, claimed = await escrowed(self.chain, bytes.fromhex(row["id"][2:]), row["mined_hash"])
            except (ChainUnavailable, RpcError) as exc:  # (the next pass asks again; claims go on)
                log.warning("channel %s: its refund's outcome cannot be read yet: %s", row["id"], exc)
                continue
            if self.store.refunded(row["id"], row["busy"], balance=balance, claimed=claimed, mined=mined):
                log.warning("channel %s: its refund %s is concluded from the escrow", row["id"], row["tx_hash"])

    def _claim(self, row: dict[str, Any]) -> ch.Claim:
        return ch.Claim(
            config=ch.decode_config(json.loads(row["config"])),
            max_claimable=row["signed_max"],
            signature=bytes.fromhex(row["signature"][2:]),
            total_claimed=row["charged"],
        )

    def _calldata(self, claims: list[ch.Claim]) -> bytes:
        digest = ch.claim_batch_digest(claims, self.scheme.chain_id)
        signature = self.scheme.sign(digest)
        s = self.scheme
        return ch.multicall_calldata(
            [ch.claim_with_signature_calldata(claims, signature), ch.settle_calldata(s.payee, s.token)]
        )

    async def _reverting(self, data: bytes, claims: dict[str, ch.Claim]) -> list[str]:
        """The channels whose claim would revert now: none if the whole batch (``data``) would go through."""
        if not isinstance(
            (await self.chain.batch([("eth_call", [self._tx(data), "pending"])], errors=True))[0], RpcError
        ):
            return []
        each = [("eth_call", [self._tx(self._calldata([c])), "pending"]) for c in claims.values()]
        answers = await self.chain.batch(each, errors=True)
        return [cid for cid, a in zip(claims, answers, strict=True) if isinstance(a, RpcError)]

    def _tx(self, data: bytes) -> dict[str, str]:
        return {"from": self.settler.address, "to": ch.BATCH_SETTLEMENT_ADDRESS, "data": "0x" + data.hex()}


async def escrowed(chain: Chain, cid: bytes, after: str | None = None) -> tuple[int, int]:
    """(balance, totalClaimed) of a channel in the escrow — as of the block that mined the
    transaction ``after``, if given: a node behind it (one of a load balancer's) answers an error,
    never the state before it."""
    block = "latest"
    if after is not None:
        receipt = await chain.request("eth_getTransactionReceipt", [after])
        if not isinstance(receipt, dict) or not receipt.get("blockNumber"):
            raise ChainUnavailable(f"no receipt for {after} at this node yet")
        block = receipt["blockNumber"]
    raw = await chain.call(ch.BATCH_SETTLEMENT_ADDRESS, CHANNELS + cid, block)
    return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")
