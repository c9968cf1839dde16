"""Async JSON-RPC access to an EVM chain: the few reads and writes the gateway needs.

A thin client rather than web3's async provider: the hot path makes one batched round trip
(balance + authorization state) and nothing else. It speaks HTTP through aiohttp (already
installed with web3): a JSON-RPC exchange costs about 180 µs of CPU there against 650 µs through
httpx on the reference machine, and it runs on every paid call (scripts/bench, README). Transport
and JSON-RPC failures are translated here, where they enter, into ``ChainUnavailable`` /
``RpcError``.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import aiohttp
from eth_hash.auto import keccak

from ..errors import ChainUnavailable

BALANCE_OF = keccak(b"balanceOf(address)")[:4]
AUTHORIZATION_STATE = keccak(b"authorizationState(address,bytes32)")[:4]
TRANSFER_TOPIC = "0x" + keccak(b"Transfer(address,address,uint256)").hex()


class RpcError(ChainUnavailable):
    """The node answered with a JSON-RPC error (the request reached it). On the request path it
    is an outage like any other (503); the settlement worker reads ``rpc_code``/``message``."""

    def __init__(self, code: int, message: str):
        super().__init__(f"chain RPC error {code}: {message}")
        self.rpc_code = code
        self.message = message


def _addr_word(addr: str) -> str:
    return "0" * 24 + addr.lower().removeprefix("0x")


class Chain:
    def __init__(self, rpc_url: str, read_cache_seconds: float = 2.0, timeout: float = 10.0):
        self.url = rpc_url
        self.read_cache_seconds = read_cache_seconds
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=3.0)
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._balances: dict[tuple[str, str], tuple[float, int]] = {}  # → (read at, UNIX time; balance)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, payload: Any) -> Any:
        if self._session is None:  # made on first use: it belongs to the running event loop
            self._session = aiohttp.ClientSession(timeout=self.timeout, connector=aiohttp.TCPConnector(limit=64))
        try:
            async with self._session.post(self.url, json=payload) as resp:
                resp.raise_for_status()
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ChainUnavailable(f"chain RPC unreachable: {type(exc).__name__}") from exc

    @staticmethod
    def _result(reply: Any) -> Any:
        if not isinstance(reply, dict):
            raise ChainUnavailable("chain RPC sent a malformed reply")
        if reply.get("error"):
            err = reply["error"]
            raise RpcError(int(err.get("code", 0)), str(err.get("message", err)))
        return reply.get("result")

    async def request(self, method: str, params: list[Any]) -> Any:
        return self._result(
            await self._post({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params})
        )

    async def batch(self, calls: list[tuple[str, list[Any]]], *, errors: bool = False) -> list[Any]:
        """Several calls in one round trip. A call's JSON-RPC error raises, or with ``errors=True``
        takes its place in the results as an ``RpcError``."""
        first = next(self._ids)
        payload = [{"jsonrpc": "2.0", "id": first + i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
        for _ in calls[1:]:
            next(self._ids)
        replies = await self._post(payload)
        if not isinstance(replies, list) or len(replies) != len(calls):
            raise ChainUnavailable("chain RPC sent a malformed batch reply")
        by_id = {r.get("id"): r for r in replies if isinstance(r, dict)}
        results: list[Any] = []
        for i in range(len(calls)):
            try:
                results.append(self._result(by_id.get(first + i)))
            except RpcError as exc:
                if not errors:
                    raise
                results.append(exc)
        return results

    async def chain_id(self) -> int:
        return int(await self.request("eth_chainId", []), 16)

    async def token_state(self, token: str, holder: str, nonce: bytes) -> tuple[int, bool, float]:
        """(balance of ``holder``, whether its authorization ``nonce`` is used, when the balance was
        read), in one round trip. The balance is cached for ``read_cache_seconds``; the nonce never is."""
        key = (token, holder)
        cached = self._balances.get(key)
        auth_call = {"to": token, "data": "0x" + AUTHORIZATION_STATE.hex() + _addr_word(holder) + nonce.hex()}
        if cached and time.time() - cached[0] < self.read_cache_seconds:
            used = await self.request("eth_call", [auth_call, "latest"])
            return cached[1], int(used, 16) != 0, cached[0]
        read_at = time.time()
        bal_call = {"to": token, "data": "0x" + BALANCE_OF.hex() + _addr_word(holder)}
        balance, used = await self.batch([("eth_call", [bal_call, "latest"]), ("eth_call", [auth_call, "latest"])])
        bal = int(balance, 16)
        if len(self._balances) > 10_000:
            self._balances.clear()
        self._balances[key] = (read_at, bal)
        return bal, int(used, 16) != 0, read_at

    def forget_balance(self, token: str, holder: str) -> None:
        self._balances.pop((token, holder), None)

    async def pending_nonce(self, address: str) -> int:
        return int(await self.request("eth_getTransactionCount", [address, "pending"]), 16)

    async def base_fee(self) -> int:
        block = await self.request("eth_getBlockByNumber", ["latest", False])
        return int(block.get("baseFeePerGas", "0x0"), 16)

    async def send_raw(self, raw_tx: str) -> str:
        return str(await self.request("eth_sendRawTransaction", [raw_tx]))

    async def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        return await self.request("eth_getTransactionReceipt", [tx_hash])


def transfers_in(receipt: dict[str, Any], token: str) -> list[tuple[str, str, int]]:
    """The ERC-20 ``Transfer`` events of ``token`` in a receipt, as (from, to, value)."""
    out = []
    for log in receipt.get("logs") or []:
        topics = log.get("topics") or []
        if (
            str(log.get("address", "")).lower() == token.lower()
            and len(topics) == 3
            and str(topics[0]).lower() == TRANSFER_TOPIC
        ):
            out.append(("0x" + topics[1][-40:].lower(), "0x" + topics[2][-40:].lower(), int(log["data"], 16)))
    return out
