"""The settlement worker on anvil: nothing is dropped — reverts are recorded, outages retried,
a nonce taken by an outside transaction is re-signed, a nonce gap left by a crash is filled."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from eth_account import Account

from support import RpcSwitch, ServerThread
from tollway.client.payer import sign_exact
from tollway.ledger import PaymentState, Store
from tollway.payments import eip3009
from tollway.payments.chain import Chain
from tollway.payments.exact import decode_authorization
from tollway.settlement import Settler


@pytest.fixture
def settler_key(chain) -> str:
    """A settlement account of its own (with gas), so these tests never race the shared gateway's."""
    account = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**18)])
    return "0x" + bytes(account.key).hex()


def payment_for(store: Store, chain, devnet, payer, amount: int) -> tuple[str, bytes]:
    """A reserved payment of ``amount`` from ``payer`` and its settlement calldata."""
    offer = {
        "network": f"eip155:{devnet.chain_id}",
        "asset": devnet.token,
        "payTo": devnet.payee,
        "amount": str(amount),
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    payload = sign_exact(payer, offer, int(time.time()))
    auth, sig = decode_authorization(payload)
    payment_id = store.reserve(
        {
            "lock_key": secrets.token_hex(16),
            "scheme": "exact",
            "network": offer["network"],
            "asset": devnet.token.lower(),
            "payer": payer.address.lower(),
            "payee": devnet.payee.lower(),
            "amount": amount,
            "proof": "{}",
            "request_digest": "test",
        }
    )
    return payment_id, eip3009.transfer_calldata(auth, sig)


async def run_until(settler: Settler, store: Store, payment_id: str, states: set[str], timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (row := store.payment(payment_id))["state"] not in states:
        assert time.monotonic() < deadline, row
        try:
            await settler.run_once()
        except Exception as exc:  # outages surface here; the worker loop logs them and carries on
            settler.last_error = str(exc)
        await asyncio.sleep(0.05)
    return row


@contextlib.asynccontextmanager
async def settler_on(store: Store, rpc_url: str, key: str, devnet) -> AsyncIterator[Settler]:
    settler = Settler(
        store,
        Chain(rpc_url),
        key=key,
        chain_id=devnet.chain_id,
        gas_limit=150_000,
        max_fee_gwei=Decimal(5),
        priority_fee_gwei=Decimal("0.001"),
    )
    try:
        yield settler
    finally:
        await settler.chain.close()


async def test_a_reverted_settlement_is_recorded_as_failed(tmp_path, chain, devnet, settler_key):
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    broke = Account.create()  # signs an authorization for money it does not have
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        store.sync_settler_nonce(settler.address, await settler.chain.pending_nonce(settler.address))
        payment_id, data = payment_for(store, chain, devnet, broke, 1000)
        tx_hash = settler.sign(payment_id, devnet.token, data)
        row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.FAILED and row["error"].startswith("transaction_failed")
    assert chain.receipt(tx_hash)["status"] == 0  # on chain, recorded — not dropped


async def test_an_rpc_outage_delays_settlement_but_loses_nothing(tmp_path, chain, devnet, settler_key):
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    before = chain.balance(devnet.payee)
    rpc = RpcSwitch(devnet.rpc_url)
    with ServerThread(rpc.app()) as proxy:
        async with settler_on(store, proxy.url, settler_key, devnet) as settler:
            store.sync_settler_nonce(settler.address, await settler.chain.pending_nonce(settler.address))
            payment_id, data = payment_for(store, chain, devnet, payer, 777)
            settler.sign(payment_id, devnet.token, data)
            rpc.mode = "http-502"
            for _ in range(3):
                with pytest.raises(Exception, match="chain"):
                    await settler.run_once()
            assert store.payment(payment_id)["state"] == PaymentState.SETTLING  # still queued
            rpc.mode = "up"
            row = await run_until(settler, store, payment_id, {PaymentState.SETTLED})
    assert row["state"] == PaymentState.SETTLED
    assert chain.balance(devnet.payee) == before + 777


async def test_a_nonce_taken_by_an_outside_transaction_is_resigned(tmp_path, chain, devnet, settler_key):
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        store.sync_settler_nonce(settler.address, await settler.chain.pending_nonce(settler.address))
        payment_id, data = payment_for(store, chain, devnet, payer, 555)
        first_hash = settler.sign(payment_id, devnet.token, data)
        # Someone uses the settlement key elsewhere before our transaction is broadcast.
        outside = Account.from_key(settler_key)
        tx = {
            "to": outside.address,
            "value": 0,
            "gas": 21_000,
            "nonce": store.payment(payment_id)["tx_nonce"],
            "maxFeePerGas": 5 * 10**9,
            "maxPriorityFeePerGas": 10**6,
            "chainId": devnet.chain_id,
            "type": 2,
        }
        chain.w3.eth.send_raw_transaction(outside.sign_transaction(tx).raw_transaction)
        row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.SETTLED and row["tx_hash"] != first_hash
    assert chain.receipt(row["tx_hash"])["status"] == 1


async def test_a_nonce_gap_left_by_a_crash_is_filled(tmp_path, chain, devnet, settler_key):
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        settler.gap_grace = 0.2
        store.sync_settler_nonce(settler.address, await settler.chain.pending_nonce(settler.address))
        store.take_settler_nonce(settler.address)  # taken, then the process "died" before using it
        payment_id, data = payment_for(store, chain, devnet, payer, 333)
        settler.sign(payment_id, devnet.token, data)
        row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.SETTLED
