"""A settlement's receipt as a node may send it: one whose block number is missing, not a number or
beyond the chain's head concludes like any other (its credit final by the head), and holds up no
other settlement of the same poll."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from eth_account import Account

from tollway.ledger import PaymentState, Store
from tollway.ledger.store import NotFinal, credit_account
from tollway.payments.chain import TRANSFER_TOPIC
from tollway.settlement import Settler, receipt_status

NETWORK, TOKEN, PAYER, PAYEE = "eip155:31337", "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20
ACCOUNT = credit_account(NETWORK, TOKEN, PAYER)
SIGNED = {"to": TOKEN, "data": "0x", "gas": 1, "max_fee": 2, "tip": 1, "raw_tx": "0x"}


def settling(store: Store, sender: str) -> tuple[dict, str]:
    """A payment of 5 settling by a transaction of ``sender``'s: (its outbox row, its id)."""
    row = {
        "lock_key": uuid.uuid4().hex, "scheme": "exact", "network": NETWORK, "asset": TOKEN,
        "payer": PAYER, "payee": PAYEE, "amount": 5, "proof": "{}", "request_digest": "d",
    }  # fmt: skip
    pid = store.reserve(row)
    tx = store.sign_settlement(pid, sender, lambda n: {**SIGNED, "tx_hash": "0x" + uuid.uuid4().hex})
    assert tx is not None
    return store.transaction(tx["id"]), pid


def receipt(tx: dict, number: object) -> dict:
    def word(address: str) -> str:
        return "0x" + "00" * 12 + address[2:]

    log = {"address": TOKEN, "topics": [TRANSFER_TOPIC, word(PAYER), word(PAYEE)], "data": hex(5)}
    return {
        "blockHash": "0x" + "ab" * 32,
        "transactionHash": tx["tx_hash"],
        "status": "0x1",
        "blockNumber": number,
        "logs": [log],
    }


@pytest.mark.parametrize("number", [None, "pending", "0x" + "f" * 20])
async def test_a_receipt_with_an_odd_block_number_concludes_and_holds_up_no_other(tmp_path, number):
    store = Store(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    settler = Settler(
        store,
        None,  # type: ignore[arg-type]  # (no chain: the receipts are handed over as a poll would)
        key="0x" + Account.create().key.hex(),
        chain_id=31337,
        gas_limit=100_000,
        max_fee_gwei=None,
        priority_fee_gwei=Decimal(1),
        confirmations=3,
    )
    store.sync_settler_nonce(settler.address, 0)
    (odd_tx, odd), (good_tx, good) = settling(store, settler.address), settling(store, settler.address)
    assert receipt_status(receipt(odd_tx, number), odd_tx["tx_hash"]) == 1  # (a mined success, as it says)
    await settler._conclude(
        [(odd_tx, odd_tx["tx_hash"], receipt(odd_tx, number)), (good_tx, good_tx["tx_hash"], receipt(good_tx, "0x10"))],
        head=40,
    )
    assert store.payment(odd)["state"] == store.payment(good)["state"] == PaymentState.SETTLED
    store.settle_call_credit(ACCOUNT, deposit=10, held=0, cost=0, call_id="c", payment_id=None)
    with pytest.raises(NotFinal) as refused:  # (by the head, not the odd number: final at block 43)
        store.request_payout(ACCOUNT, PAYER, 1, uuid.uuid4().hex, head=42)
    assert refused.value.block == 43
