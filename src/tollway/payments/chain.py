"""Async JSON-RPC access to an EVM chain: the few reads and writes the gateway needs.

A thin client rather than web3's async provider: the hot path makes one batched round trip
(the payment's transfer simulated against the pending state, with the payer's balance) and
nothing else. The request path and the settlement worker each have their own client (and
connection pool), so that requests cannot starve settlement. It speaks HTTP through the gateway's
own transport (``upstream/h1.py``: asyncio + httptools), handed an httpx request directly: a
JSON-RPC exchange costs ~0.1 ms of CPU there, ~0.2 ms through aiohttp, ~0.65 ms through httpx's
own client — and it runs on every exact and upto call. Transport and JSON-RPC failures are
translated here, where they enter, into ``ChainUnavailable`` / ``RpcError``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import ChainUnavailable
from ..jsonbytes import dumps, loads
from ..keccak import keccak
from ..upstream.h1 import h1_transport

BALANCE_OF = keccak(b"balanceOf(address)")[:4]
AUTHORIZATION_STATE = keccak(b"authorizationState(address,bytes32)")[:4]
DOMAIN_SEPARATOR = keccak(b"DOMAIN_SEPARATOR()")[:4]
TRANSFER_TOPIC = "0x" + keccak(b"Transfer(address,address,uint256)").hex()
AUTHORIZATION_USED_TOPIC = "0x" + keccak(b"AuthorizationUsed(address,bytes32)").hex()
MAX_GROUP = 64  # simulations in one eth_simulateV1: their gas under nodes' 50M RPC gas cap, a batch under size limits
SIMULATE_V1_TRIES = 3  # eth_simulateV1 failures in a row (the calls then answering one by one) before it is dropped
ANVIL_FAILED = -3200  # anvil 1.7's code for a failed simulated call: a revert if it left revert data (else out of gas)
ERROR_STRING = bytes.fromhex("08c379a0")  # Error(string), what require(..., "reason") reverts with

BATCH_LIMIT = 256  # calls per JSON-RPC batch (geth and most providers cap a batch at 1,000)
LOG_RANGE = 1_000  # blocks per eth_getLogs at first (hosted RPCs cap a query's range: 100 to 10,000, by provider)
LEAST_LOG_RANGE = 10  # halved down to this on a refusal (a node refusing a narrower range refuses for another reason)
# What a hosted RPC's refusal of too wide an eth_getLogs says, in its own words: "exceeds max block
# range 500", "block range is too wide", "limited to a 10000 range", "Log response size exceeded",
# "query returned more than 10000 results", "Max range exceeded"
RANGE_REFUSAL = ("range", "limit", "exceed", "too ", "more than", "size")
# ... unless they speak of the caller's capacity ("exceeded its compute units per second capacity",
# "daily request limit exceeded"): a narrower query would be refused as well, and the range stay halved
CAPACITY_REFUSAL = ("rate", "compute unit", "capacity", "quota", "credit", "daily", "many requests", "throughput")


class RpcError(ChainUnavailable):
    """The node answered with a JSON-RPC error (the request reached it). On the request path it
    is an outage like any other (503); the settlement worker reads ``rpc_code``/``message``."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"chain RPC error {code}: {message}")
        self.rpc_code = code
        self.message = message
        self.data = data

    @property
    def revert_reason(self) -> str | None:
        """The reason string of a reverted ``eth_call``, if it reverted with one."""
        data = self.data if isinstance(self.data, str) else ""
        raw = bytes.fromhex(data[2:]) if data.startswith("0x") and len(data) % 2 == 0 else b""
        if raw[:4] == ERROR_STRING and len(raw) >= 68:
            length = int.from_bytes(raw[36:68], "big")
            return raw[68 : 68 + length].decode(errors="replace")
        if "revert" in self.message.lower():
            return self.message.split(":", 1)[-1].strip()
        return None


def _v1_call_result(c: dict[str, Any]) -> Any:
    """One call of an ``eth_simulateV1`` answer as ``eth_call`` answers it: its return data, or an
    ``RpcError`` — a revert (code 3, with its revert data, which geth and reth give in
    ``error.data``, anvil 1.7 in ``returnData``), or another failure (out of gas, -32015: the node's,
    not the payment's refusal — a 503, as ``eth_call`` running out of gas is)."""
    if int(str(c["status"]), 16) == 1:
        return str(c["returnData"])
    err = c.get("error") if isinstance(c.get("error"), dict) else {}
    data = err.get("data") or c.get("returnData")
    code = int(err.get("code", 3))
    if code == 3 or (code == ANVIL_FAILED and data not in (None, "0x")):
        return RpcError(3, "execution reverted", data)
    return RpcError(code, str(err.get("message", ""))[:500])


def _addr_word(addr: str) -> str:
    return "0" * 24 + addr.lower().removeprefix("0x")


@dataclass
class Simulation:
    """One payment's simulation, waiting for the group it went with."""

    tx: dict[str, str]
    reads: list[tuple[str, bytes]]
    answer: asyncio.Future[tuple[Any, list[Any]]]


POOL = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=4.0)
HEADERS = {"content-type": "application/json", "accept": "application/json"}


class Chain:
    def __init__(self, rpc_url: str, timeout: float = 10.0, *, simulation_gas: int | None = None):
        """``simulation_gas``: what a simulated transaction may burn — the gas its transaction will be
        sent with (so that none of a group simulated together can take the others' gas)."""
        self.url = rpc_url
        self.simulation_gas = simulation_gas
        self._url = httpx.URL(str(rpc_url))
        self.total = timeout  # the most one exchange may take, from the connect to the reply's last byte
        self._timeouts = httpx.Timeout(timeout, connect=3.0).as_dict()
        self._transport = h1_transport(POOL)
        self._ids = itertools.count(1)
        self._simulations: list[Simulation] = []  # asked in this turn of the event loop
        self._sending: set[asyncio.Task[None]] = set()
        self._v1_failures = 0  # eth_simulateV1 failures in a row (SIMULATE_V1_TRIES: it is not asked again)
        self.log_range = LOG_RANGE  # blocks per eth_getLogs: halved each time the node refuses one

    @property
    def simulate_v1(self) -> bool:
        """Whether several simulations are sent as one ``eth_simulateV1``: until the node has
        failed it ``SIMULATE_V1_TRIES`` times in a row, or said it does not know the method."""
        return self._v1_failures < SIMULATE_V1_TRIES

    async def close(self) -> None:
        for s in self._simulations:
            if not s.answer.done():  # (its request may have gone already)
                s.answer.set_exception(ChainUnavailable("the chain client closed"))
        self._simulations = []
        for task in list(self._sending):
            task.cancel()
        await self._transport.aclose()

    async def _post(self, payload: Any) -> Any:
        content = dumps(payload)
        timeout = {"timeout": self._timeouts}
        request = httpx.Request("POST", self._url, content=content, headers=HEADERS, extensions=timeout)
        try:
            async with asyncio.timeout(self.total):
                resp = await self._transport.handle_async_request(request)
                try:
                    body = b"".join([part async for part in resp.stream])  # type: ignore[union-attr]
                finally:
                    await resp.aclose()
            if resp.status_code >= 400:
                raise ChainUnavailable(f"chain RPC answered HTTP {resp.status_code}")
            return loads(body)
        except (httpx.HTTPError, TimeoutError, ValueError, RecursionError) as exc:
            raise ChainUnavailable(f"chain RPC unreachable: {type(exc).__name__}") from exc

    @staticmethod
    def _result(reply: Any) -> Any:
        if not isinstance(reply, dict):
            raise ChainUnavailable("chain RPC sent a malformed reply")
        if reply.get("error"):
            err = reply["error"]
            if not isinstance(err, dict):
                raise RpcError(0, str(err)[:200])
            try:
                code = int(err.get("code", 0))
            except (TypeError, ValueError):
                code = 0
            raise RpcError(code, str(err.get("message", ""))[:500], err.get("data"))
        return reply.get("result")

    async def request(self, method: str, params: list[Any]) -> Any:
        return self._result(
            await self._post({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params})
        )

    async def batch(self, calls: list[tuple[str, list[Any]]], *, errors: bool = False) -> list[Any]:
        """Several calls in one round trip (one per ``BATCH_LIMIT`` of them: nodes cap a batch). A
        call's JSON-RPC error raises, or with ``errors=True`` takes its place in the results as an
        ``RpcError``."""
        if len(calls) > BATCH_LIMIT:
            chunks = [calls[i : i + BATCH_LIMIT] for i in range(0, len(calls), BATCH_LIMIT)]
            return [r for chunk in chunks for r in await self.batch(chunk, errors=errors)]
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
        return quantity(await self.request("eth_chainId", []))

    async def simulate(
        self, sender: str, to: str, data: bytes, reads: list[tuple[str, bytes]]
    ) -> tuple[Any, list[Any]]:
        """Run a transaction as ``eth_call`` from ``sender`` against the chain's pending state (the
        freshest it offers: what the payer has broadcast since counts against it), with some
        ``eth_call`` reads (to, calldata) of the *mined* state, in one round trip. Returns (the
        call's result or its ``RpcError``, the reads' results).

        The reads are balances compared with what the ledger says is owed but not yet mined —
        our own settlements, broadcast or not; at ``pending`` those in the mempool would count
        twice (and refuse payers who can pay).

        A node replays its pending pool for every read of the pending state (anvil: 15–130 µs a
        pooled transaction, each time), so the simulations asked in one turn of the event loop —
        concurrent payments, under load — go together (up to ``MAX_GROUP``): one round trip, and
        one ``eth_simulateV1`` of them all, in order, on one pending state (a later payment of the
        same payer sees the earlier one spent). None waits for another: a simulation alone leaves
        at the next turn, as a plain ``eth_call``."""
        loop = asyncio.get_running_loop()
        tx = {"from": sender, "to": to, "data": "0x" + data.hex()}
        if self.simulation_gas is not None:
            tx["gas"] = hex(self.simulation_gas)
        asked = Simulation(tx, reads, loop.create_future())
        if self._simulations and self._simulations[0].answer.get_loop() is not loop:
            self._simulations = []  # (asked in an event loop that stopped before they could leave)
        self._simulations.append(asked)
        if len(self._simulations) == 1:
            loop.call_soon(self._send_simulations)
        return await asked.answer

    def _send_simulations(self) -> None:
        group, self._simulations = self._simulations, []
        loop = asyncio.get_running_loop()
        for i in range(0, len(group), MAX_GROUP):
            task = loop.create_task(self._simulate_together(group[i : i + MAX_GROUP]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _simulate_together(self, group: list[Simulation]) -> None:
        """Answer each simulation of ``group``: its result, or the error of its reads — and every
        one of them, whatever happens (an outage, a malformed reply, this task cancelled)."""
        try:
            results, reads = await self._ask_node(group)
            at = 0
            for s, result in zip(group, results, strict=True):
                mine, at = reads[at : at + len(s.reads)], at + len(s.reads)
                failed = next((r for r in mine if isinstance(r, RpcError)), None)
                if s.answer.done():  # (its request went away)
                    continue
                if failed is not None:
                    s.answer.set_exception(failed)
                else:
                    s.answer.set_result((result, mine))
        except BaseException as exc:
            for s in group:
                if not s.answer.done():
                    s.answer.set_exception(exc if isinstance(exc, Exception) else ChainUnavailable("cancelled"))
            if not isinstance(exc, Exception):
                raise

    async def _ask_node(self, group: list[Simulation]) -> tuple[list[Any], list[Any]]:
        """(each simulation's result or ``RpcError``, the reads' results in order): one
        ``eth_simulateV1`` of them all when there are several and the node has it, else one
        ``eth_call`` each — also when the ``eth_simulateV1`` fails, whatever the reason."""
        reads = [("eth_call", [{"to": t, "data": "0x" + d.hex()}, "latest"]) for s in group for t, d in s.reads]
        tried_v1 = len(group) > 1 and self.simulate_v1
        if tried_v1:
            block = {"blockStateCalls": [{"calls": [s.tx for s in group]}]}
            try:
                answers = await self.batch([("eth_simulateV1", [block, "pending"]), *reads], errors=True)
                results = self._v1_results(answers[0], len(group))
            except ChainUnavailable:  # (an HTTP error, a malformed or truncated reply)
                results = None
            if results is not None:
                self._v1_failures = 0
                return results, answers[1:]
        answers = await self.batch([*(("eth_call", [s.tx, "pending"]) for s in group), *reads], errors=True)
        if tried_v1:  # it failed, and one by one they answer
            self._v1_failures += 1
        return answers[: len(group)], answers[len(group) :]

    def _v1_results(self, answer: Any, n: int) -> list[Any] | None:
        """Each call's ``eth_call`` result (or ``RpcError``) from an ``eth_simulateV1`` answer;
        None if the node refused it (a node that does not know the method is not asked again);
        raises ``ChainUnavailable`` if it is malformed."""
        if isinstance(answer, RpcError):
            if answer.rpc_code == -32601:  # (the node does not know it: not asked again)
                self._v1_failures = SIMULATE_V1_TRIES
            return None
        try:
            calls = answer[0]["calls"]
            if not isinstance(calls, list) or len(calls) != n:
                raise ValueError("not one answer per call")
            return [_v1_call_result(c) for c in calls]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ChainUnavailable("chain RPC sent a malformed eth_simulateV1 reply") from exc

    async def call(self, to: str, data: bytes, block: str = "latest") -> bytes:
        result = await self.request("eth_call", [{"to": to, "data": "0x" + data.hex()}, block])
        return bytes.fromhex(str(result)[2:])

    async def token_balance(self, token: str, holder: str, block: str = "latest") -> int:
        """What ``holder`` holds of the ERC-20 ``token``, as of ``block``."""
        return int.from_bytes(await self.call(token, BALANCE_OF + bytes(12) + bytes.fromhex(holder[2:]), block), "big")

    async def head(self) -> int:
        """The latest block's number."""
        return quantity(await self.request("eth_blockNumber", []))

    async def mined_nonce(self, address: str) -> int:
        """The nonce of ``address``'s next transaction as far as mined blocks say (not its pending
        ones: a transaction waiting in a node's pool may be dropped, and its nonce never used)."""
        return quantity(await self.request("eth_getTransactionCount", [address, "latest"]))

    async def base_fee(self) -> int:
        """The latest block's base fee (0 on a chain without EIP-1559)."""
        block = await self.request("eth_getBlockByNumber", ["latest", False])
        if not isinstance(block, dict):
            raise ChainUnavailable("chain RPC sent no latest block")
        return quantity(block.get("baseFeePerGas") or "0x0")

    async def send_raw(self, raw_tx: str) -> str:
        return str(await self.request("eth_sendRawTransaction", [raw_tx]))

    async def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        return await self.request("eth_getTransactionReceipt", [tx_hash])

    async def logs(self, address: str, topics: list[str | None], lookback: int) -> AsyncIterator[dict[str, Any]]:
        """Logs of ``address`` matching ``topics`` in the last ``lookback`` blocks, the newest blocks
        first, asked ``log_range`` blocks at a time. Hosted RPCs refuse a wider range, each with its
        own cap and words for it: a query refused in such words (``RANGE_REFUSAL``) is asked again
        over half the range, which this client keeps, down to ``LEAST_LOG_RANGE``; any other refusal
        raises, and so does one at that range (the range is then as it was: it was not the range)."""
        top = await self.head()
        lowest = max(top - lookback, 0)
        was = self.log_range
        while top >= lowest:
            bottom = max(top - self.log_range + 1, lowest)
            query = {"address": address, "topics": topics, "fromBlock": hex(bottom), "toBlock": hex(top)}
            try:
                found = await self.request("eth_getLogs", [query]) or []
            except RpcError as exc:
                if top - bottom < LEAST_LOG_RANGE or not range_refusal(exc.message):
                    self.log_range = was
                    raise
                self.log_range = max((top - bottom + 1) // 2, LEAST_LOG_RANGE)
                continue
            for log in reversed(found):
                yield log
            top = bottom - 1


def quantity(result: Any) -> int:
    """A JSON-RPC quantity (``0x``-hex); ``ChainUnavailable`` if the node sent something else."""
    try:
        return int(result, 16)
    except (TypeError, ValueError):
        raise ChainUnavailable(f"chain RPC sent a malformed quantity: {str(result)[:40]}") from None


def receipt_status(receipt: Any, tx_hash: str) -> int | None:
    """1 (succeeded) or 0 (reverted) for a receipt of ``tx_hash`` as the JSON-RPC spec has it; None
    for none yet — or for one that is malformed or of another transaction, which a node in trouble
    may send: believed, it could fail a payment that paid, or stop every conclusion behind it."""
    if not isinstance(receipt, dict) or not receipt.get("blockHash"):
        return None
    if str(receipt.get("transactionHash", "")).lower() != tx_hash.lower():
        return None
    status = receipt.get("status")
    return {"0x1": 1, "0x0": 0}.get(status) if isinstance(status, str) else None


def range_refusal(message: str) -> bool:
    """Whether a node's refusal of an ``eth_getLogs`` says the query spans too much (not that we ask too often)."""
    words = message.lower()
    return any(w in words for w in RANGE_REFUSAL) and not any(w in words for w in CAPACITY_REFUSAL)


def transfers_in(receipt: dict[str, Any], token: str) -> list[tuple[str, str, int]]:
    """The ERC-20 ``Transfer`` events of ``token`` in a receipt, as (from, to, value); a malformed
    log (from a buggy or hostile node) is no transfer."""
    out = []
    for topics, data in events_in(receipt, token, TRANSFER_TOPIC):
        try:
            if len(topics) == 3:
                out.append((_address_topic(topics[1]), _address_topic(topics[2]), int(data, 16)))
        except (TypeError, ValueError):
            continue
    return out


def authorized_transfer(
    receipt: dict[str, Any], token: str, authorizer: str, nonce: bytes
) -> tuple[str, str, int] | None:
    """The transfer that ``authorizer``'s EIP-3009 authorization ``nonce`` made in a receipt, as
    (from, to, value): the token's log right after that authorization's ``AuthorizationUsed`` —
    FiatToken marks an authorization used, then transfers, nothing between. Any other transfer of
    the transaction (one of a batch carrying out several authorizations) is not this one's."""
    logs = receipt.get("logs")
    logs = [log for log in logs if isinstance(log, dict)] if isinstance(logs, list) else []
    logs = [log for log in logs if str(log.get("address", "")).lower() == token.lower()]
    used = authorization_used(authorizer, nonce)
    for log, after in itertools.pairwise(logs):
        topics = log.get("topics")
        if isinstance(topics, list) and [str(t).lower() for t in topics] == used:
            found = transfers_in({"logs": [after]}, token)
            return found[0] if found else None
    return None


def authorization_used(authorizer: str, nonce: bytes) -> list[str]:
    """The topics of the ``AuthorizationUsed`` event of ``authorizer``'s authorization ``nonce``."""
    return [AUTHORIZATION_USED_TOPIC, "0x" + "0" * 24 + authorizer.lower()[2:], "0x" + nonce.hex()]


def carries_authorization(receipt: dict[str, Any], token: str) -> bool:
    """Whether a receipt holds an ``AuthorizationUsed`` event of ``token``: its transaction carried
    out an EIP-3009 authorization, which anyone may send on chain (an ``exact`` payment's)."""
    return bool(events_in(receipt, token, AUTHORIZATION_USED_TOPIC))


def events_in(receipt: dict[str, Any], token: str, topic: str) -> list[tuple[list[Any], Any]]:
    """(topics, data) of each log of ``token`` whose first topic is ``topic`` in a receipt; a
    malformed log (from a buggy or hostile node) is none."""
    out = []
    for log in receipt.get("logs") or []:
        try:
            topics = log.get("topics") or [""]
            if str(log.get("address", "")).lower() == token.lower() and str(topics[0]).lower() == topic:
                out.append((list(topics), log.get("data")))
        except (AttributeError, KeyError, IndexError, TypeError):
            continue
    return out


def _address_topic(topic: Any) -> str:
    return "0x" + str(topic)[-40:].lower()
