"""Place the x402 canonical contracts on a devnet: Permit2, the x402 upto Permit2 proxy, the
batch-settlement escrow with its two deposit collectors, and Multicall3.

The x402 SDK hardcodes their addresses (the same on every real chain), so on anvil they are put
there with ``anvil_setCode`` (our own compatible builds: ``contracts/Permit2.sol``,
``contracts/X402UptoPermit2Proxy.sol``, ``contracts/X402BatchSettlement.sol``,
``contracts/ERC3009DepositCollector.sol``, ``contracts/Permit2DepositCollector.sol`` and
``contracts/Multicall3.sol``; no constructor runs, and none needs storage set). The SDK's
batch-settlement facilitator reads channel state through Multicall3's ``tryAggregate``, which a
bare anvil lacks. Then a payer needs a one-time ERC-20 approval of Permit2 (or an EIP-2612 permit at
settlement) for the Permit2 paths.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from eth_account import Account
from eth_utils import to_checksum_address
from web3 import Web3

from tollway.payments.channel import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
)
from tollway.payments.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS

MAX_UINT256 = 2**256 - 1
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"
CANONICAL: dict[str, str] = {
    PERMIT2_ADDRESS: "Permit2",
    UPTO_PROXY_ADDRESS: "X402UptoPermit2Proxy",
    BATCH_SETTLEMENT_ADDRESS: "X402BatchSettlement",
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS: "ERC3009DepositCollector",
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS: "Permit2DepositCollector",
    MULTICALL3_ADDRESS: "Multicall3",
}
"""Canonical address → the artifact (``contracts/build/<name>.json``) whose runtime code goes there."""

_APPROVE_GAS = 60_000
_ERC20_ABI = [
    {
        "type": "function",
        "name": "approve",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "spender", "type": "address"}, {"name": "amount", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "type": "function",
        "name": "allowance",
        "stateMutability": "view",
        "inputs": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
]


def _web3(w3_or_url: Web3 | str) -> Web3:
    if isinstance(w3_or_url, Web3):
        return w3_or_url
    return Web3(Web3.HTTPProvider(w3_or_url, request_kwargs={"timeout": 30}))


@functools.cache
def runtime_code(name: str) -> bytes:
    """The deployed (runtime) bytecode of a compiled contract."""
    from tollway.devnet.deploy import load_artifact  # (deploy imports this module)

    return bytes.fromhex(load_artifact(name)["deployedBytecode"][2:])


def install_canonical(w3_or_url: Web3 | str, *, replace: bool = False) -> list[str]:
    """Put every :data:`CANONICAL` contract at its canonical address; the addresses written.

    Idempotent: an address already holding our code is skipped. An address holding some *other*
    code (a fork of a real chain has the real contracts) is left alone unless ``replace``.
    """
    w3 = _web3(w3_or_url)
    written = []
    for address, name in CANONICAL.items():
        code = runtime_code(name)
        present = bytes(w3.eth.get_code(address))
        if present == code or (present and not replace):
            continue
        w3.provider.make_request("anvil_setCode", [address, "0x" + code.hex()])
        if bytes(w3.eth.get_code(address)) != code:
            raise RuntimeError(f"anvil_setCode did not place {name} at {address} (is this an anvil?)")
        written.append(address)
    return written


def approve_permit2(w3_or_url: Web3 | str, token: str, keys: Iterable[str], *, timeout: float = 30.0) -> list[str]:
    """Give each account (by private key) a max ``approve(PERMIT2, 2**256-1)`` on ``token``; the accounts
    that needed one. Accounts already approved for at least 2**255 are skipped. Each account pays its
    own gas (dev accounts hold ETH)."""
    w3 = _web3(w3_or_url)
    contract = w3.eth.contract(address=to_checksum_address(token), abi=_ERC20_ABI)
    chain_id = w3.eth.chain_id
    base_fee = w3.eth.get_block("latest").get("baseFeePerGas", 0)
    tip = 10**9
    fees = {"maxFeePerGas": 2 * base_fee + tip, "maxPriorityFeePerGas": tip}
    data = contract.encode_abi("approve", args=[PERMIT2_ADDRESS, MAX_UINT256])
    approved: list[str] = []
    tx_hashes: list[Any] = []
    for key in keys:
        account = Account.from_key(key)
        if contract.functions.allowance(account.address, PERMIT2_ADDRESS).call() >= 2**255:
            continue
        tx = {
            "chainId": chain_id,
            "type": 2,
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
            "gas": _APPROVE_GAS,
            "to": contract.address,
            "data": data,
            "value": 0,
            **fees,
        }
        tx_hashes.append(w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction))
        approved.append(account.address)
    for tx_hash in tx_hashes:
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout, poll_latency=0.01)
        if receipt["status"] != 1:
            raise RuntimeError(f"Permit2 approval {Web3.to_hex(tx_hash)} reverted")
    return approved
