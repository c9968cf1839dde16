"""What ``tollway doctor`` says of the least payment on chain: on a chain the defaults do not
know (no fee ceiling of its own, the gas token priced as ETH), it is tens of dollars — a warning
that names the settings that size it. (A review of the operator's path.)"""

from __future__ import annotations

from decimal import Decimal

from tollway.config import Settings, resolve_chain
from tollway.doctor import least_payment_finding


def test_the_least_payment_is_said_and_warned_of_where_it_is_large():
    base = least_payment_finding(resolve_chain(Settings(), 8453))
    assert (base.level, base.detail) == ("ok", "a payment on chain is at least 0.175 USD, a withdrawal 0.1625 USD")
    polygon = least_payment_finding(resolve_chain(Settings(), 137))
    assert polygon.level == "warn" and polygon.detail.startswith("a payment on chain is at least 35 USD")
    assert "chain.fee_ceiling_gwei" in polygon.detail and "chain.native_usd" in polygon.detail
    chosen = least_payment_finding(resolve_chain(Settings(min_chain_payment_usd=Decimal("0.01")), 137))
    assert chosen.level == "ok"
