"""Payments simulated together (``Chain.simulate``) on anvil: the simulations asked in one turn of
the event loop go in one round trip and one ``eth_simulateV1`` of the pending state — a node
replays its pending pool for each pending read, so N concurrent payments cost it one replay — and
each payment gets what it would have got alone: its result or its revert, its own reads, its own
outage. A node without ``eth_simulateV1`` gets one ``eth_call`` each, as before."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from eth_account import Account

from support import RpcSwitch, ServerThread, await_receipt, exact_offer, signed_authorization
from tollway.client.payer import sign_exact
from tollway.doctor import simulation_finding
from tollway.errors import ChainUnavailable
from tollway.payments import eip3009
from tollway.payments.chain import BALANCE_OF, MAX_GROUP, Chain, RpcError
from tollway.payments.exact import decode_authorization
from tollway.payments.x402 import b64json, unb64json


def transfer(devnet, payer: Any, amount: int) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """An exact payment's settlement to simulate: (to, calldata, the reads that go with it)."""
    auth, sig = decode_authorization(signed_authorization(devnet, payer, amount))
    balance = BALANCE_OF + bytes(12) + bytes.fromhex(payer.address[2:])
    return devnet.token, eip3009.transfer_calldata(auth, sig), [(devnet.token, balance)]


def outcome(answer: tuple[Any, list[Any]]) -> tuple[str, list[int]]:
    result, reads = answer
    said = f"reverted: {result.revert_reason}" if isinstance(result, RpcError) else "ok"
    return said, [int(r, 16) for r in reads]


@pytest.fixture
def rpc(devnet):
    switch = RpcSwitch(devnet.rpc_url)
    with ServerThread(switch.app()) as proxy:
        switch.url = proxy.url
        yield switch


SETTLER = Account.create().address  # (a simulation needs no gas)


async def test_simulations_asked_together_go_in_one_round_trip(chain, devnet, rpc):
    payers = [chain.fund(amount=1_000 + i) for i in range(3)]
    broke = Account.create()  # signs for money it does not have
    payments = [transfer(devnet, p, 400) for p in (payers[0], broke, *payers[1:])]  # (one that fails among them)
    client = Chain(rpc.url)
    try:
        alone = [outcome(await client.simulate(SETTLER, *p)) for p in payments]  # one at a time
        assert rpc.calls.count("eth_simulateV1") == 0 and rpc.posts == 4
        rpc.calls.clear()
        rpc.posts = 0
        together = [outcome(a) for a in await asyncio.gather(*(client.simulate(SETTLER, *p) for p in payments))]
    finally:
        await client.close()
    assert rpc.posts == 1 and rpc.calls == ["eth_simulateV1"] + ["eth_call"] * 4  # (the reads, at latest)
    assert together == alone
    assert [together[0], *together[2:]] == [("ok", [1_000 + i]) for i in range(3)]
    assert together[1] == ("reverted: ERC20: transfer amount exceeds balance", [0])


async def test_a_payer_spending_one_balance_twice_in_one_group_is_refused_the_second_time(chain, devnet, rpc):
    """Simulated together, payments run in order on one pending state: the second of two that
    each fit the payer's balance alone, but not both, reverts — as on chain."""
    payer = chain.fund(amount=1_000)
    first, second = transfer(devnet, payer, 700), transfer(devnet, payer, 700)
    client = Chain(rpc.url)
    try:
        answers = await asyncio.gather(client.simulate(SETTLER, *first), client.simulate(SETTLER, *second))
    finally:
        await client.close()
    assert [outcome(a) for a in answers] == [
        ("ok", [1_000]),
        ("reverted: ERC20: transfer amount exceeds balance", [1_000]),
    ]


async def test_a_node_without_eth_simulate_v1_gets_one_eth_call_each(chain, devnet, rpc):
    rpc.unknown = {"eth_simulateV1"}
    payers = [chain.fund(amount=500) for _ in range(2)]
    payments = [transfer(devnet, p, 100) for p in payers]
    client = Chain(rpc.url)
    try:
        first = await asyncio.gather(*(client.simulate(SETTLER, *p) for p in payments))
        assert not client.simulate_v1  # (asked once, then never again)
        calls = list(rpc.calls)
        second = await asyncio.gather(*(client.simulate(SETTLER, *p) for p in payments))
    finally:
        await client.close()
    assert [outcome(a) for a in first] == [outcome(a) for a in second] == [("ok", [500])] * 2
    assert calls == ["eth_simulateV1"] + ["eth_call"] * 2 + ["eth_call"] * 4
    assert rpc.calls[len(calls) :] == ["eth_call"] * 4


async def test_an_outage_reaches_every_payment_of_the_group_and_a_payment_gone_leaves_the_rest(chain, devnet, rpc):
    payers = [chain.fund(amount=300) for _ in range(3)]
    payments = [transfer(devnet, p, 100) for p in payers]
    client = Chain(rpc.url)
    try:
        rpc.mode = "http-502"
        failed = await asyncio.gather(*(client.simulate(SETTLER, *p) for p in payments), return_exceptions=True)
        assert all(isinstance(f, ChainUnavailable) for f in failed), failed
        rpc.mode = "up"
        tasks = [asyncio.create_task(client.simulate(SETTLER, *p)) for p in payments]
        await asyncio.sleep(0)  # (all three asked in this turn)
        tasks[1].cancel()  # its request went away
        answers = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await client.close()
    assert isinstance(answers[1], asyncio.CancelledError)
    assert [outcome(answers[0]), outcome(answers[2])] == [("ok", [300])] * 2


async def test_the_doctor_says_when_the_rpc_cannot_simulate_payments_together(rpc):
    client = Chain(rpc.url)
    try:
        assert (await simulation_finding(client)).level == "ok"
        rpc.unknown = {"eth_simulateV1"}
        unknown = await simulation_finding(client)
        rpc.unknown, rpc.simulate_status = set(), 403  # (a provider refusing it at the HTTP level)
        refused = await simulation_finding(client)
    finally:
        await client.close()
    for finding in (unknown, refused):
        assert finding.level == "warn" and "no eth_simulateV1" in finding.detail


def geth_shaped(result: Any) -> Any:
    """An eth_simulateV1 result as geth and reth give it: a failed call's revert data in
    ``error.data`` with code 3, its ``returnData`` empty (anvil 1.7 gives it in ``returnData``)."""
    for block in result:
        for call in block["calls"]:
            if call["status"] == "0x0":
                call["error"] = {"code": 3, "message": "execution reverted", "data": call["returnData"]}
                call["returnData"] = "0x"
    return result


@pytest.mark.parametrize("shape", ["anvil", "geth"])
async def test_a_refusal_reads_the_same_alone_and_in_a_group(chain, devnet, rpc, shape):
    """What a payment is refused for (its revert reason: exact maps it to insufficient_funds,
    nonce used, …) is the same whether it was simulated alone or with others, as anvil answers
    eth_simulateV1 and as geth and reth do."""
    rpc.simulate_reply = geth_shaped if shape == "geth" else None
    payer, broke = chain.fund(amount=1_000), Account.create()
    spent = transfer(devnet, payer, 100)
    payments = [transfer(devnet, broke, 100), spent, spent]  # (the same authorization twice: used, then)
    client = Chain(rpc.url)
    try:
        together = await asyncio.gather(*(client.simulate(SETTLER, *p) for p in payments))
    finally:
        await client.close()
    assert rpc.calls.count("eth_simulateV1") == 1
    assert [outcome(a)[0] for a in together] == [
        "reverted: ERC20: transfer amount exceeds balance",
        "ok",
        "reverted: FiatTokenV2: authorization is used or canceled",
    ]


@pytest.mark.parametrize(
    "refusal",
    [
        {"simulate_reply": lambda result: [{"calls": result[0]["calls"][:1]}]},  # (one answer short)
        {"simulate_reply": lambda result: {"calls": "nonsense"}},
        {"simulate_status": 400},  # (a provider refusing the method at the HTTP level)
    ],
)
async def test_a_failed_eth_simulate_v1_falls_back_to_one_eth_call_each(chain, devnet, rpc, refusal):
    for name, value in refusal.items():
        setattr(rpc, name, value)
    payers = [chain.fund(amount=400) for _ in range(3)]
    payments = [transfer(devnet, p, 100) for p in payers]
    client = Chain(rpc.url)
    try:
        for _ in range(3):  # (after three failures in a row, eth_simulateV1 is not asked again)
            assert client.simulate_v1
            answers = await asyncio.gather(*(client.simulate(SETTLER, *p) for p in payments))
            assert [outcome(a) for a in answers] == [("ok", [400])] * 3
        asked = rpc.calls.count("eth_simulateV1")
        await asyncio.gather(*(client.simulate(SETTLER, *p) for p in payments))
    finally:
        await client.close()
    assert asked == 3 and rpc.calls.count("eth_simulateV1") == 3 and not client.simulate_v1


async def test_a_read_that_fails_fails_its_own_payment_only(chain, devnet, rpc):
    payers = [chain.fund(amount=200) for _ in range(2)]
    (to, data, _), other = (transfer(devnet, p, 100) for p in payers)
    broken = [(devnet.token, bytes.fromhex("deadbeef"))]  # (no such function: the read reverts)
    client = Chain(rpc.url)
    try:
        answers = await asyncio.gather(
            client.simulate(SETTLER, to, data, broken), client.simulate(SETTLER, *other), return_exceptions=True
        )
    finally:
        await client.close()
    assert isinstance(answers[0], RpcError) and outcome(answers[1]) == ("ok", [200])


async def test_a_large_group_is_simulated_in_parts(chain, devnet, rpc):
    """At most MAX_GROUP in one eth_simulateV1: their gas stays under nodes' RPC gas cap and a batch
    under their size limits."""
    payer = chain.fund(amount=10**6)
    payments = [transfer(devnet, payer, 1) for _ in range(MAX_GROUP + 6)]
    client = Chain(rpc.url)
    try:
        answers = await asyncio.gather(*(client.simulate(SETTLER, *p) for p in payments))
    finally:
        await client.close()
    assert rpc.calls.count("eth_simulateV1") == 2 and rpc.posts == 2
    assert all(outcome(a)[0] == "ok" for a in answers)


async def test_closing_the_client_answers_the_simulations_it_was_asked(chain, devnet, rpc):
    payers = [chain.fund(amount=200) for _ in range(2)]
    client = Chain(rpc.url)
    asked = [asyncio.create_task(client.simulate(SETTLER, *transfer(devnet, p, 100))) for p in payers]
    await asyncio.sleep(0)  # (asked: not sent yet)
    await client.close()
    answers = await asyncio.gather(*asked, return_exceptions=True)
    assert all(isinstance(a, ChainUnavailable) for a in answers), answers
    assert rpc.posts == 0


@pytest.mark.parametrize("shape", ["anvil", "geth"])
async def test_a_simulation_short_of_gas_is_the_nodes_failure_not_the_payments(chain, devnet, rpc, shape):
    """Each simulation runs with the gas its transaction will be sent with; one that runs out of it
    is an RPC failure (a 503, the authorization kept for a retry), alone or in a group — not a
    revert, which would refuse the payment for good."""
    rpc.simulate_reply = geth_out_of_gas if shape == "geth" else None
    payers = [chain.fund(amount=500) for _ in range(2)]
    payments = [transfer(devnet, p, 100) for p in payers]
    starved, given = Chain(rpc.url, simulation_gas=30_000), Chain(rpc.url, simulation_gas=250_000)
    try:
        alone = await starved.simulate(SETTLER, *payments[0])
        together = await asyncio.gather(*(starved.simulate(SETTLER, *p) for p in payments))
        enough = await asyncio.gather(*(given.simulate(SETTLER, *p) for p in payments))
    finally:
        await starved.close()
        await given.close()
    assert rpc.calls.count("eth_simulateV1") == 2
    for result, _ in [alone, *together]:
        assert isinstance(result, RpcError) and result.revert_reason is None, result
    assert [outcome(a) for a in enough] == [("ok", [500])] * 2


def geth_out_of_gas(result: Any) -> Any:
    for block in result:
        for call in block["calls"]:
            if call["status"] == "0x0":
                call["error"] = {"code": -32015, "message": "out of gas"}
    return result


async def test_simulations_left_by_a_stopped_event_loop_hold_up_nothing(chain, devnet, rpc):
    payer = chain.fund(amount=300)
    client = Chain(rpc.url)

    def ask_in_a_loop_that_stops() -> None:
        other = asyncio.new_event_loop()
        asked = other.create_task(client.simulate(SETTLER, *transfer(devnet, payer, 100)))
        other.call_soon(other.stop)  # (asked, and the loop stops before the group leaves)
        other.run_forever()
        assert not asked.done()
        other.close()

    await asyncio.to_thread(ask_in_a_loop_that_stops)  # (another thread: this one runs the test's loop)
    try:
        answer = await asyncio.wait_for(client.simulate(SETTLER, *transfer(devnet, payer, 100)), 10)
    finally:
        await client.close()
    assert outcome(answer) == ("ok", [300])


async def test_one_balance_spent_by_many_calls_at_once_at_one_gateway_pays_for_every_call_served(
    gateway, chain, devnet, upstream
):
    """Twelve distinct authorizations from a payer whose balance covers two, fired at one gateway
    at once: their simulations go out together, on one pending state, and each lock counts the
    payments locked before it. At most two are served, the upstream is asked for no other, and
    every one served is paid on chain."""
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "at once"}], "max_tokens": 4}
    url = f"{gateway.url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=30) as http:
        offer = exact_offer(unb64json((await http.post(url, json=body)).headers["PAYMENT-REQUIRED"]))
        amount = int(offer["amount"])
        payer = chain.fund(amount=2 * amount)
        headers = [
            {"PAYMENT-SIGNATURE": b64json({"x402Version": 2, "accepted": offer, "payload": p})}
            for p in [sign_exact(payer, offer, int(time.time())) for _ in range(12)]
        ]
        asked = (await http.get(f"{upstream.url}/mock/stats")).json()["requests"]
        replies = await asyncio.gather(*[http.post(url, json=body, headers=h) for h in headers])
        served = [r for r in replies if r.status_code == 200]
        assert 1 <= len(served) <= 2 and all(r.status_code in (200, 402) for r in replies)
        assert (await http.get(f"{upstream.url}/mock/stats")).json()["requests"] == asked + len(served)
        for r in served:
            await await_receipt(gateway.url, r.headers["x-tollway-receipt"])  # (until its payment is settled)
    assert chain.balance(payer.address) == (2 - len(served)) * amount


async def test_a_batch_over_the_nodes_cap_goes_in_several_round_trips_in_order(devnet, rpc):
    """Nodes cap a JSON-RPC batch (geth and most providers at 1,000 calls): a longer one — the
    withdrawal watch's, one read per funded channel — is sent ``BATCH_LIMIT`` calls at a time, its
    answers in the order asked."""
    from tollway.payments.chain import BATCH_LIMIT

    client = Chain(rpc.url)
    try:
        blocks = [("eth_getBlockByNumber", [hex(i % 3), False]) for i in range(2 * BATCH_LIMIT + 1)]
        answers = await client.batch(blocks)
        assert rpc.posts == 3
        assert [int(a["number"], 16) for a in answers] == [i % 3 for i in range(2 * BATCH_LIMIT + 1)]
    finally:
        await client.close()
