"""Deploy (or re-attach to) the TestUSDC token on a devnet and describe it as a :class:`Devnet`.

Role convention for the 10 anvil dev accounts (:data:`tollway.devnet.anvil.DEV_KEYS`):

* account 0 - deployer and token owner (mints);
* account 1 - payee, and the settlement key (pays gas for settlements to itself);
* accounts 2..9 - payers.

Every account holds 1,000,000 test USDC after a fresh deploy. The devnet also hosts the x402
canonical Permit2 and upto proxy (:mod:`tollway.devnet.canonical`), and every dev account has a max
Permit2 approval of the token.
"""

from __future__ import annotations

import functools
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import rlp
from eth_account import Account
from eth_utils import keccak, to_canonical_address, to_checksum_address
from pydantic import BaseModel
from web3 import Web3
from web3.contract import Contract

from tollway.devnet.anvil import DEV_KEYS, repo_root
from tollway.devnet.canonical import approve_permit2, install_canonical

TOKEN_NAME = "USD Coin"
TOKEN_VERSION = "2"
TOKEN_DECIMALS = 6
MINT_PER_ACCOUNT = 1_000_000 * 10**TOKEN_DECIMALS
"""Atomic units minted to each dev account on a fresh deploy (1,000,000 USDC)."""

_RECEIPT_POLL_S = 0.01
_MINT_GAS = 120_000


class Devnet(BaseModel):
    """Everything a gateway / test needs to talk to the devnet token."""

    rpc_url: str
    chain_id: int
    token: str
    token_name: str = TOKEN_NAME
    token_version: str = TOKEN_VERSION
    decimals: int = TOKEN_DECIMALS
    deployer_key: str
    settler_key: str
    payee: str
    payer_keys: list[str]

    def save(self, path: str | Path) -> None:
        """Write this description as pretty-printed JSON."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Devnet:
        """Read a description written by :meth:`save`."""
        return cls.model_validate_json(Path(path).read_text())


def _artifact_path(name: str) -> Path:
    """contracts/build/<name>.json of the source checkout, else the packaged copy."""
    root = repo_root()
    if root is not None:
        candidate = root / "contracts" / "build" / f"{name}.json"
        if candidate.is_file():
            return candidate
    packaged = resources.files("tollway.devnet") / "artifacts" / f"{name}.json"
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"contract artifact {name}.json not found in contracts/build/ or tollway/devnet/artifacts/; "
        "run scripts/compile-contracts"
    )


def load_artifact(name: str = "TestUSDC") -> dict[str, Any]:
    """The compiled contract JSON: keys ``contractName, compiler, sourceSha256, abi, bytecode``."""
    return json.loads(_artifact_path(name).read_text())


@functools.cache
def _token_abi() -> list[dict[str, Any]]:
    return load_artifact("TestUSDC")["abi"]


def token_contract(w3: Web3, address: str) -> Contract:
    """A web3 contract object for the TestUSDC at ``address``."""
    return w3.eth.contract(address=to_checksum_address(address), abi=_token_abi())


def create_address(sender: str, nonce: int) -> str:
    """The address of the contract created by ``sender``'s transaction with ``nonce`` (CREATE)."""
    return to_checksum_address(keccak(rlp.encode([to_canonical_address(sender), nonce]))[12:])


def _wait_receipts(w3: Web3, tx_hashes: list[bytes], timeout: float = 30.0) -> None:
    """Poll (fast) until every transaction is mined; raise if any reverted."""
    deadline = time.monotonic() + timeout
    for tx_hash in tx_hashes:
        receipt = w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=max(deadline - time.monotonic(), 0.01), poll_latency=_RECEIPT_POLL_S
        )
        if receipt["status"] != 1:
            raise RuntimeError(f"devnet transaction {Web3.to_hex(tx_hash)} reverted")


def _existing_token(w3: Web3, deployer: str) -> str | None:
    """The token from a previous :func:`deploy_devnet` on this chain, if there is one."""
    address = create_address(deployer, 0)
    if not w3.eth.get_code(address):
        return None
    try:
        name = token_contract(w3, address).functions.name().call()
    except Exception:
        return None
    return address if name == TOKEN_NAME else None


def deploy_devnet(rpc_url: str) -> Devnet:
    """Deploy TestUSDC from account 0 and mint 1,000,000 USDC to all 10 dev accounts.

    Idempotent: if account 0 already deployed a "USD Coin" token at its nonce-0 address on this
    chain, that token is reused as is (nothing is minted). Either way, Permit2 and the x402 upto
    proxy are placed at their canonical addresses and every dev account approves Permit2, where
    not done yet.
    """
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    chain_id = w3.eth.chain_id
    accounts = [Account.from_key(k) for k in DEV_KEYS]
    deployer = accounts[0]

    token = _existing_token(w3, deployer.address)
    if token is None:
        token = _deploy_and_mint(w3, chain_id, deployer, [a.address for a in accounts])
    install_canonical(w3)
    approve_permit2(w3, token, DEV_KEYS)

    return Devnet(
        rpc_url=rpc_url,
        chain_id=chain_id,
        token=token,
        deployer_key=DEV_KEYS[0],
        settler_key=DEV_KEYS[1],
        payee=accounts[1].address,
        payer_keys=list(DEV_KEYS[2:]),
    )


def _deploy_and_mint(w3: Web3, chain_id: int, deployer: Any, recipients: list[str]) -> str:
    nonce = w3.eth.get_transaction_count(deployer.address, "pending")
    base_fee = w3.eth.get_block("latest").get("baseFeePerGas", 0)
    tip = 10**9
    fees = {"maxFeePerGas": 2 * base_fee + tip, "maxPriorityFeePerGas": tip}
    bytecode = load_artifact("TestUSDC")["bytecode"]

    def send(tx: dict[str, Any]) -> bytes:
        signed = deployer.sign_transaction({"chainId": chain_id, "type": 2, **fees, **tx})
        return w3.eth.send_raw_transaction(signed.raw_transaction)

    deploy_gas = w3.eth.estimate_gas({"from": deployer.address, "data": bytecode})
    deploy_tx = send({"nonce": nonce, "gas": deploy_gas + deploy_gas // 5, "data": bytecode, "value": 0})
    token = create_address(deployer.address, nonce)

    contract = token_contract(w3, token)
    tx_hashes = [deploy_tx]
    for i, recipient in enumerate(recipients, start=1):
        data = contract.encode_abi("mint", args=[recipient, MINT_PER_ACCOUNT])
        tx_hashes.append(send({"nonce": nonce + i, "gas": _MINT_GAS, "to": token, "data": data, "value": 0}))
    _wait_receipts(w3, tx_hashes)
    return token
