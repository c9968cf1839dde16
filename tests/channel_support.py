"""Helpers of the batch-settlement tests: the official SDK's channel client, and reads of the
gateway's ledger and of the escrow."""

from __future__ import annotations

import time
from typing import Any

import requests
from eth_hash.auto import keccak
from sqlalchemy import text
from x402 import x402ClientSync
from x402.http.clients.requests import x402_requests
from x402.http.utils import decode_payment_response_header
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeOptions,
    InMemoryClientChannelStorage,
)
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

from support import CHAT
from tollway.ledger import Store
from tollway.payments.channel import BATCH_SETTLEMENT_ADDRESS


class Gateway:
    def __init__(self, url: str, store: Store, payee: str) -> None:
        self.url, self.store, self.payee = url, store, payee


class SdkPayer:
    """The official SDK's batch-settlement client on a requests session."""

    def __init__(self, account: Any, devnet) -> None:
        self.account = account
        self.storage = InMemoryClientChannelStorage()
        signer = EthAccountSignerWithRPC(account, devnet.rpc_url)
        self.scheme = BatchSettlementEvmScheme(signer, BatchSettlementEvmSchemeOptions(storage=self.storage))
        client = x402ClientSync().register(f"eip155:{devnet.chain_id}", self.scheme)
        network = f"eip155:{devnet.chain_id}"
        cap = {"network": network, "asset": devnet.token, "max_amount_per_payment": "50000000"}  # (the deposit)
        client.set_spend_controls({"allowed_assets": [cap]})
        self.session = x402_requests(client)

    def call(self, gateway: Gateway, body: dict[str, Any]) -> requests.Response:
        return self.session.post(gateway.url + CHAT, json=body, timeout=30)


def response_extra(response: requests.Response) -> dict[str, Any]:
    return decode_payment_response_header(response.headers["PAYMENT-RESPONSE"]).extra or {}


def wait_for(check, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def ledger(gateway: Gateway, query: str, **params: Any) -> list[tuple[Any, ...]]:
    with gateway.store.engine.connect() as c:
        return [tuple(r) for r in c.execute(text(query), params)]


def payer_channel(gateway: Gateway, payer: str) -> dict[str, Any]:
    (cid,) = ledger(gateway, "SELECT id FROM channels WHERE payer = :payer", payer=payer.lower())[0]
    return gateway.store.channel(cid)  # type: ignore[return-value]


def metered_total(gateway: Gateway, payer: str) -> tuple[int, int]:
    """(calls served, the sum of their metered costs) for one payer."""
    rows = ledger(
        gateway,
        "SELECT COUNT(*), COALESCE(SUM(c.cost), 0) FROM calls c JOIN payments p ON c.payment_id = p.id"
        " WHERE p.payer = :payer AND c.status = 'served'",
        payer=payer.lower(),
    )
    return int(rows[0][0]), int(rows[0][1])


def escrow_channel(chain, channel_id: str) -> tuple[int, int]:
    """(balance, totalClaimed) of a channel on chain."""
    data = keccak(b"channels(bytes32)")[:4] + bytes.fromhex(channel_id[2:])
    raw = chain.w3.eth.call({"to": BATCH_SETTLEMENT_ADDRESS, "data": "0x" + data.hex()})
    return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")
