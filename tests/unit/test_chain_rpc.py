"""The chain's JSON-RPC client (``payments/chain.py``) over the gateway's own HTTP transport: an
answer, a batch, and every way the RPC can fail — refused, hanging past the client's timeout,
an HTTP error, garbage, a JSON-RPC error — each a ``ChainUnavailable`` (a 503 on the request
path), never anything else."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from support import free_port
from tollway.errors import ChainUnavailable
from tollway.payments.chain import (
    AUTHORIZATION_USED_TOPIC,
    TRANSFER_TOPIC,
    Chain,
    RpcError,
    authorization_used,
    authorized_transfer,
    carries_authorization,
)


async def rpc_server(answer) -> tuple[asyncio.Server, str]:
    """A one-route HTTP server: ``answer(request_json) -> (status, body bytes)``, or None to hang."""

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length"))
                body = await reader.readexactly(length)
                got = await answer(json.loads(body))
                if got is None:
                    await asyncio.sleep(3600)
                status, out = got
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%b" % (status, len(out), out))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/"


async def test_an_answer_and_a_batch_over_one_kept_alive_connection():
    async def answer(doc):
        if isinstance(doc, list):
            return 200, json.dumps([{"jsonrpc": "2.0", "id": d["id"], "result": hex(d["id"])} for d in doc]).encode()
        return 200, json.dumps({"jsonrpc": "2.0", "id": doc["id"], "result": "0x7a69"}).encode()

    server, url = await rpc_server(answer)
    chain = Chain(url)
    try:
        assert await chain.chain_id() == 31337
        first, second = await chain.batch([("eth_blockNumber", []), ("eth_blockNumber", [])])
        assert int(second, 16) == int(first, 16) + 1
        assert chain._transport.size == 1  # (one connection, kept alive)
    finally:
        await chain.close()
        server.close()


@pytest.mark.parametrize(
    "reply",
    [(502, b"bad gateway"), (200, b"<html>not json"), (200, b"[1, 2]"), (200, b'{"jsonrpc":"2.0","id":1}x')],
    ids=["http-502", "html", "not-an-object", "trailing-garbage"],
)
async def test_a_broken_answer_is_chain_unavailable(reply):
    async def answer(doc):
        return reply

    server, url = await rpc_server(answer)
    chain = Chain(url)
    try:
        with pytest.raises(ChainUnavailable):
            await chain.chain_id()
    finally:
        await chain.close()
        server.close()


async def test_a_json_rpc_error_is_an_rpc_error():
    async def answer(doc):
        error = {"code": -32000, "message": "nope"}
        return 200, json.dumps({"jsonrpc": "2.0", "id": doc["id"], "error": error}).encode()

    server, url = await rpc_server(answer)
    chain = Chain(url)
    try:
        with pytest.raises(RpcError) as err:
            await chain.chain_id()
        assert err.value.rpc_code == -32000 and err.value.message == "nope"
    finally:
        await chain.close()
        server.close()


async def test_credentials_in_the_rpc_url_are_sent_as_basic_auth():
    """An RPC URL may carry its credentials (``https://user:secret@rpc.example/``): they go as HTTP
    Basic, decoded, and never in the request line."""
    seen = []

    async def answer(doc):
        return 200, json.dumps({"jsonrpc": "2.0", "id": doc["id"], "result": "0x1"}).encode()

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        lines = head.lower().split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length"))
        doc = json.loads(await reader.readexactly(length))
        out = (await answer(doc))[1]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(out), out))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    chain = Chain(f"http://us%40er:pa%3Ass@127.0.0.1:{port}/v2/key")
    try:
        assert await chain.chain_id() == 1
    finally:
        await chain.close()
        server.close()
    lines = seen[0].split(b"\r\n")
    assert lines[0] == b"POST /v2/key HTTP/1.1"
    auth = [line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"authorization:")]
    assert auth == [b"Basic " + base64.b64encode(b"us@er:pa:ss")]


async def test_refused_is_chain_unavailable():
    chain = Chain(f"http://127.0.0.1:{free_port()}/")
    try:
        with pytest.raises(ChainUnavailable):
            await chain.chain_id()
    finally:
        await chain.close()


async def test_an_rpc_that_hangs_is_chain_unavailable_within_the_timeout():
    async def answer(doc):
        return None

    server, url = await rpc_server(answer)
    chain = Chain(url, timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(ChainUnavailable):
            await chain.chain_id()
        assert time.monotonic() - started < 2
    finally:
        await chain.close()
        server.close()


@pytest.mark.parametrize(
    ("block", "fee"),
    [({"baseFeePerGas": "0x3b9aca00"}, 10**9), ({}, 0), ({"baseFeePerGas": None}, 0), (None, None), ([1], None)],
)
async def test_a_base_fee_is_the_latest_blocks_or_none_and_a_block_the_node_garbles_is_an_outage(block, fee):
    """(A chain without EIP-1559 has none; the doctor reads it at start-up, where a traceback was what
    a node's null block gave.)"""

    async def answer(doc):
        return 200, json.dumps({"jsonrpc": "2.0", "id": doc["id"], "result": block}).encode()

    server, url = await rpc_server(answer)
    chain = Chain(url)
    try:
        if fee is None:
            with pytest.raises(ChainUnavailable):
                await chain.base_fee()
        else:
            assert await chain.base_fee() == fee
    finally:
        await chain.close()
        server.close()


def test_malformed_logs_carry_no_authorization():
    token = "0x" + "ab" * 20
    used = {"address": token, "topics": [AUTHORIZATION_USED_TOPIC]}
    hostile = [{"address": token, "topics": {"0": 1}}, {"address": token, "topics": 7}, "a log", None, {}]
    assert not carries_authorization({"logs": hostile}, token)
    assert carries_authorization({"logs": [*hostile, used]}, token)
    assert not carries_authorization({"logs": [used]}, "0x" + "cd" * 20)  # (another token's)


def test_an_authorizations_transfer_is_the_tokens_log_right_after_its_use():
    """Of a transaction that carries out several authorizations, each one's transfer is its own;
    a node's malformed receipt holds none."""
    token, payer, payee = "0x" + "ab" * 20, "0x" + "11" * 20, "0x" + "22" * 20
    first, second = bytes(32), b"\x01" * 32

    def transfer(frm: str, to: str, value: int) -> dict:
        topics = [TRANSFER_TOPIC, "0x" + "0" * 24 + frm[2:], "0x" + "0" * 24 + to[2:]]
        return {"address": token, "topics": topics, "data": hex(value)}

    def used(nonce: bytes) -> dict:
        return {"address": token, "topics": authorization_used(payer, nonce)}

    batch = [used(first), transfer(payer, payee, 10_000), used(second), transfer(payer, payer, 1)]
    assert authorized_transfer({"logs": batch}, token, payer, first) == (payer, payee, 10_000)
    assert authorized_transfer({"logs": batch}, token, payer, second) == (payer, payer, 1)
    assert authorized_transfer({"logs": batch[:3]}, token, payer, second) is None  # (no transfer after it)
    assert authorized_transfer({"logs": batch}, "0x" + "cd" * 20, payer, first) is None  # (another token's)
    for hostile in (7, {"0": 1}, "logs", [None, "a log", {"topics": 7}], None):
        assert authorized_transfer({"logs": hostile}, token, payer, first) is None


def logs_node(cap: int, refusal: str, failures: int = 0):
    """A node whose head is block 100,000 and whose ``eth_getLogs`` refuses, in ``refusal``'s words,
    a query spanning more than ``cap`` blocks (and, ``failures`` times, any query); the spans asked."""
    asked: list[int] = []

    async def answer(doc):
        if doc["method"] == "eth_blockNumber":
            return 200, json.dumps({"jsonrpc": "2.0", "id": doc["id"], "result": hex(100_000)}).encode()
        q = doc["params"][0]
        asked.append(int(q["toBlock"], 16) - int(q["fromBlock"], 16) + 1)
        nonlocal failures
        if asked[-1] > cap or failures > 0:
            failures -= 1
            error = {"code": -32005, "message": refusal}
            return 200, json.dumps({"jsonrpc": "2.0", "id": doc["id"], "error": error}).encode()
        return 200, json.dumps({"jsonrpc": "2.0", "id": doc["id"], "result": []}).encode()

    return answer, asked


async def search(url: str, lookback: int, chain: Chain | None = None) -> Chain:
    chain = chain or Chain(url)
    async for _ in chain.logs("0x" + "11" * 20, [AUTHORIZATION_USED_TOPIC], lookback):
        pass
    return chain


async def test_logs_are_asked_over_half_the_range_while_the_node_says_it_is_too_wide():
    answer, asked = logs_node(300, "query exceeds max block range 300")
    server, url = await rpc_server(answer)
    chain = await search(url, 2_000)
    try:
        assert asked[:3] == [1000, 500, 250] and set(asked[3:]) <= {250, 1} and chain.log_range == 250
        asked.clear()
        await search(url, 2_000, chain)  # (the range it found is kept: 2,001 blocks in 9 queries)
        assert asked == [250] * 8 + [1]
    finally:
        await chain.close()
        server.close()


@pytest.mark.parametrize(
    "refusal",
    [
        "header not found",
        "rate limit exceeded",
        # (capacity refusals, in hosted RPCs' words: not about the range)
        "Your app has exceeded its compute units per second capacity",
        "daily request limit exceeded",
        "credits quota exceeded",
        "Too many requests, reduce your request rate",
        "throughput limit exceeded",
    ],
)
async def test_a_refusal_that_is_not_about_the_range_raises_and_leaves_it(refusal):
    answer, asked = logs_node(10**6, refusal, failures=1)
    server, url = await rpc_server(answer)
    chain = Chain(url)
    try:
        with pytest.raises(RpcError):
            await search(url, 2_000, chain)
        assert asked == [1000] and chain.log_range == 1000
        await search(url, 2_000, chain)  # (the node is fine again)
        assert asked[1:] == [1000, 1000, 1] and chain.log_range == 1000
    finally:
        await chain.close()
        server.close()


@pytest.mark.parametrize("result", [None, "latest", 7])
async def test_a_malformed_quantity_is_an_outage_not_a_crash(result):
    async def answer(doc):
        return 200, json.dumps({"jsonrpc": "2.0", "id": doc["id"], "result": result}).encode()

    server, url = await rpc_server(answer)
    chain = Chain(url)
    try:
        for ask in (chain.head(), chain.chain_id(), chain.mined_nonce("0x" + "11" * 20)):
            with pytest.raises(ChainUnavailable, match="malformed"):
                await ask
    finally:
        await chain.close()
        server.close()
