"""x402 ``batch-settlement`` through tollway: the official Python SDK's client, unmodified, pays calls
with one deposit and a voucher per call; tollway charges each call its metered cost, claims what the
vouchers owe in batches and sweeps it to the payee, on the devnet's escrow."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from eth_account import Account
from sqlalchemy import text
from x402.mechanisms.evm.batch_settlement.abi import BATCH_SETTLEMENT_ABI
from x402.mechanisms.evm.batch_settlement.client import (
    sign_voucher,
)
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequirements

from channel_support import (
    Gateway,
    SdkPayer,
    escrow_channel,
    ledger,
    metered_total,
    payer_channel,
    response_extra,
    wait_for,
)
from conftest import anvil_process, gateway_settings
from support import CHAT, Chain, ServerThread, chat_body, run_concurrently
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, PaymentRefused, SyncPayingTransport, refund_channel
from tollway.devnet.deploy import deploy_devnet
from tollway.ledger import Store
from tollway.ledger.channels import ChannelRefused
from tollway.payments.channel import BATCH_SETTLEMENT_ADDRESS

SCHEME = "batch-settlement"
MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
CALLS = 100
CONFIG_FIELDS = ("payer", "payerAuthorizer", "receiver", "receiverAuthorizer", "token", "withdrawDelay", "salt")


def channel_settings(devnet, upstream, db: Path, **channels: Any) -> tuple[Any, str]:
    """Settings of a gateway taking batch-settlement (and exact) for a payee of its own, whose
    channels are watched twice a second; and that payee."""
    channels = {"watch_seconds": 0.3, "withdraw_delay_seconds": 900, **channels}
    settings = gateway_settings(
        devnet, upstream.url + "/v1", db, schemes=["batch-settlement", "exact"], channels=channels
    )
    payee = Account.create().address
    return settings.model_copy(update={"chain": settings.chain.model_copy(update={"payee": payee})}), payee


@pytest.fixture(scope="module")
def channel_gateway(devnet, upstream, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway taking batch-settlement (and exact) for a payee of its own, claiming every second."""
    db: Path = tmp_path_factory.mktemp("channels") / "tollway.sqlite3"
    # (a deposit of 100 quotes, which the client's first payment makes, pays for 100 calls at least)
    settings, payee = channel_settings(devnet, upstream, db, claim_interval_seconds=1.0, min_deposit_calls=100)
    with ServerThread(create_app(settings)) as server:
        store = Store(settings.database_url)
        yield Gateway(server.url, store, payee)
        store.close()


def test_the_official_client_pays_many_calls_with_one_deposit_each_charged_its_metered_cost_then_claimed(
    channel_gateway, devnet, chain
):
    funded = 100_000_000
    payer = SdkPayer(chain.fund(funded), devnet)
    for i in range(CALLS):
        body = chat_body(f"call {i} " + "word " * (i % 7), max_tokens=16)
        streamed = i % 3 == 2
        if streamed:
            body["stream"] = True
        answer = payer.call(channel_gateway, body)
        assert answer.status_code == 200, answer.text
        extra = response_extra(answer)
        if streamed:  # charged as it ends: the client learns it from the next call's corrective 402
            assert extra["chargedAmount"] == "0"
            assert "data: [DONE]" in answer.text
        else:
            assert extra["chargedAmount"] == answer.headers["x-tollway-cost"]
            assert int(extra["chargedAmount"]) > 0
        if i == 0:  # (the deposit call: the channel it tells of holds the deposit)
            deposited = payer_channel(channel_gateway, payer.account.address)["balance"]
            assert int(extra["channelState"]["balance"]) == deposited > 0

    channel = payer_channel(channel_gateway, payer.account.address)
    served, cost = metered_total(channel_gateway, payer.account.address)
    assert served == CALLS
    assert channel["charged"] == cost  # every call, streamed or not, charged its metered cost
    deposited, _ = escrow_channel(chain, channel["id"])
    assert deposited == channel["balance"] == funded - chain.balance(payer.account.address)  # one deposit
    assert ledger(
        channel_gateway,
        "SELECT COUNT(*) FROM payments WHERE payer = :p AND deposit > 0",
        p=payer.account.address.lower(),
    ) == [(1,)]

    # The claimer claims every voucher's charge and sweeps it to the payee.
    wait_for(lambda: channel_gateway.store.channel(channel["id"])["claimed"] == cost)
    assert escrow_channel(chain, channel["id"]) == (deposited, cost)
    wait_for(lambda: chain.balance(channel_gateway.payee) == cost)


# -- hostile vouchers, and a client that lost count ----------------------------------------------


def offer(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    """The batch-settlement offer of an unpaid call's 402."""
    answer = requests.post(gateway.url + CHAT, json=body, timeout=30)
    assert answer.status_code == 402
    doc = json.loads(base64.b64decode(answer.headers["PAYMENT-REQUIRED"]))
    return next(a for a in doc["accepts"] if a["scheme"] == SCHEME)


def pay_voucher(
    gateway: Gateway,
    body: dict[str, Any],
    payer: SdkPayer,
    max_claimable: int,
    signer: Any = None,
    v_base: int = 27,
    kind: str = "voucher",
) -> requests.Response:
    """Pay ``body`` with a voucher built by hand on the payer's channel (signed by ``signer``, its
    recovery id written from ``v_base``: 27, or 0 as some signers write it) — or, ``kind`` refund,
    ask for the channel's rest back with it."""
    accepted = offer(gateway, body)
    config = payer.scheme.build_channel_config(PaymentRequirements.model_validate(accepted))
    cid = compute_channel_id(config, accepted["network"])
    voucher = sign_voucher(EthAccountSigner(signer or payer.account), cid, max_claimable, accepted["network"])
    payload = {"type": kind, "channelConfig": config.to_dict(), "voucher": voucher.to_dict()}
    sig = bytes.fromhex(payload["voucher"]["signature"].removeprefix("0x"))
    payload["voucher"]["signature"] = "0x" + (sig[:64] + bytes([sig[64] - 27 + v_base])).hex()
    header = base64.b64encode(json.dumps({"x402Version": 2, "accepted": accepted, "payload": payload}).encode())
    url = gateway.url + (CHAT if kind == "voucher" else "/v1/channels/refund")
    return requests.post(url, json=body, headers={"PAYMENT-SIGNATURE": header.decode()}, timeout=30)


def upstream_requests(upstream) -> int:
    return int(requests.get(f"{upstream.url}/mock/stats", timeout=10).json()["requests"])


def refusal(answer: requests.Response) -> tuple[int, str]:
    doc = json.loads(base64.b64decode(answer.headers["PAYMENT-REQUIRED"]))
    return answer.status_code, doc["error"].split(":")[0]


def test_a_voucher_that_goes_backwards_exceeds_the_deposit_or_is_signed_by_another_key_is_refused(
    channel_gateway, devnet, chain, upstream
):
    payer = SdkPayer(chain.fund(100_000_000), devnet)
    body = chat_body("open the channel", max_tokens=16)
    assert payer.call(channel_gateway, body).status_code == 200  # deposit + first voucher
    channel = payer_channel(channel_gateway, payer.account.address)
    amount = int(offer(channel_gateway, body)["amount"])
    charged = channel["charged"]
    asked = upstream_requests(upstream)

    backwards = pay_voucher(channel_gateway, body, payer, charged + amount - 1)
    assert refusal(backwards) == (402, MISMATCH)
    over = pay_voucher(channel_gateway, body, payer, channel["balance"] + amount)
    assert refusal(over) == (402, MISMATCH)  # (builds on more than was charged: the same refusal)
    huge = pay_voucher(channel_gateway, body, payer, 2**100)
    assert (huge.status_code, huge.json()["error"]["code"]) == (400, "amount_too_large")
    stranger = pay_voucher(channel_gateway, body, payer, charged + amount, signer=Account.create())
    assert refusal(stranger) == (402, "invalid_batch_settlement_evm_voucher_signature")
    after = payer_channel(channel_gateway, payer.account.address)
    assert (after["charged"], after["busy"]) == (charged, None)  # nothing charged, the channel free
    assert upstream_requests(upstream) == asked  # and the upstream never asked

    good = pay_voucher(channel_gateway, body, payer, charged + amount)
    assert good.status_code == 200, good.text
    assert payer_channel(channel_gateway, payer.account.address)["charged"] == charged + int(
        response_extra(good)["chargedAmount"]
    )
    replayed = pay_voucher(channel_gateway, body, payer, charged + amount)
    assert refusal(replayed) == (402, MISMATCH)


def test_a_voucher_whose_recovery_id_is_written_0_or_1_is_claimed_like_any_other(channel_gateway, devnet, chain):
    """The escrow's ecrecover takes only v = 27/28: kept as sent, such a voucher would be charged
    and never claimed, and its payer would withdraw what the calls cost (attack: calls for free)."""
    payer = SdkPayer(chain.fund(100_000_000), devnet)
    body = chat_body("a voucher with v = 0 or 1", max_tokens=16)
    assert payer.call(channel_gateway, body).status_code == 200
    before = payer_channel(channel_gateway, payer.account.address)
    amount = int(offer(channel_gateway, body)["amount"])
    answer = pay_voucher(channel_gateway, body, payer, before["charged"] + amount, v_base=0)
    assert answer.status_code == 200, answer.text
    charged = payer_channel(channel_gateway, payer.account.address)["charged"]
    assert charged > before["charged"]
    wait_for(lambda: escrow_channel(chain, before["id"])[1] == charged)


def test_a_voucher_beyond_the_deposit_is_refused_until_the_channel_is_topped_up(channel_gateway, devnet, chain):
    payer = SdkPayer(chain.fund(100_000_000), devnet)
    body = chat_body("a small channel", max_tokens=16)
    assert payer.call(channel_gateway, body).status_code == 200
    channel = payer_channel(channel_gateway, payer.account.address)
    amount = int(offer(channel_gateway, body)["amount"])
    with channel_gateway.store.engine.begin() as c:  # (as if the deposit were nearly spent)
        c.execute(
            text("UPDATE channels SET charged = balance - :a + 1, signed_max = balance WHERE id = :id"),
            {"a": amount, "id": channel["id"]},
        )
    charged = channel["balance"] - amount + 1
    answer = pay_voucher(channel_gateway, body, payer, charged + amount)
    assert refusal(answer) == (402, "invalid_batch_settlement_evm_cumulative_exceeds_balance")


def test_a_client_that_lost_its_channel_state_resynchronises_through_the_corrective_402(channel_gateway, devnet, chain):
    account = chain.fund(100_000_000)
    first = SdkPayer(account, devnet)
    for i in range(3):
        assert first.call(channel_gateway, chat_body(f"before {i}", max_tokens=16)).status_code == 200
    charged = payer_channel(channel_gateway, account.address)["charged"]

    again = SdkPayer(account, devnet)  # a fresh process: no local state (it reads the chain: nothing claimed)
    answer = again.call(channel_gateway, chat_body("after a restart", max_tokens=16))
    assert answer.status_code == 200, answer.text
    extra = response_extra(answer)
    assert int(extra["channelState"]["chargedCumulativeAmount"]) == charged + int(extra["chargedAmount"])
    deposits = "SELECT COUNT(*) FROM payments WHERE payer = :p AND deposit > 0 AND state = 'settled'"
    assert ledger(channel_gateway, deposits, p=account.address.lower()) == [(1,)]  # no second deposit


def test_the_official_client_refunds_what_its_channel_was_not_charged_with_its_charges_claimed(
    channel_gateway, devnet, chain, upstream
):
    funded = 100_000_000
    payer = SdkPayer(chain.fund(funded), devnet)
    for i in range(4):
        body = chat_body(f"before the refund {i}", max_tokens=16, stream=i == 3)  # (the last charged as it ends)
        assert payer.call(channel_gateway, body).status_code == 200
    channel = payer_channel(channel_gateway, payer.account.address)
    cost = metered_total(channel_gateway, payer.account.address)[1]
    assert channel["charged"] == cost

    settled = payer.scheme.refund(channel_gateway.url + "/v1/channels/refund")  # (resynchronises first)
    assert settled.success and settled.transaction
    # The payer has everything back but what its calls cost; the payee has that; the escrow is empty.
    assert chain.balance(payer.account.address) == funded - cost
    assert escrow_channel(chain, channel["id"]) == (cost, cost)
    after = payer_channel(channel_gateway, payer.account.address)
    assert (after["balance"], after["claimed"], after["refunded"], after["busy"]) == (
        cost,
        cost,
        channel["balance"] - cost,
        None,
    )
    wait_for(lambda: chain.balance(channel_gateway.payee) >= cost)

    # A voucher on the refunded channel exceeds what it holds now.
    body = chat_body("after the refund", max_tokens=16)
    amount = int(offer(channel_gateway, body)["amount"])
    assert refusal(pay_voucher(channel_gateway, body, payer, cost + amount))[1] == (
        "invalid_batch_settlement_evm_cumulative_exceeds_balance"
    )


# -- the payer's escape hatch: a timed withdrawal (on an anvil of its own: its clock moves) -------


def test_a_channel_whose_payer_starts_a_withdrawal_is_claimed_at_once_and_takes_no_more_vouchers(
    xprocess, upstream, tmp_path
):
    with anvil_process(xprocess, "channels-withdraw") as rpc:
        own = deploy_devnet(rpc)
        chain = Chain(own)
        # (claims are hourly: only the withdrawal makes this one happen now)
        settings, payee = channel_settings(own, upstream, tmp_path / "tollway.sqlite3", claim_interval_seconds=3600)
        with ServerThread(create_app(settings)) as server:
            store = Store(settings.database_url)
            gateway = Gateway(server.url, store, payee)
            account = chain.fund(100_000_000, eth=True)  # (it pays gas to withdraw)
            payer = SdkPayer(account, own)
            for i in range(3):
                assert payer.call(gateway, chat_body(f"before withdrawing {i}", max_tokens=16)).status_code == 200
            channel = payer_channel(gateway, account.address)
            config = json.loads(channel["config"])
            escrow = chain.w3.eth.contract(address=BATCH_SETTLEMENT_ADDRESS, abi=BATCH_SETTLEMENT_ABI)
            as_tuple = tuple(config[k] for k in CONFIG_FIELDS)

            def send(fn: Any) -> None:
                tx = fn.build_transaction(
                    {
                        "from": account.address,
                        "nonce": chain.w3.eth.get_transaction_count(account.address),
                        "gas": 300_000,
                    }
                )
                signed = account.sign_transaction(tx)
                receipt = chain.w3.eth.wait_for_transaction_receipt(
                    chain.w3.eth.send_raw_transaction(signed.raw_transaction)
                )
                assert receipt["status"] == 1

            send(escrow.functions.initiateWithdraw(as_tuple, channel["balance"]))
            claimed = wait_for(lambda: store.channel(channel["id"])["claimed"] == channel["charged"] or None)
            assert claimed and store.channel(channel["id"])["withdraw_at"] > 0
            assert escrow_channel(chain, channel["id"]) == (channel["balance"], channel["charged"])

            body = chat_body("while withdrawing", max_tokens=16)
            amount = int(offer(gateway, body)["amount"])
            refused = pay_voucher(gateway, body, payer, channel["charged"] + amount)
            assert refusal(refused) == (402, "invalid_batch_settlement_evm_channel_not_found")

            chain.w3.provider.make_request("evm_increaseTime", [900])
            chain.w3.provider.make_request("evm_mine", [])
            before = chain.balance(account.address)
            send(escrow.functions.finalizeWithdraw(as_tuple))
            assert chain.balance(account.address) == before + channel["balance"] - channel["charged"]
            wait_for(lambda: chain.balance(payee) == channel["charged"])
            store.close()


# -- replicas ----------------------------------------------------------------------------------------


def test_two_replicas_on_postgres_serve_one_channel_without_over_charging_or_double_claiming(
    devnet, chain, upstream, postgres_url, tmp_path
):
    settings, payee = channel_settings(devnet, upstream, tmp_path / "unused.sqlite3", claim_interval_seconds=0.5)
    settings = settings.model_copy(update={"database_url": postgres_url})
    with ServerThread(create_app(settings)) as a, ServerThread(create_app(settings)) as b:
        store = Store(postgres_url)
        replicas = [Gateway(a.url, store, payee), Gateway(b.url, store, payee)]
        payer = SdkPayer(chain.fund(100_000_000), devnet)
        assert payer.call(replicas[0], chat_body("open", max_tokens=16)).status_code == 200
        channel = payer_channel(replicas[0], payer.account.address)

        # One voucher fired at both replicas at once: one call takes it, every other is refused.
        body = chat_body("the same voucher, many times", max_tokens=16)
        accepted = offer(replicas[0], body)
        voucher = channel["charged"] + int(accepted["amount"])
        answers: list[requests.Response] = []
        run_concurrently(lambda g: answers.append(pay_voucher(g, body, payer, voucher)), replicas * 6)
        assert sorted(r.status_code for r in answers) == [200] + [402] * 11
        assert {refusal(r)[1] for r in answers if r.status_code == 402} <= {
            MISMATCH,
            "invalid_batch_settlement_evm_channel_busy",
        }

        # The client's calls spread over both replicas: each charged once, all claimed once.
        for i in range(10):
            assert payer.call(replicas[i % 2], chat_body(f"spread {i}", max_tokens=16)).status_code == 200
        served, cost = metered_total(replicas[0], payer.account.address)
        assert served == 12
        assert payer_channel(replicas[0], payer.account.address)["charged"] == cost
        wait_for(lambda: store.channel(channel["id"])["claimed"] == cost)
        assert escrow_channel(chain, channel["id"])[1] == cost
        wait_for(lambda: chain.balance(payee) == cost)
        store.close()


# -- tollway's own client ---------------------------------------------------------------------------


def test_tollways_client_deposits_once_pays_by_voucher_resynchronises_after_a_stream_and_refunds(
    channel_gateway, devnet, chain
):
    account = chain.fund(100_000_000)
    allowed = [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token, 6)]
    payer = Payer(account, allowed, schemes=("batch-settlement",), max_total_usd=Decimal(5))
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=channel_gateway.url, timeout=30) as http:
        for i in range(6):
            body = chat_body(f"tollway's client {i}", max_tokens=16, stream=i == 2)
            answer = http.post(CHAT, json=body)
            assert answer.status_code == 200, answer.text
    assert [p.scheme for p in payer.history] == ["batch-settlement"] * 6
    channel = payer_channel(channel_gateway, account.address)
    mine = payer.channels[channel["id"]]
    served, cost = metered_total(channel_gateway, account.address)
    assert served == 6 and channel["charged"] == cost
    assert mine.charged == cost  # (the stream's charge learnt from the next call's corrective 402)
    deposits = "SELECT COUNT(*) FROM payments WHERE payer = :p AND deposit > 0 AND state = 'settled'"
    assert ledger(channel_gateway, deposits, p=account.address.lower()) == [(1,)]
    assert payer.deposited_usd == Decimal(channel["balance"]).scaleb(-6)

    with httpx.Client(base_url=channel_gateway.url, timeout=30) as http:
        doc = refund_channel(payer, http)
    assert doc["success"] and int(doc["amount"]) == channel["balance"] - cost
    assert chain.balance(account.address) == 100_000_000 - cost
    assert payer.deposited_usd == Decimal(channel["balance"]).scaleb(-6)  # (a refund gives no deposit allowance back)
    assert mine.balance == cost and payer.spent_usd <= Decimal(mine.signed).scaleb(-6)
    with httpx.Client(base_url=channel_gateway.url, timeout=30) as http, pytest.raises(PaymentRefused) as refused:
        refund_channel(payer, http)  # nothing left
    assert "invalid_batch_settlement_evm_refund_no_balance" in str(refused.value)


def test_tollways_client_restarted_pays_its_first_call_within_its_limits(channel_gateway, devnet, chain):
    """A fresh process knows nothing of its channel: its first voucher signs the quote from zero,
    and the corrective 402 shows (by the wallet's own signature) a higher voucher signed before.
    That first voucher adds nothing the gateway could not claim already: it must not count against
    the call's limit, nor the session's budget."""
    account = chain.fund(100_000_000)
    allowed = [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token, 6)]
    body = chat_body("a restarted client", max_tokens=16)
    quote = Decimal(int(offer(channel_gateway, body)["amount"])).scaleb(-6)
    # (a limit a call's quote is within, but not its quote and the cost of the call before it)
    limits = {
        "schemes": ("batch-settlement",),
        "max_total_usd": Decimal(5),
        "max_per_call_usd": quote + Decimal("5e-6"),
    }
    for process in range(2):
        payer = Payer(account, allowed, **limits)
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=channel_gateway.url, timeout=30) as http:
            for _ in range(2):
                answer = http.post(CHAT, json=body)
                assert answer.status_code == 200, (process, answer.text)
    assert payer.spent_usd == sum(p.usd for p in payer.history)  # (its first voucher, refused, is not counted)
    assert (
        payer_channel(channel_gateway, account.address)["charged"] == metered_total(channel_gateway, account.address)[1]
    )


def test_tollways_client_believes_a_corrective_402_only_as_far_as_it_signed(devnet):
    from tollway.client.channels import Channel

    account = Account.create()
    offer = {
        "network": f"eip155:{devnet.chain_id}",
        "payTo": Account.create().address,
        "asset": devnet.token,
        "amount": "100",
        "extra": {"receiverAuthorizer": Account.create().address, "withdrawDelay": 900},
    }
    channel = Channel.of(account, offer)
    signed = channel.voucher(account, 500)
    state = {"channelId": channel.id, "balance": "1000", "chargedCumulativeAmount": "400"}
    honest = {"channelState": state, "voucherState": {"signedMaxClaimable": "500", "signature": signed["signature"]}}
    assert channel.resync(account, honest) and (channel.charged, channel.balance) == (400, 1000)
    more = {**honest, "channelState": {**state, "chargedCumulativeAmount": "600"}}  # above what it signed
    stranger = {
        **honest,
        "voucherState": {**honest["voucherState"], "signature": channel.voucher(Account.create(), 500)["signature"]},
    }
    other = {**honest, "channelState": {**state, "channelId": "0x" + "11" * 32}}
    for lie in (more, stranger, other):
        assert not channel.resync(account, lie)
    assert (channel.charged, channel.balance) == (400, 1000)


def test_tollways_client_gives_a_refused_voucher_back_to_its_budget_only_when_shown_a_higher_one(devnet):
    from tollway.client.payer import Pending
    from tollway.payments.x402 import PAYMENT_REQUIRED, b64json

    account = Account.create()
    allowed = [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token, 6)]
    payer = Payer(account, allowed, schemes=("batch-settlement",), max_total_usd=Decimal(5))
    terms = {
        "scheme": "batch-settlement",
        "network": f"eip155:{devnet.chain_id}",
        "payTo": Account.create().address,
        "asset": devnet.token,
        "amount": "100",
        "extra": {"receiverAuthorizer": Account.create().address, "withdrawDelay": 900},
    }
    channel = payer.channel(terms)

    def corrective(shown: int) -> dict[str, str]:
        state = {"channelId": channel.id, "balance": "1000", "chargedCumulativeAmount": str(shown - 50)}
        signature = channel.voucher(account, shown)["signature"]
        extra = {
            **terms["extra"],
            "channelState": state,
            "voucherState": {"signedMaxClaimable": str(shown), "signature": signature},
        }
        return {PAYMENT_REQUIRED: b64json({"x402Version": 2, "accepts": [{**terms, "extra": extra}]})}

    payer.spent_usd = Decimal("0.0001")  # (the refused voucher's, signed from zero: 100 units)
    refused = Pending({}, terms, Decimal("0.0001"), total=100)
    assert payer.outdone(refused, corrective(100)) == 0  # the refused voucher itself: it may be all there is
    assert payer.outdone(refused, {PAYMENT_REQUIRED: b64json({"accepts": [terms]})}) == 0  # no proof
    assert payer.spent_usd == Decimal("0.0001")
    assert payer.outdone(refused, corrective(101)) == Decimal("0.0001") and payer.spent_usd == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "voucher"},
        {"type": "voucher", "channelConfig": [], "voucher": {}},
        {"type": "deposit", "channelConfig": {"payer": 1}, "voucher": {"channelId": "0x00"}},
        {"type": "refund", "amount": "-5"},
        {"type": ["voucher"]},
        "a string",
    ],
)
def test_hostile_channel_payloads_get_a_4xx_never_a_500(channel_gateway, payload):
    body = chat_body("hostile channel payloads", max_tokens=16)
    accepted = offer(channel_gateway, body)
    header = base64.b64encode(json.dumps({"x402Version": 2, "accepted": accepted, "payload": payload}).encode())
    for path in (CHAT, "/v1/channels/refund"):
        answer = requests.post(
            channel_gateway.url + path, json=body, headers={"PAYMENT-SIGNATURE": header.decode()}, timeout=30
        )
        assert 400 <= answer.status_code < 500, (path, answer.text)


# -- attacks: a deposit the payer cannot pay, a hang-up mid-stream, one refund twice at once -------------


def test_a_deposit_the_payer_cannot_fund_is_refused_before_anything_is_spent(channel_gateway, devnet, chain, upstream):
    """No upstream call, and no deposit transaction (no gas): the deposit is simulated first."""
    from tollway.client.channels import Channel

    account = chain.fund(1_000)  # far less than the suggested deposit
    body = chat_body("a deposit of money it does not have", max_tokens=16)
    accepted = offer(channel_gateway, body)
    channel = Channel.of(account, accepted)
    payload = channel.payload(account, accepted, deposit=int(accepted["extra"]["minDeposit"]))
    header = base64.b64encode(json.dumps({"x402Version": 2, "accepted": accepted, "payload": payload}).encode())
    asked = upstream_requests(upstream)
    deposits = "SELECT COUNT(*) FROM transactions WHERE purpose = 'deposit'"
    sent = ledger(channel_gateway, deposits)
    answer = requests.post(
        channel_gateway.url + CHAT, json=body, headers={"PAYMENT-SIGNATURE": header.decode()}, timeout=30
    )
    assert answer.status_code == 402
    assert refusal(answer)[1] in ("insufficient_funds", "invalid_batch_settlement_evm_deposit_simulation_failed")
    assert upstream_requests(upstream) == asked and ledger(channel_gateway, deposits) == sent
    assert chain.balance(account.address) == 1_000
    held = "SELECT COALESCE(SUM(balance), 0) FROM channels WHERE payer = :p"
    assert ledger(channel_gateway, held, p=account.address.lower()) == [(0,)]  # no deposit counted


def test_attack_a_deposit_below_the_advertised_minimum_is_refused_before_its_gas_is_spent(
    channel_gateway, devnet, chain, upstream
):
    """The gateway sends each deposit (and pays its gas), and refunds a channel's whole remainder on
    request: a payer depositing one quote, making one call and asking the rest back would have it
    send two transactions for that one call's charge, again and again. A deposit is at least the
    ``extra.minDeposit`` its 402 announced; a smaller one is refused before anything is sent."""
    from tollway.client.channels import Channel

    account = chain.fund(100_000_000)
    body = chat_body("a deposit of one quote", max_tokens=16)
    accepted = offer(channel_gateway, body)
    least = int(accepted["extra"]["minDeposit"])
    assert least == 100 * int(accepted["amount"])  # (min_deposit_calls = 100 here)
    asked = upstream_requests(upstream)
    deposits = "SELECT COUNT(*) FROM transactions WHERE purpose = 'deposit'"
    sent = ledger(channel_gateway, deposits)
    for deposit in (int(accepted["amount"]), least - 1):
        payload = Channel.of(account, accepted).payload(account, accepted, deposit=deposit)
        header = base64.b64encode(json.dumps({"x402Version": 2, "accepted": accepted, "payload": payload}).encode())
        answer = requests.post(
            channel_gateway.url + CHAT, json=body, headers={"PAYMENT-SIGNATURE": header.decode()}, timeout=30
        )
        assert refusal(answer) == (402, "invalid_batch_settlement_evm_deposit_below_min_deposit"), answer.text
    assert upstream_requests(upstream) == asked and ledger(channel_gateway, deposits) == sent
    assert chain.balance(account.address) == 100_000_000


def test_attack_one_deposit_sent_twice_at_once_is_deposited_and_counted_once(channel_gateway, devnet, chain, upstream):
    """A payer fires the same deposit payload twice at once, hoping its channel counts it twice (and
    its vouchers spend money the escrow never had): one call takes the channel, the other is refused
    before anything is spent; one deposit transaction, counted once, as the escrow holds it."""
    from tollway.client.channels import Channel

    account = chain.fund(100_000_000)
    body = chat_body("one deposit, sent twice at once", max_tokens=16)
    accepted = offer(channel_gateway, body)
    deposit = int(accepted["extra"]["minDeposit"])
    payload = Channel.of(account, accepted).payload(account, accepted, deposit=deposit)
    header = base64.b64encode(json.dumps({"x402Version": 2, "accepted": accepted, "payload": payload}).encode())
    asked = upstream_requests(upstream)
    deposits = "SELECT COUNT(*) FROM transactions WHERE purpose = 'deposit'"
    (sent,) = ledger(channel_gateway, deposits)[0]
    answers: list[requests.Response] = []
    run_concurrently(
        lambda _: answers.append(
            requests.post(
                channel_gateway.url + CHAT, json=body, headers={"PAYMENT-SIGNATURE": header.decode()}, timeout=60
            )
        ),
        range(2),
    )
    assert sorted(a.status_code for a in answers) == [200, 402], [a.text for a in answers]
    assert upstream_requests(upstream) == asked + 1  # (the refused one asked nothing of the upstream)
    assert ledger(channel_gateway, deposits) == [(sent + 1,)]  # (nor sent a transaction: no gas)
    channel = payer_channel(channel_gateway, account.address)
    assert channel["balance"] == deposit == escrow_channel(chain, channel["id"])[0]
    assert chain.balance(account.address) == 100_000_000 - deposit


def test_a_payer_who_hangs_up_mid_stream_frees_its_channel_and_is_charged_at_most_the_quote(
    channel_gateway, devnet, chain
):
    account = chain.fund(100_000_000)
    allowed = [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token, 6)]
    payer = Payer(account, allowed, schemes=("batch-settlement",), max_total_usd=Decimal(5))
    body = chat_body("hang up", max_tokens=200, stream=True, mock={"reply": "word " * 150, "chunk_delay": 0.02})
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=channel_gateway.url, timeout=30) as http:
        with http.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            for _ in zip(range(5), r.iter_lines(), strict=False):
                pass  # a few events, then the client is gone
        quote = int(offer(channel_gateway, body)["amount"])
        channel = wait_for(lambda: (c := payer_channel(channel_gateway, account.address))["busy"] is None and c)
        assert 0 < channel["charged"] <= quote
        # the channel serves the next call (the client resynchronises through the corrective 402)
        assert http.post(CHAT, json=chat_body("after hanging up", max_tokens=16)).status_code == 200
    assert payer_channel(channel_gateway, account.address)["charged"] > channel["charged"]


def test_one_refund_asked_twice_at_once_refunds_once(channel_gateway, devnet, chain):
    account = chain.fund(100_000_000)
    allowed = [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token, 6)]
    payer = Payer(account, allowed, schemes=("batch-settlement",), max_total_usd=Decimal(5))
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=channel_gateway.url, timeout=30) as http:
        assert http.post(CHAT, json=chat_body("before two refunds", max_tokens=16)).status_code == 200
    outcomes: list[Any] = []

    def ask(_: int) -> None:
        with httpx.Client(base_url=channel_gateway.url, timeout=60) as http:
            try:
                outcomes.append(refund_channel(payer, http))
            except PaymentRefused as exc:
                outcomes.append(exc)

    run_concurrently(ask, range(2))
    refunded = [o for o in outcomes if isinstance(o, dict)]
    assert len(refunded) == 1 and isinstance(next(o for o in outcomes if o not in refunded), PaymentRefused)
    channel = payer_channel(channel_gateway, account.address)
    assert int(refunded[0]["amount"]) == channel["refunded"] and channel["busy"] is None
    cost = payer_channel(channel_gateway, account.address)["charged"]
    assert chain.balance(account.address) == 100_000_000 - cost  # everything but the charge back, once


def test_a_refund_of_a_sliver_of_a_channel_is_refused_and_the_whole_rest_is_not(devnet, upstream, chain, tmp_path):
    """The gateway pays each refund's gas: a part of a channel asked back must be at least the
    smallest withdrawal (else a payer could make it pay gas again and again for one unit)."""
    settings, payee = channel_settings(devnet, upstream, tmp_path / "ledger.sqlite3", min_deposit_calls=100)
    settings = settings.model_copy(update={"min_withdrawal_usd": Decimal("0.01")})  # (10,000 units)
    account = chain.fund(100_000_000)
    allowed = [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token, 6)]
    payer = Payer(account, allowed, schemes=("batch-settlement",), max_total_usd=Decimal(5))
    with ServerThread(create_app(settings)) as server:
        gw = Gateway(server.url, Store(settings.database_url), payee)
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=server.url, timeout=30) as http:
            assert http.post(CHAT, json=chat_body("before a sliver", max_tokens=16)).status_code == 200
        with httpx.Client(base_url=server.url, timeout=60) as http:
            with pytest.raises(PaymentRefused, match="refund_too_small"):
                refund_channel(payer, http, amount=9_999)
            assert payer_channel(gw, account.address)["refunded"] == 0
            refunded = refund_channel(payer, http)  # (all of it: always)
        channel = payer_channel(gw, account.address)
        gw.store.close()
    assert int(refunded["amount"]) == channel["refunded"] > 0 and channel["busy"] is None


def test_a_deposit_call_whose_upstream_answers_slowly_is_served_once_deposited(channel_gateway, devnet, chain):
    """A call that ran long is checked on chain again before its answer is released; a channel's
    deposit, in the escrow by then, is not made (nor simulated) a second time."""
    payer = SdkPayer(chain.fund(100_000_000), devnet)
    slow = chat_body("a slow answer", max_tokens=16) | {"mock": {"latency": 0.6}}  # (recheck_after_seconds: 0.25)
    r = payer.call(channel_gateway, slow)
    assert r.status_code == 200, r.text
    channel = payer_channel(channel_gateway, payer.account.address)
    assert escrow_channel(chain, channel["id"])[0] == channel["balance"] > 0  # deposited once
    assert payer.call(channel_gateway, slow).status_code == 200  # and its vouchers pay as before


def test_a_deposit_mined_after_its_call_stopped_waiting_counts_in_its_channel(xprocess, upstream, tmp_path):
    """A deposit the chain is slow to mine fails its call (503, nothing asked of the upstream) — but
    once mined, the escrow holds the payer's money, and the channel counts it: its vouchers pay. A
    refund is refused while it is on its way (its escrow read would count the deposit, and then
    the deposit's conclusion again), and once it is mined refunds the rest, once."""
    with anvil_process(xprocess, "channels-late-deposit") as rpc:
        own = deploy_devnet(rpc)
        chain = Chain(own)
        settings, payee = channel_settings(own, upstream, tmp_path / "tollway.sqlite3", min_deposit_calls=100)
        settings = settings.model_copy(update={"settle_margin_seconds": 6})  # (the deposit's, the refund's wait)
        with ServerThread(create_app(settings)) as server:
            gateway = Gateway(server.url, Store(settings.database_url), payee)
            payer = SdkPayer(chain.fund(100_000_000), own)
            body = chat_body("a deposit the chain is slow to mine", max_tokens=16)
            asked = upstream_requests(upstream)
            chain.w3.provider.make_request("evm_setAutomine", [False])
            try:
                answer = payer.call(gateway, body)
            finally:
                chain.w3.provider.make_request("evm_setAutomine", [True])
            assert answer.status_code == 503 and int(answer.headers["Retry-After"]) > 0, answer.text
            assert upstream_requests(upstream) == asked
            assert payer_channel(gateway, payer.account.address)["balance"] == 0
            refunds = "SELECT COUNT(*) FROM transactions WHERE purpose = 'refund'"
            early = pay_voucher(gateway, body, payer, 0, kind="refund")
            assert refusal(early) == (402, "invalid_batch_settlement_evm_channel_busy"), early.text
            assert ledger(gateway, refunds) == [(0,)]  # (refused before any gas is spent)

            chain.w3.provider.make_request("evm_mine", [])
            channel = wait_for(lambda: (c := payer_channel(gateway, payer.account.address))["balance"] and c)
            assert escrow_channel(chain, channel["id"]) == (channel["balance"], 0) and channel["balance"] > 0
            paid = pay_voucher(gateway, body, payer, int(offer(gateway, body)["amount"]))
            assert paid.status_code == 200, paid.text
            charged = payer_channel(gateway, payer.account.address)["charged"]
            assert pay_voucher(gateway, body, payer, charged, kind="refund").status_code == 200
            after = payer_channel(gateway, payer.account.address)
            assert (after["balance"], after["refunded"]) == (charged, channel["balance"] - charged)
            assert escrow_channel(chain, channel["id"]) == (charged, charged)
            gateway.store.close()


def refund_in_flight(gateway: Gateway, channel: dict[str, Any], stand_in: str) -> dict[str, Any]:
    """A refund transaction queued for ``channel`` (from a sender of its own, ``stand_in``: the
    gateway's nonces are left alone; its bytes are nothing a node takes), holding the channel."""
    from tollway.ledger.channels import REFUND_HOLD, REFUND_IN_FLIGHT

    store = gateway.store
    store.sync_settler_nonce(stand_in, 0)
    columns = {"to": BATCH_SETTLEMENT_ADDRESS, "data": "0x", "gas": 1, "max_fee": 1, "tip": 1, "raw_tx": "0x"}
    tx = store.queue_transaction("refund", stand_in, lambda nonce: {**columns, "tx_hash": f"0x{nonce:064x}"})
    with store.engine.begin() as c:
        c.execute(
            text("UPDATE channels SET busy = :hold, busy_until = :flight WHERE id = :id"),
            {"hold": REFUND_HOLD + tx["id"], "flight": REFUND_IN_FLIGHT, "id": channel["id"]},
        )
    return tx


def a_mined_hash(chain: Chain) -> str:
    """A transaction mined on the devnet (the escrow is read as of its block)."""
    return "0x" + bytes(chain.w3.eth.get_block("latest")["transactions"][0]).hex()


def test_a_refund_its_request_did_not_see_end_holds_the_channel_until_the_escrow_says_how_it_ended(
    channel_gateway, devnet, chain
):
    """A refund was sent, and its request ended before it read the outcome (it stopped waiting, or
    its process stopped): the channel takes no voucher while the refund is open — the ledger's
    balance may be above the escrow's — and once it is concluded, the escrow's balance is the
    channel's, and it takes vouchers again."""
    payer = SdkPayer(chain.fund(100_000_000), devnet)
    assert payer.call(channel_gateway, chat_body("open it", max_tokens=16)).status_code == 200
    channel = payer_channel(channel_gateway, payer.account.address)
    store = channel_gateway.store
    escrow = escrow_channel(chain, channel["id"])[0]
    refund = refund_in_flight(channel_gateway, channel, "0x" + uuid.uuid4().hex[:40])
    with store.engine.begin() as c:  # (as a refund of 12345 the ledger has not heard of yet leaves it)
        c.execute(text("UPDATE channels SET balance = balance + 12345 WHERE id = :id"), {"id": channel["id"]})
    time.sleep(1.5)  # several claimer passes (every 0.3 s): open, so held
    assert store.channel(channel["id"])["busy"] == "refund:" + refund["id"]
    assert payer.call(channel_gateway, chat_body("not now", max_tokens=16)).status_code == 402  # (busy)
    assert store.transaction_mined(refund["id"], a_mined_hash(chain), True)
    concluded = wait_for(lambda: (row := store.channel(channel["id"]))["busy"] is None and row)
    assert concluded["balance"] == escrow and concluded["refunded"] == channel["refunded"] + 12345
    assert concluded["refund_nonce"] == channel["refund_nonce"] + 1 and concluded["busy_until"] == 0
    assert all(r["id"] != channel["id"] for r in store.refunds_left())
    assert payer.call(channel_gateway, chat_body("and on", max_tokens=16)).status_code == 200


def test_a_reverted_refund_its_request_did_not_see_end_leaves_the_channel_as_the_escrow_has_it(
    channel_gateway, devnet, chain
):
    payer = SdkPayer(chain.fund(100_000_000), devnet)
    assert payer.call(channel_gateway, chat_body("open it", max_tokens=16)).status_code == 200
    channel = payer_channel(channel_gateway, payer.account.address)
    store = channel_gateway.store
    refund = refund_in_flight(channel_gateway, channel, "0x" + uuid.uuid4().hex[:40])
    assert store.transaction_mined(refund["id"], a_mined_hash(chain), False)
    concluded = wait_for(lambda: (row := store.channel(channel["id"]))["busy"] is None and row)
    assert concluded["balance"] == escrow_channel(chain, channel["id"])[0] == channel["balance"]
    assert (concluded["refunded"], concluded["refund_nonce"]) == (channel["refunded"], channel["refund_nonce"])


def test_a_call_still_running_past_its_hold_keeps_its_channel(channel_gateway, devnet, chain):
    """A stream's charge may come after its hold on the channel ran out (a slow reader, a usage
    lookup after the fact): while its payment is reserved, no other call and no refund takes the
    channel — a refund would send back what the stream cost (attack: a stream for free)."""
    payer = SdkPayer(chain.fund(100_000_000), devnet)
    body = chat_body("a stream that runs long", max_tokens=16)
    assert payer.call(channel_gateway, body).status_code == 200
    channel = payer_channel(channel_gateway, payer.account.address)
    store, running = channel_gateway.store, "a-stream-" + uuid.uuid4().hex
    with store.engine.begin() as c:  # (a call holds the channel, its hold over, its payment still reserved)
        c.execute(
            text(
                "INSERT INTO payments (id, lock_key, scheme, network, asset, payer, payee, amount, state, proof,"
                " request_digest, deposit, created_at, updated_at) VALUES (:id, :id, 'batch-settlement', 'n', 'a',"
                " :payer, 'p', 1, 'reserved', '{}', 'd', 0, 0, 0)"
            ),
            {"id": running, "payer": channel["payer"]},
        )
        c.execute(
            text("UPDATE channels SET busy = :p, busy_until = 1 WHERE id = :id"), {"p": running, "id": channel["id"]}
        )
    amount = int(offer(channel_gateway, body)["amount"])
    assert refusal(pay_voucher(channel_gateway, body, payer, channel["charged"] + amount)) == (
        402,
        "invalid_batch_settlement_evm_channel_busy",
    )
    with pytest.raises(ChannelRefused) as refused:
        store.take_for_refund(channel["id"], channel["charged"], "a-refund", channel["payer"], 5.0)
    assert refused.value.reason == "busy"
    with store.engine.begin() as c:  # (the stream was charged: its stale hold no longer counts)
        c.execute(text("UPDATE payments SET state = 'settled' WHERE id = :id"), {"id": running})
    assert pay_voucher(channel_gateway, body, payer, channel["charged"] + amount).status_code == 200


def test_a_refund_whose_hold_lapsed_is_not_sent(channel_gateway, devnet, chain):
    """The refund's hold on its channel lapsed before its transaction was queued (the escrow reads
    took too long) and a call took the channel: nothing is queued, the call keeps the channel."""
    payer = SdkPayer(chain.fund(100_000_000), devnet)
    assert payer.call(channel_gateway, chat_body("open it", max_tokens=16)).status_code == 200
    channel = payer_channel(channel_gateway, payer.account.address)
    store = channel_gateway.store
    taken = store.take_for_refund(channel["id"], channel["charged"], "the-refund", channel["payer"], 0.0)
    assert taken["busy"] == "the-refund"
    with store.engine.begin() as c:  # (its hold ran out, and a call took the channel)
        c.execute(text("UPDATE channels SET busy = 'a-call' WHERE id = :id"), {"id": channel["id"]})
    stand_in = "0x" + uuid.uuid4().hex[:40]
    store.sync_settler_nonce(stand_in, 0)
    sign = lambda nonce: {"to": "0x", "data": "0x", "gas": 1, "max_fee": 1, "tip": 1, "tx_hash": "0x1", "raw_tx": "0x"}  # noqa: E731
    assert store.queue_refund(channel["id"], "the-refund", stand_in, sign) is None
    assert store.channel(channel["id"])["busy"] == "a-call"
    assert ledger(channel_gateway, "SELECT count(*) FROM transactions WHERE sender = :s", s=stand_in) == [(0,)]
    store.free_channel(channel["id"], "a-call")


def test_a_channel_all_claimed_whose_payer_starts_a_withdrawal_takes_no_more_vouchers(
    channel_gateway, devnet, chain, monkeypatch
):
    """A channel whose charges are all claimed still holds its payer's balance, which vouchers may
    spend: its payer's withdrawal is watched for too — else, once finalised, vouchers would be taken
    against money gone from the escrow. (The watch reads the channels in JSON-RPC batches: of one here.)"""
    from tollway.payments import chain as rpc

    monkeypatch.setattr(rpc, "BATCH_LIMIT", 1)
    account = chain.fund(100_000_000, eth=True)  # (it pays gas to withdraw)
    payer = SdkPayer(account, devnet)
    assert payer.call(channel_gateway, chat_body("before withdrawing", max_tokens=16)).status_code == 200
    store = channel_gateway.store
    channel = wait_for(lambda: (c := payer_channel(channel_gateway, account.address))["claimed"] == c["charged"] and c)
    config = json.loads(channel["config"])
    escrow = chain.w3.eth.contract(address=BATCH_SETTLEMENT_ADDRESS, abi=BATCH_SETTLEMENT_ABI)
    left = channel["balance"] - channel["claimed"]  # (what the escrow still holds for the payer)
    start = escrow.functions.initiateWithdraw(tuple(config[k] for k in CONFIG_FIELDS), left)
    tx = start.build_transaction(
        {"from": account.address, "nonce": chain.w3.eth.get_transaction_count(account.address), "gas": 300_000}
    )
    sent = chain.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    assert chain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1
    wait_for(lambda: store.channel(channel["id"])["withdraw_at"] > 0)
    body = chat_body("while withdrawing", max_tokens=16)
    refused = pay_voucher(
        channel_gateway, body, payer, channel["charged"] + int(offer(channel_gateway, body)["amount"])
    )
    assert refusal(refused) == (402, "invalid_batch_settlement_evm_channel_not_found")
