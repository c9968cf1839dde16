"""Helpers shared by the integration and e2e tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn
from eth_account import Account
from web3 import Web3

from tollway.devnet.deploy import Devnet, token_contract


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """An ASGI app served by uvicorn on a real port, in a thread with its own event loop."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Chain:
    """Synchronous web3 access for assertions on balances and transactions."""

    def __init__(self, devnet: Devnet) -> None:
        self.devnet = devnet
        self.w3 = Web3(Web3.HTTPProvider(devnet.rpc_url))
        self.token = token_contract(self.w3, devnet.token)
        self.owner = Account.from_key(devnet.deployer_key)

    def balance(self, who: str) -> int:
        return int(self.token.functions.balanceOf(Web3.to_checksum_address(who)).call())

    def fund(self, amount: int = 100_000_000, eth: bool = False) -> Any:
        """A fresh payer account holding ``amount`` test USDC (and ETH for gas only if asked:
        x402 payments are gasless)."""
        account = Account.create()
        if eth:
            self.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**18)])
        tx = self.token.functions.mint(account.address, amount).build_transaction(
            {
                "from": self.owner.address,
                "nonce": self.w3.eth.get_transaction_count(self.owner.address, "pending"),
                "gas": 100_000,
            }
        )
        signed = self.owner.sign_transaction(tx)
        self.w3.eth.wait_for_transaction_receipt(
            self.w3.eth.send_raw_transaction(signed.raw_transaction), poll_latency=0.01
        )
        return account

    def transfer(self, account: Any, to: str, amount: int, gas: int | None = None) -> str:
        """Send ``amount`` of the token from ``account`` in an ordinary transaction; its hash once mined."""
        params: dict[str, Any] = {"from": account.address, "nonce": self.w3.eth.get_transaction_count(account.address)}
        if gas:
            params["gas"] = gas
        tx = self.token.functions.transfer(Web3.to_checksum_address(to), amount).build_transaction(params)
        tx_hash = self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
        self.w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.01)
        return "0x" + bytes(tx_hash).hex()

    def mine(self, blocks: int) -> None:
        self.w3.provider.make_request("anvil_mine", [hex(blocks)])

    def receipt(self, tx_hash: str) -> Any:
        return self.w3.eth.get_transaction_receipt(tx_hash)


def wait_receipt(gateway_url: str, receipt_id: str, *, state: str = "settled", timeout: float = 15.0) -> dict[str, Any]:
    """Poll the gateway's receipt until its payment reaches ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        doc = httpx.get(f"{gateway_url}/v1/receipts/{receipt_id}").json()
        if doc.get("payment", {}).get("state") == state:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"receipt {receipt_id} never reached {state}: {doc}")
        time.sleep(0.02)


async def await_receipt(gateway_url: str, receipt_id: str, **kw: Any) -> dict[str, Any]:
    return await asyncio.to_thread(wait_receipt, gateway_url, receipt_id, **kw)
