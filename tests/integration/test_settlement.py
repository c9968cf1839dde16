"""The settlement worker on anvil: nothing is dropped and nothing stalls — reverts are recorded,
outages retried, a nonce taken by an outside transaction is re-signed, a front-run settlement is
settled (not a debt), and a transaction that waits too long has its fees bumped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from web3 import Web3

from support import RpcSwitch, ServerThread, manual_mining, send_raw, signed_authorization
from tollway.devnet.canonical import MULTICALL3_ADDRESS
from tollway.errors import ChainUnavailable
from tollway.keccak import keccak
from tollway.ledger import PaymentState, Store
from tollway.ledger.models import TxState
from tollway.ledger.store import credit_account
from tollway.payments import eip3009
from tollway.payments.chain import Chain
from tollway.payments.exact import ExactEvm, decode_authorization
from tollway.settlement import ERC20_TRANSFER, Settler, Signing

GWEI = 10**9
AGGREGATE = keccak(b"aggregate((address,bytes)[])")[:4]  # Multicall3's: each call in turn, all or none


@pytest.fixture
def settler_key(chain) -> str:
    """A settlement account of its own (with gas), so these tests never race the shared gateway's."""
    account = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**18)])
    return "0x" + bytes(account.key).hex()


def payment_for(store: Store, devnet, payer, amount: int) -> tuple[str, bytes, dict[str, Any]]:
    """A reserved payment of ``amount`` from ``payer``: its id, settlement calldata and payload."""
    payload = signed_authorization(devnet, payer, amount)
    auth, sig = decode_authorization(payload)
    payment_id = store.reserve(
        {
            "lock_key": secrets.token_hex(16),
            "scheme": "exact",
            "network": f"eip155:{devnet.chain_id}",
            "asset": devnet.token.lower(),
            "payer": payer.address.lower(),
            "payee": devnet.payee.lower(),
            "amount": amount,
            "proof": json.dumps(payload),
            "request_digest": "test",
        }
    )
    return payment_id, eip3009.transfer_calldata(auth, sig), payload


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
async def settler_on(store: Store, rpc_url: str, key: str, devnet, **kw: Any) -> AsyncIterator[Settler]:
    settler = Settler(
        store,
        Chain(rpc_url),
        key=key,
        chain_id=devnet.chain_id,
        gas_limit=150_000,
        max_fee_gwei=kw.pop("max_fee_gwei", Decimal(5)),
        priority_fee_gwei=Decimal("0.001"),
        **kw,
    )
    mined = await settler.chain.request("eth_getTransactionCount", [settler.address, "latest"])
    store.sync_settler_nonce(settler.address, int(mined, 16))
    try:
        yield settler
    finally:
        await settler.chain.close()


async def test_a_reverted_settlement_is_recorded_as_failed(tmp_path, chain, devnet, settler_key):
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    broke = Account.create()  # signs an authorization for money it does not have
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        payment_id, data, _ = payment_for(store, devnet, broke, 1000)
        tx_hash = settler.sign(payment_id, devnet.token, data)
        row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.FAILED and row["error"].startswith("transaction_failed")
    assert chain.receipt(tx_hash)["status"] == 0  # on chain, recorded — not dropped


async def test_a_revert_is_believed_only_once_its_confirmations_are_on_top_of_it(tmp_path, chain, devnet, settler_key):
    """A reorganisation may mine a reverted transaction again, and it may pay then: a revert turns
    into a failed payment (a debt; for a payout, credit given back) only once ``chain.confirmations``
    blocks are on top of its own — and, mined, it is neither bumped nor sent again meanwhile. A
    stream it pays for is cut at once (not served unpaid while the blocks come)."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    broke = Account.create()
    async with settler_on(store, devnet.rpc_url, settler_key, devnet, confirmations=2) as settler:
        payment_id, data, _ = payment_for(store, devnet, broke, 1000)
        cut: list[str] = []
        settler.watch(payment_id, cut.append)
        with manual_mining(chain):
            tx_hash = settler.sign(payment_id, devnet.token, data)
            await settler.run_once()  # broadcast
            assert cut == []
            settler.bump_after = 0.0  # (from now on, a row seen waiting is bumped at once)
            for _ in range(2):  # mined (reverted), then 1 block on top: not believed yet
                chain.mine(1)
                for _ in range(2):  # (the second poll sees no new block: no receipt asked)
                    settler._polled = 0.0  # (a poll is due)
                    await settler.run_once()
                payment = store.payment(payment_id)
                assert payment["state"] == PaymentState.SETTLING and cut == ["settlement reverted"]
                assert store.transaction(payment["tx_id"])["hashes"] == tx_hash  # (not bumped)
            chain.mine(1)
            row = await run_until(settler, store, payment_id, {PaymentState.FAILED, PaymentState.SETTLED})
    assert row["state"] == PaymentState.FAILED and row["tx_hash"] == tx_hash  # (never bumped: one signature)
    assert chain.receipt(tx_hash)["status"] == 0


async def test_an_rpc_outage_delays_settlement_but_loses_nothing(tmp_path, chain, devnet, settler_key):
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    before = chain.balance(devnet.payee)
    rpc = RpcSwitch(devnet.rpc_url)
    with ServerThread(rpc.app()) as proxy:
        async with settler_on(store, proxy.url, settler_key, devnet) as settler:
            payment_id, data, _ = payment_for(store, devnet, payer, 777)
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
        settler.replace_after = 0.5
        payment_id, data, _ = payment_for(store, devnet, payer, 555)
        first_hash = settler.sign(payment_id, devnet.token, data)
        # Someone uses the settlement key elsewhere before our transaction is broadcast.
        nonce = store.transaction(store.payment(payment_id)["tx_id"])["nonce"]
        outside = Account.from_key(settler_key)
        send_raw(
            chain,
            outside,
            {
                "to": outside.address,
                "gas": 21_000,
                "nonce": nonce,
                "maxFeePerGas": 5 * GWEI,
                "maxPriorityFeePerGas": 10**6,
            },
        )
        row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.SETTLED and row["tx_hash"] != first_hash
    assert chain.receipt(row["tx_hash"])["status"] == 1


async def test_a_transaction_waited_for_is_followed_when_signed_anew(tmp_path, chain, devnet, settler_key):
    """A request waiting for its own transaction (a refund, a deposit) gets its outcome when the
    key was used elsewhere at its nonce and it was signed anew with another — not a timeout."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    # (fees over the shared devnet's base fee, which drifts: both transactions must be minable at once)
    max_fee = max(5 * GWEI, 4 * chain.w3.eth.get_block("latest")["baseFeePerGas"])
    async with settler_on(store, devnet.rpc_url, settler_key, devnet, max_fee_gwei=Decimal(max_fee) / GWEI) as settler:
        settler.replace_after = 0.5
        nothing = ERC20_TRANSFER + bytes(12) + bytes.fromhex(settler.address[2:]) + bytes(32)  # (0 tokens to itself)
        row = store.queue_transaction("refund", settler.address, Signing(settler, devnet.token, nothing))
        outside = Account.from_key(settler_key)
        fee = {"maxFeePerGas": max_fee, "maxPriorityFeePerGas": 10**6}
        taken = send_raw(chain, outside, {"to": outside.address, "gas": 21_000, "nonce": row["nonce"], **fee})
        chain.w3.eth.wait_for_transaction_receipt(taken, timeout=10)  # (taken: mined before the refund is sent)
        waiting = asyncio.create_task(settler.mined(row, timeout=15))
        while not waiting.done():
            await settler.run_once()
            await asyncio.sleep(0.05)
        mined = waiting.result()
    assert mined is not None and mined != row["tx_hash"] and chain.receipt(mined)["status"] == 1
    assert store.transaction(row["id"])["state"] == "replaced"


async def test_an_outside_transaction_pending_at_start_and_then_dropped_leaves_no_gap(
    tmp_path, chain, devnet, settler_key
):
    """The settlement key's transaction from elsewhere, waiting in the node's pool as the gateway
    starts, is dropped: its nonce is never used, and nothing signed after it may wait behind it."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer, before = chain.fund(), chain.balance(devnet.payee)
    outside = Account.from_key(settler_key)
    with manual_mining(chain):
        fee = {"maxFeePerGas": 5 * GWEI, "maxPriorityFeePerGas": 1}
        taken = send_raw(chain, outside, {"to": outside.address, "gas": 21_000, "nonce": 0, **fee})
        async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
            await settler.start()  # (as the gateway starts: the nonce counter synced with the chain)
            await settler.stop()
            chain.w3.provider.make_request("anvil_dropTransaction", [taken])
            payment_id, data, _ = payment_for(store, devnet, payer, 321)
            settler.sign(payment_id, devnet.token, data)
            chain.w3.provider.make_request("evm_setAutomine", [True])
            row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.SETTLED and chain.balance(devnet.payee) == before + 321


def lag_receipts(settler: Settler, seconds: float, answer: Any = None) -> None:
    """The node answering receipts is behind for ``seconds``: each is ``answer`` (none) meanwhile."""
    batch, until = settler.chain.batch, time.monotonic() + seconds

    async def lagging(calls: list, **kw: Any) -> list:
        answers = await batch(calls, **kw)
        if time.monotonic() < until:
            return [
                answer if method == "eth_getTransactionReceipt" else a
                for (method, _), a in zip(calls, answers, strict=True)
            ]
        return answers

    settler.chain.batch = lagging  # type: ignore[method-assign]


def settled_by_hand(settler: Settler, store: Store, chain, devnet, payer, amount: int) -> tuple[str, dict]:
    """A payment whose settlement the worker signed and we broadcast and saw mined (as another
    replica or a rebroadcast would): its id and its outbox row."""
    payment_id, data, _ = payment_for(store, devnet, payer, amount)
    tx_hash = settler.sign(payment_id, devnet.token, data)
    tx = store.transaction(store.payment(payment_id)["tx_id"])
    chain.w3.eth.send_raw_transaction(tx["raw_tx"])
    assert chain.w3.eth.wait_for_transaction_receipt(tx_hash)["status"] == 1
    return payment_id, tx


async def test_a_settlement_mined_whose_receipt_comes_late_is_not_signed_anew(tmp_path, chain, devnet, settler_key):
    """Our own transaction was mined (broadcast here, as another replica or a rebroadcast would),
    but the node that answers receipts is behind for a while: the worker's "nonce too low" must not
    make it sign the settlement again with a new nonce (a payout would be paid twice)."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        settler.replace_after = 5.0
        payment_id, tx = settled_by_hand(settler, store, chain, devnet, payer, 444)
        first_hash = tx["tx_hash"]
        lag_receipts(settler, 2.0)
        row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.SETTLED and row["tx_hash"] == first_hash
    assert store.transaction(tx["id"])["state"] == TxState.MINED


async def test_a_settlement_signed_anew_while_its_receipt_lagged_is_settled_by_the_first(
    tmp_path, chain, devnet, settler_key
):
    """Signed anew after its nonce seemed taken, the settlement's first signature turns out mined:
    the new row keeps the old hashes, so the payment is settled by it — even for a scheme that
    cannot look on chain for who paid (``upto``: no ``settled_elsewhere``), where the new
    signature's revert would have failed a payment that paid, and debited its payer."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    before = chain.balance(devnet.payee)
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        settler.replace_after, settler.settled_elsewhere = 0.3, None
        payment_id, first = settled_by_hand(settler, store, chain, devnet, payer, 446)
        lag_receipts(settler, 3.0)
        row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
        assert store.transaction(first["id"])["state"] == TxState.REPLACED  # (it was signed anew)
    assert row["state"] == PaymentState.SETTLED
    assert chain.balance(devnet.payee) == before + 446


async def test_a_payout_whose_nonce_was_taken_is_not_signed_anew(tmp_path, chain, devnet, settler_key, caplog):
    """A token transfer has no replay guard: signed anew after a receipt that came late, a payout
    would be paid twice. It stays sending, and the operator is told once."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        settler.replace_after = 0.3
        to = Account.create().address
        data = bytes.fromhex("a9059cbb") + bytes(12) + bytes.fromhex(to[2:]) + (5).to_bytes(32, "big")
        row = store.queue_transaction(
            "payout",
            settler.address,
            lambda nonce: settler._signed(settler.address, nonce, devnet.token, data, 100_000),
        )
        outside = Account.from_key(settler_key)  # (the key used elsewhere, at the payout's nonce)
        base_fee = chain.w3.eth.get_block("latest")["baseFeePerGas"]  # (the shared devnet's: it drifts)
        taken = send_raw(
            chain,
            outside,
            {
                "to": outside.address,
                "gas": 21_000,
                "nonce": row["nonce"],
                "maxFeePerGas": max(5 * GWEI, 4 * base_fee),
                "maxPriorityFeePerGas": 1,
            },
        )
        chain.w3.eth.wait_for_transaction_receipt(taken, timeout=10)  # (taken: mined before the payout is sent)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            await settler.run_once()
            await asyncio.sleep(0.05)
    still_open = store.open_transactions(TxState.QUEUED) + store.open_transactions(TxState.SENT)
    assert [r["id"] for r in still_open] == [row["id"]]  # (nothing signed anew)
    assert [r.message for r in caplog.records if "not signed anew" in r.message].__len__() == 1


@pytest.mark.parametrize(
    "answer",
    [{}, {"status": 1, "blockHash": "0x1"}, "0x", {"status": "0x0", "blockHash": "0x1", "transactionHash": "0x2"}],
)
async def test_a_malformed_receipt_is_not_believed(tmp_path, chain, devnet, settler_key, answer):
    """A node in trouble answering receipts that are not receipts of the transaction asked about
    (no status, a number, another transaction's): the settlement is neither failed nor stuck."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        payment_id, data, _ = payment_for(store, devnet, payer, 447)
        settler.sign(payment_id, devnet.token, data)
        lag_receipts(settler, 1.5, answer)
        row = await run_until(settler, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.SETTLED


async def test_a_queued_settlement_survives_its_process(tmp_path, chain, devnet, settler_key):
    """Signed by a process that died before broadcasting: the next worker sends it (the outbox
    is the queue; nonces are taken with the row, so no gap is left behind)."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as dead:
        payment_id, data, _ = payment_for(store, devnet, payer, 333)
        dead.sign(payment_id, devnet.token, data)
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as successor:
        row = await run_until(successor, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    assert row["state"] == PaymentState.SETTLED


@pytest.mark.parametrize(("confirmations", "log_range"), [(0, None), (2, None), (0, 1000), (0, 300)])
async def test_a_front_run_settlement_is_settled_not_a_debt(
    tmp_path, chain, devnet, settler_key, confirmations, log_range
):
    """Anyone may submit a payer's EIP-3009 authorization. If someone does before us, our
    settlement reverts, yet the payee was paid by theirs: that is settled — the honest payer's
    deposit is not reversed (finding 6), and a stream it pays for is not cut (its revert, seen
    before it is believed, cut it). Theirs is found on a node that caps the blocks one
    ``eth_getLogs`` may span (``log_range``, as hosted RPCs do) too, also under the client's first range."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    front_runner = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [front_runner.address, hex(10**18)])
    proxy = RpcSwitch(devnet.rpc_url)
    proxy.max_log_range = log_range
    if log_range:
        chain.w3.provider.make_request("anvil_mine", [hex(2 * log_range)])  # (more history than one query may span)
    stack = contextlib.ExitStack()
    server = stack.enter_context(ServerThread(proxy.app()))
    rpc = Chain(server.url)
    exact = exact_on(rpc, devnet)
    try:
        async with settler_on(
            store,
            server.url,
            settler_key,
            devnet,
            settled_elsewhere=exact.settled_elsewhere,
            confirmations=confirmations,
        ) as s:
            payment_id, data, _ = payment_for(store, devnet, payer, 444)
            account = credit_account(f"eip155:{devnet.chain_id}", devnet.token, payer.address)
            store.settle_call_credit(account, deposit=444, held=0, cost=400, call_id="c", payment_id=payment_id)
            cut: list[str] = []
            s.watch(payment_id, cut.append)
            with manual_mining(chain):
                ours = s.sign(payment_id, devnet.token, data)
                await s.run_once()  # broadcast: it waits in the pool
                theirs = await mined_first(s, chain, front_runner, devnet.token, data, 150_000)
                if confirmations:
                    assert store.payment(payment_id)["state"] == PaymentState.SETTLING  # (not believed yet)
                    chain.mine(confirmations)
            row = await run_until(s, store, payment_id, {PaymentState.SETTLED, PaymentState.FAILED})
    finally:
        await rpc.close()
        stack.close()
    assert cut == []
    assert chain.receipt(ours)["status"] == 0 and chain.receipt(theirs)["status"] == 1
    assert row["state"] == PaymentState.SETTLED and row["tx_hash"] == theirs
    assert store.credit_balance(account) == 44  # no reversal: the money did arrive


async def mined_first(s: Settler, chain, sender, to: str, data: bytes, gas: int) -> str:
    """Send ``sender``'s transaction with a higher tip than the settlements waiting in the pool, mine
    one block (it comes first: ours revert), and let the worker see it: its hash."""
    fees = {"maxFeePerGas": 50 * GWEI, "maxPriorityFeePerGas": 10 * GWEI}
    theirs = send_raw(chain, sender, {"to": to, "data": "0x" + data.hex(), "gas": gas, **fees})
    chain.mine(1)
    s._polled = 0.0  # (a poll is due: ours are seen reverted)
    await s.run_once()
    return theirs


def exact_on(rpc: Chain, devnet) -> ExactEvm:
    """The ``exact`` scheme, for what it finds on chain (``settled_elsewhere``)."""
    return ExactEvm(
        chain=rpc,
        chain_id=devnet.chain_id,
        token=devnet.token,
        token_name="USD Coin",
        token_version="2",
        payee=devnet.payee,
        settler="0x" + "0" * 40,
        timeout=390,
        min_validity=0,
    )


async def test_attack_one_transfer_of_the_amount_settles_one_payment_not_two(tmp_path, chain, devnet, settler_key):
    """A payer with two ``exact`` payments of V waiting to settle sends first one transaction of
    its own (through Multicall3): it carries out the first authorization (V to the payee) and
    spends the second one's nonce on an authorization of 1 unit to itself. Both our settlements
    revert. The first was paid by theirs; the second never was — yet the transaction that used
    its nonce holds a transfer of V to the payee (the first one's), and it was settled too: no
    reversal, its surplus final credit the payer could withdraw. (Adversarial review.)"""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund(eth=True)
    value = 10_000
    rpc = Chain(devnet.rpc_url)
    exact = exact_on(rpc, devnet)
    account = credit_account(f"eip155:{devnet.chain_id}", devnet.token, payer.address)
    try:
        async with settler_on(
            store, devnet.rpc_url, settler_key, devnet, settled_elsewhere=exact.settled_elsewhere
        ) as s:
            p1, data1, _ = payment_for(store, devnet, payer, value)
            p2, data2, payload2 = payment_for(store, devnet, payer, value)
            for i, p in enumerate((p1, p2)):  # (each call served, costing 400: the rest is credit)
                store.settle_call_credit(account, deposit=value, held=0, cost=400, call_id=f"c{i}", payment_id=p)
            payee_before = chain.balance(devnet.payee)
            with manual_mining(chain):
                ours = [s.sign(p1, devnet.token, data1), s.sign(p2, devnet.token, data2)]
                await s.run_once()  # broadcast: both wait in the pool
                second, _ = decode_authorization(payload2)
                decoy = eip3009.Authorization(
                    from_=payer.address.lower(),
                    to=payer.address.lower(),
                    value=1,
                    valid_after=0,
                    valid_before=second.valid_before,
                    nonce=second.nonce,
                )
                domain = eip3009.domain_separator("USD Coin", "2", devnet.chain_id, devnet.token)
                signature = bytes(payer.unsafe_sign_hash(eip3009.digest(decoy, domain)).signature)
                token = Web3.to_checksum_address(devnet.token)
                calls = [(token, data1), (token, eip3009.transfer_calldata(decoy, signature))]
                multicall = Web3.to_checksum_address(MULTICALL3_ADDRESS)
                batch = AGGREGATE + abi_encode(["(address,bytes)[]"], [calls])
                theirs = await mined_first(s, chain, payer, multicall, batch, 400_000)
            rows = [await run_until(s, store, p, {PaymentState.SETTLED, PaymentState.FAILED}) for p in (p1, p2)]
    finally:
        await rpc.close()
    assert chain.receipt(theirs)["status"] == 1 and [chain.receipt(h)["status"] for h in ours] == [0, 0]
    assert chain.balance(devnet.payee) - payee_before == value  # one payment of V arrived
    assert rows[0]["state"] == PaymentState.SETTLED and rows[0]["tx_hash"] == theirs
    assert rows[1]["state"] == PaymentState.FAILED
    assert store.credit_balance(account) == value - 800  # what arrived, less the two calls


async def test_a_settlement_priced_under_the_base_fee_is_bumped_until_mined(tmp_path, chain, devnet, settler_key):
    """The base fee rises above what two queued settlements bid: the worker raises their fees
    (same nonces) up to its ceiling, and both are mined — one stuck transaction never stalls the
    ones behind it (finding 8)."""
    base = chain.w3.eth.get_block("latest")["baseFeePerGas"]
    try:
        await bumped_until_mined(tmp_path, chain, devnet, settler_key, base)
    finally:  # (the base fee back where it was: the shared devnet's next tests bid what they always bid)
        chain.w3.provider.make_request("anvil_setNextBlockBaseFeePerGas", [hex(base)])
        chain.mine(1)


async def bumped_until_mined(tmp_path, chain, devnet, settler_key, base: int) -> None:
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    async with settler_on(
        store, devnet.rpc_url, settler_key, devnet, max_fee_gwei=None, fee_ceiling_gwei=Decimal(1000)
    ) as settler:
        settler.bump_after = 0.2
        await settler._refresh_fees()
        with manual_mining(chain):
            ids = []
            for amount in (101, 102):
                payment_id, data, _ = payment_for(store, devnet, payer, amount)
                settler.sign(payment_id, devnet.token, data)
                ids.append(payment_id)
            await settler.run_once()  # sent at today's fees
            first = store.transaction(store.payment(ids[0])["tx_id"])
            high = max(first["max_fee"] * 8, base * 8)
            for _ in range(3):  # the base fee jumps above their cap: blocks come and go without them
                chain.w3.provider.make_request("anvil_setNextBlockBaseFeePerGas", [hex(high)])
                chain.mine(1)
                assert all(store.payment(i)["state"] == PaymentState.SETTLING for i in ids)
            deadline = time.monotonic() + 20
            while store.transaction(store.payment(ids[0])["tx_id"])["max_fee"] < high:
                assert time.monotonic() < deadline, "fees were never bumped over the base fee"
                await asyncio.sleep(0.25)
                await settler.run_once()
            chain.w3.provider.make_request("anvil_setNextBlockBaseFeePerGas", [hex(high)])
            chain.mine(1)
        rows = [await run_until(settler, store, i, {PaymentState.SETTLED, PaymentState.FAILED}) for i in ids]
    assert [r["state"] for r in rows] == [PaymentState.SETTLED, PaymentState.SETTLED]
    bumped = store.transaction(rows[0]["tx_id"])
    assert len(bumped["hashes"].split()) > 1 and bumped["mined_hash"] == rows[0]["tx_hash"]


async def test_fees_stop_at_the_ceiling(tmp_path, chain, devnet, settler_key):
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    async with settler_on(
        store, devnet.rpc_url, settler_key, devnet, max_fee_gwei=Decimal(2), fee_ceiling_gwei=Decimal(3)
    ) as settler:
        settler.bump_after = 0.0
        with manual_mining(chain):
            payment_id, data, _ = payment_for(store, devnet, payer, 9)
            settler.sign(payment_id, devnet.token, data)
            for _ in range(8):
                await settler.run_once()
                settler._polled = 0.0
            tx = store.transaction(store.payment(payment_id)["tx_id"])
        await run_until(settler, store, payment_id, {PaymentState.SETTLED})
    assert tx["max_fee"] == 3 * GWEI and len(tx["hashes"].split()) >= 2


async def test_receipts_are_asked_for_once_per_new_block(tmp_path, chain, devnet, settler_key):
    """While no block comes, polling asks the chain only for its head, not for every open
    transaction's receipt again (on a 12 s chain a 0.25 s poll asked each ~48 times)."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payer = chain.fund()
    rpc = RpcSwitch(devnet.rpc_url)
    with ServerThread(rpc.app()) as proxy:
        async with settler_on(store, proxy.url, settler_key, devnet) as settler:
            payment_id, data, _ = payment_for(store, devnet, payer, 321)
            with manual_mining(chain):
                settler.sign(payment_id, devnet.token, data)
                await settler.run_once()  # broadcast, and a first poll: its receipt is asked for
                for _ in range(5):
                    settler._polled = 0.0  # (a poll is due)
                    await settler.run_once()
                assert rpc.calls.count("eth_blockNumber") == 6  # one per poll
                assert rpc.calls.count("eth_getTransactionReceipt") == 1, rpc.calls
                chain.mine(1)
            row = await run_until(settler, store, payment_id, {PaymentState.SETTLED})
    assert row["state"] == PaymentState.SETTLED


async def test_a_blocks_settlements_are_concluded_in_one_ledger_transaction(tmp_path, chain, devnet, settler_key):
    """A poll concludes every settlement its block mined together — one commit, not one each (a
    commit per settlement was most of the worker's CPU under load) — and still judges each on its
    own: the ones that paid are settled, a reverted one fails, one another replica concluded
    first is left to it."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    payers = [chain.fund() for _ in range(4)]
    broke = Account.create()  # signs an authorization for money it does not have
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        payments = [payment_for(store, devnet, p, 500 + i) for i, p in enumerate([*payers, broke])]
        with manual_mining(chain):
            hashes = [settler.sign(pid, devnet.token, data) for pid, data, _ in payments]
            await settler.run_once()  # broadcast
            chain.mine(1)
            first = store.payment(payments[0][0])  # another replica concludes the first
            [(concluded, settled)] = store.settlements_mined([(first["tx_id"], hashes[0], True, lambda p: True, 0)])
            assert concluded["id"] == first["id"] and settled
            first = store.payment(first["id"])
            transactions = 0
            real_sql = store._sql

            def counted():
                nonlocal transactions
                transactions += 1
                return real_sql()

            store._sql = counted
            settler._polled = 0.0  # (a poll is due)
            await settler.run_once()
            store._sql = real_sql
    states = [store.payment(pid)["state"] for pid, _, _ in payments]
    assert states == [PaymentState.SETTLED] * 4 + [PaymentState.FAILED]
    assert store.payment(first["id"]) == first  # (left as the other replica concluded it)
    assert [chain.receipt(h)["status"] for h in hashes] == [1, 1, 1, 1, 0]
    # the outbox read for queued and for sent rows, the conclusions, the reverted one's failure
    assert transactions == 4, transactions


async def test_a_settlement_the_chain_could_not_judge_is_judged_later(tmp_path, chain, devnet, settler_key):
    """Two settlements of one block revert; while the first is judged (was it paid by someone
    else's transaction?) the chain fails. Neither stays settling for good: the worker looks again
    for settlements mined but not judged, and both fail, their deposits reversed."""
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    outages = [ChainUnavailable("chain RPC unreachable: ConnectError")]
    judged: list[str] = []

    async def settled_elsewhere(payment: dict[str, Any]) -> str | None:
        judged.append(payment["id"])
        if outages:
            raise outages.pop()
        return None

    broke = [Account.create() for _ in range(2)]  # sign for money they do not have
    async with settler_on(store, devnet.rpc_url, settler_key, devnet, settled_elsewhere=settled_elsewhere) as settler:
        payments = [payment_for(store, devnet, b, 300) for b in broke]
        with manual_mining(chain):
            for pid, data, _ in payments:
                settler.sign(pid, devnet.token, data)
            await settler.run_once()  # broadcast
            chain.mine(1)
        settler._polled = 0.0
        await settler.run_once()  # concluded: both reverted; the first's judgment fails, the second's goes on
        states = {pid: store.payment(pid)["state"] for pid, _, _ in payments}
        assert sorted(states.values()) == [PaymentState.FAILED, PaymentState.SETTLING], states
        assert store.open_transactions(TxState.SENT) == []  # (no receipt will bring it back)
        settler._polled, settler._swept = 0.0, float("-inf")  # (a look for stranded ones is due)
        await settler.run_once()
    assert [store.payment(pid)["state"] for pid, _, _ in payments] == [PaymentState.FAILED] * 2
    assert len(judged) == 3


async def test_a_settlement_a_crash_left_unjudged_is_failed_once_by_the_replicas_after_it(
    tmp_path, chain, devnet, settler_key
):
    """A process concludes a reverted settlement and dies before judging it (paid elsewhere, or
    failed?). The two replicas that come after both look for it: the payment fails once, and its
    deposit is reversed once — the move is guarded by the state it leaves."""
    url = f"sqlite:///{tmp_path / 'l.sqlite3'}"
    store = Store(url)
    broke = Account.create()  # signs for money it does not have
    async with settler_on(store, devnet.rpc_url, settler_key, devnet) as settler:
        payment_id, data, _ = payment_for(store, devnet, broke, 400)
        with manual_mining(chain):
            tx_hash = settler.sign(payment_id, devnet.token, data)
            await settler.run_once()  # broadcast
            chain.mine(1)
    assert chain.receipt(tx_hash)["status"] == 0
    tx_id = store.payment(payment_id)["tx_id"]
    [(concluded, settled)] = store.settlements_mined([(tx_id, tx_hash, False, lambda p: False, 0)])  # (then it dies)
    assert concluded["id"] == payment_id and not settled
    assert store.payment(payment_id)["state"] == PaymentState.SETTLING
    replicas = [Store(url), Store(url)]
    async with (
        settler_on(replicas[0], devnet.rpc_url, settler_key, devnet) as a,
        settler_on(replicas[1], devnet.rpc_url, settler_key, devnet) as b,
    ):
        await asyncio.gather(a.run_once(), b.run_once())
    account = credit_account(f"eip155:{devnet.chain_id}", devnet.token.lower(), broke.address.lower())
    assert store.payment(payment_id)["state"] == PaymentState.FAILED
    assert store.journal(account) == {"reversal": -400}  # (once: the payer owes it, as a debt)
