"""What the gateway refuses to start with on a real chain (``doctor.chain_findings``, which
``Gateway.open`` and ``tollway doctor`` run), on an anvil under another chain's id: keys whose
private half is public, a payee that is no account of the operator's, fees that could never be
mined, a payout account without gas. (An adversarial review of the operator's path.)"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account

from conftest import anvil_process, gateway_settings
from support import Chain, free_port
from tollway import doctor
from tollway.config import UpstreamSettings
from tollway.devnet.anvil import DEV_KEYS
from tollway.devnet.deploy import deploy_devnet
from tollway.gateway import Gateway
from tollway.ledger import Store, sql
from tollway.payments.chain import Chain as RpcChain
from tollway.payments.permit2 import PERMIT2_ADDRESS

BASE_SEPOLIA = 84532  # not the devnet's id: the real-chain checks apply (its fee ceiling: 0.5 gwei)
PUBLIC_KEY = DEV_KEYS[7]  # anvil's account 7: every anvil prints its private key
GWEI = 10**9


@pytest.fixture(scope="module")
def outside(xprocess) -> Iterator[Chain]:
    with anvil_process(xprocess, "real-chain-checks", chain_id=BASE_SEPOLIA) as rpc:
        chain = Chain(deploy_devnet(rpc))
        chain.w3.provider.make_request("anvil_setNextBlockBaseFeePerGas", [hex(GWEI // 10)])
        chain.mine(1)  # (a base fee a 0.5 gwei ceiling clears, as Base Sepolia's does)
        yield chain


def settings_for(chain: Chain, upstream, tmp_path, chain_changes: dict[str, Any] | None = None, **changes: Any):
    """A configuration for the outside chain that passes every check (a payee and a funded
    settlement key of its own, a public URL), with ``changes``."""
    settings = gateway_settings(
        chain.devnet, upstream.url + "/v1", tmp_path / "ledger.sqlite3", public_url=f"http://127.0.0.1:{free_port()}"
    )
    settler = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [settler.address, hex(10**18)])
    chain_changes = {
        "payee": Account.create().address,
        "settler_key": "0x" + settler.key.hex(),
        **(chain_changes or {}),
    }
    return settings.model_copy(update={"chain": settings.chain.model_copy(update=chain_changes), **changes})


def failures(settings) -> list[str]:
    async def run() -> list[doctor.Finding]:
        rpc = RpcChain(str(settings.chain.rpc_url))
        try:
            return (await doctor.chain_findings(settings, rpc))[0]
        finally:
            await rpc.close()

    return [f"{f.what}: {f.detail}" for f in asyncio.run(run()) if f.level == "fail"]


def test_a_good_configuration_passes_and_the_gateway_opens(outside, upstream, tmp_path):
    settings = settings_for(outside, upstream, tmp_path)
    assert failures(settings) == []

    async def opens() -> None:
        await (await Gateway.open(settings)).close()

    asyncio.run(opens())


def test_a_public_key_that_signs_away_money_is_refused(outside, upstream, tmp_path):
    """The channels' authorizer signs the escrow's refunds (with a public one, any payer takes back
    what its channel was charged for calls it was served); an upstream's payer key holds the
    wallet that pays it. Only the payee's, settler's and payout keys were checked."""
    channels = settings_for(outside, upstream, tmp_path).channels.model_copy(update={"authorizer_key": PUBLIC_KEY})
    assert failures(settings_for(outside, upstream, tmp_path, channels=channels)) == [
        "channels.authorizer_key: is a devnet account whose private key is public"
    ]
    paying = UpstreamSettings(name="paid", url=upstream.url + "/v1", payer_key=PUBLIC_KEY, pay_assets=["eip155:1:0x1"])
    assert failures(settings_for(outside, upstream, tmp_path, upstreams=[paying])) == [
        "upstream paid: payer_key: is a devnet account whose private key is public"
    ]


@pytest.mark.parametrize("payee", ["token", "0x" + "00" * 20, PERMIT2_ADDRESS])
def test_a_payee_that_is_no_account_of_the_operators_is_refused(outside, upstream, tmp_path, payee):
    """Paid to the token itself, to no one or to a contract of the protocols, the money is lost."""
    payee = outside.devnet.token if payee == "token" else payee
    found = failures(settings_for(outside, upstream, tmp_path, {"payee": payee}))
    assert len(found) == 1 and found[0].startswith("chain.payee:") and "lost" in found[0], found


def test_a_payout_account_without_gas_is_refused(outside, upstream, tmp_path):
    """It holds the tokens withdrawals are paid from, but no gas: every withdrawal was accepted
    (the credit taken) and never sent."""
    payout = Account.create()
    found = failures(settings_for(outside, upstream, tmp_path, {"payout_key": "0x" + payout.key.hex()}))
    assert found == [f"chain.payout_key: {payout.address} holds 0 of the gas token: it cannot pay withdrawals"]


def test_fees_no_settlement_would_be_mined_at_are_refused(outside, upstream, tmp_path):
    """With the base fee above what settlements may bid (fee_ceiling_gwei: 0.5 gwei by default on
    Base Sepolia), none is mined: every payment taken would be served, then expire unsettled."""
    settings = settings_for(outside, upstream, tmp_path)
    try:
        outside.w3.provider.make_request("anvil_setNextBlockBaseFeePerGas", [hex(20 * GWEI)])
        outside.mine(1)
        assert failures(settings) == [
            "chain.fee_ceiling_gwei: settlements bid 0.5 gwei (ceiling 0.5); the base fee is 20 gwei:"
            " no settlement would be mined"
        ]
        # A fixed bid below the base fee is raised (+25% every 10 s, up to the ceiling): mined later —
        # unless it could not be raised enough within the settlement margin (60 s: 6 raises, ×3.8).
        fixed = settings.chain.model_copy(update={"fee_ceiling_gwei": 100, "max_fee_gwei": 10})
        assert failures(settings.model_copy(update={"chain": fixed})) == []
        far = fixed.model_copy(update={"max_fee_gwei": 5})
        assert failures(settings.model_copy(update={"chain": far})) == [
            "chain.max_fee_gwei: settlements bid 5 gwei (ceiling 100); the base fee is 20 gwei: raised, it would"
            " clear it too late for payments to settle"
        ]
    finally:
        outside.w3.provider.make_request("anvil_setNextBlockBaseFeePerGas", [hex(GWEI // 10)])
        outside.mine(1)


def test_a_new_authorizer_key_is_refused_while_channels_owe_what_only_the_old_one_claims(outside, upstream, tmp_path):
    """Each claim is signed by the receiver authorizer its channel names (by default the settlement
    key): with a new key, every voucher charged before it could not be claimed any more, and its
    payer could withdraw what its calls cost. Refused until those channels are claimed. (Review.)"""
    settings = settings_for(outside, upstream, tmp_path)
    old = Account.create().address.lower()
    store = Store(settings.database_url)
    try:
        now = time.time()
        channel = {"id": "0x" + "ab" * 32, "network": "eip155:1", "asset": "0x1", "payer": "0x2", "signature": "0x"}
        config = json.dumps({"receiverAuthorizer": old, "withdrawDelay": 900})
        channel |= {"config": config, "balance": 100, "signed_max": 40, "claimed": 10}
        channel |= {"charged": 40, "created_at": now, "updated_at": now, "busy_until": 0}
        channel |= dict.fromkeys(("claim_to", "refunded", "refund_nonce", "withdraw_at"), 0)
        with store._sql() as c:
            c.run(sql.insert("channels", channel), channel)
        found = [str(f) for f in doctor.ledger_findings(store, BASE_SEPOLIA, "0xgenesis", settings)]
        assert found[1:] == [
            f"fail  channels.authorizer_key: channels owe 30 units claimable only with the key of {old}, which it"
            " no longer is: set it back until they are claimed"
        ]
        with store._sql() as c:  # its payer started a withdrawal: while it may not be finished, still refused…
            c.run("UPDATE channels SET withdraw_at = :at", {"at": int(now) - 899})
        assert len(doctor.ledger_findings(store, BASE_SEPOLIA, "0xgenesis", settings)) == 2
        with store._sql() as c:  # …once it may be, what it owed is lost anyway: no key change is refused for it
            c.run("UPDATE channels SET withdraw_at = :at", {"at": int(now) - 901})
        assert [f.level for f in doctor.ledger_findings(store, BASE_SEPOLIA, "0xgenesis", settings)] == ["ok"]
        with store._sql() as c:
            c.run("UPDATE channels SET withdraw_at = 0, claimed = charged", {})  # (claimed: nothing owed)
        assert [f.level for f in doctor.ledger_findings(store, BASE_SEPOLIA, "0xgenesis", settings)] == ["ok"]
    finally:
        store.close()
