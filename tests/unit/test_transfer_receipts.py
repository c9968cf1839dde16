"""A transfer's receipt as a node may send it: none yet, malformed, or another transaction's — each a
payment refused (402) or the chain down (503), never believed and never a 500."""

from __future__ import annotations

from typing import Any

import pytest

from tollway.errors import ChainUnavailable, PaymentInvalid
from tollway.payments.chain import TRANSFER_TOPIC
from tollway.payments.transfer import HashCharge

TOKEN, PAYEE, PAYER = "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20
TX = "0x" + "ab" * 32


class Node:
    """A chain whose head is block 100 and whose receipt of any transaction is ``receipt``."""

    def __init__(self, receipt: Any) -> None:
        self.receipt = receipt

    async def batch(self, calls: list, errors: bool = False) -> list:
        return [self.receipt, "0x64"]


def receipt(**changed: Any) -> dict[str, Any]:
    def word(address: str) -> str:
        return "0x" + "00" * 12 + address[2:]

    log = {"address": TOKEN, "topics": [TRANSFER_TOPIC, word(PAYER), word(PAYEE)], "data": hex(5_000)}
    doc = {"status": "0x1", "from": PAYER, "blockNumber": "0x10", "blockHash": "0x" + "cd" * 32}
    return {**doc, "transactionHash": TX, "logs": [log], **changed}


def hash_charge(answer: Any) -> HashCharge:
    return HashCharge(chain=Node(answer), chain_id=8453, token=TOKEN, payee=PAYEE, confirmations=10, timeout=60)


async def test_a_well_formed_receipt_pays():
    assert (await hash_charge(receipt()).paid_by(TX, None)).amount == 5_000


@pytest.mark.parametrize(
    "answer",
    [
        receipt(blockNumber=None),  # (what some nodes answer for a transaction still pending)
        {k: v for k, v in receipt().items() if k != "blockNumber"},
        receipt(status=None),
        ["not", "a", "receipt"],
        receipt(transactionHash="0x" + "ee" * 32),  # (another transaction's: a node in trouble)
        receipt(blockHash=None),
    ],
    ids=["block-null", "no-block", "status-null", "not-a-dict", "another-transaction", "no-block-hash"],
)
async def test_a_receipt_a_node_got_wrong_is_refused_or_an_outage(answer):
    with pytest.raises((PaymentInvalid, ChainUnavailable)):
        await hash_charge(answer).paid_by(TX, None)


async def test_a_hash_credential_pays_by_its_transfer_alone():
    """Whoever presents a transaction's hash is not its sender: the sender's credit does not make up
    what the transfer lacks (the transfer stays for its sender to claim)."""
    from tollway.payments.base import Proof, Quote

    def quote(amount: int) -> Quote:
        return Quote(model="m", amount=amount, request_digest="d", expires=0, prompt_bound=1, max_tokens=1)

    proof = Proof(2, "mpp-hash", "eip155:8453", {"type": "hash", "hash": TX}, rail="mpp")
    with pytest.raises(PaymentInvalid, match="by its transfer alone"):
        await hash_charge(receipt()).verify(proof, None, quote(5_001), 0)  # type: ignore[arg-type]
    assert (await hash_charge(receipt()).verify(proof, None, quote(5_000), 0)).amount == 5_000  # type: ignore[arg-type]
