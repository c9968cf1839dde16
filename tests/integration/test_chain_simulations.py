"""Payments simulated together (``Chain.simulate``) on anvil: the simulations asked in one turn of
the event loop go in one round trip and one ``eth_simulateV1`` of the pending state — a node
replays its pending pool for each pending read, so N concurrent payments cost it one replay — and
each payment gets what it would have got alone: its result or its revert, its own reads, its own
outage. A node without ``eth_simulateV1`` gets one ``eth_call`` each, as before."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from eth_account import Account

from support import RpcSwitch, ServerThread
from tollway.client.payer import sign_exact
from tollway.doctor import simulation_finding
from tollway.errors import ChainUnavailable
from tollway.payments import eip3009
from tollway.payments.chain import BALANCE_OF, Chain, RpcError
from tollway.payments.exact import decode_authorization


def transfer(devnet, payer: Any, amount: int) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """An exact payment's settlement to simulate: (to, calldata, the reads that go with it)."""
    offer = {
        "network": f"eip155:{devnet.chain_id}",
        "asset": devnet.token,
        "payTo": devnet.payee,
        "amount": str(amount),
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    auth, sig = decode_authorization(sign_exact(payer, offer, int(time.time())))
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
        finding = await simulation_finding(client)
    finally:
        await client.close()
    assert finding.level == "warn" and "no eth_simulateV1" in finding.detail


async def test_each_simulation_burns_at_most_the_gas_its_transaction_is_sent_with(chain, devnet, rpc):
    """A settlement that needs more gas than its transaction is given fails in simulation, alone or
    in a group — and in a group none can take the gas of the others."""
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
    assert isinstance(alone[0], RpcError) and all(isinstance(result, RpcError) for result, _ in together)
    assert [outcome(a) for a in enough] == [("ok", [500])] * 2
