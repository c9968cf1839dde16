"""The free tier: a model marked ``free`` is served without payment, up to a daily quota (UTC
days) per wallet that signs in for the request (``SIGN-IN-WITH-X``) or else per client address,
and one for all clients together (wallets are free to make, and addresses to rent).

The client address is the connection's peer, or — only behind a proxy listed in
``trusted_proxies`` (none by default) — the address that proxy names (uvicorn's proxy headers,
configured from the same list by ``tollway serve``): a client cannot choose its own address by
sending ``X-Forwarded-For``. An IPv6 address counts by its /64, which one host may rotate in.

A call takes its slot in the ledger as it starts (one statement, so replicas count together) and
gives it back if it was not served. Identities are kept as a keyed hash: no address is stored.
Beyond the quota: ``429 free_quota_exhausted`` with ``Retry-After`` until the next UTC day — and,
for an address, a sign-in to sign for the wallet's own quota. A free call's payment row has
scheme ``free``, amount 0 and payer ``free`` (one ledger account for every free call); its
receipt shows what the call would have cost as 0.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from dataclasses import replace
from typing import Any

from starlette.requests import Request

from .chat import ChatCall
from .errors import TooManyRequests
from .payments.base import Quote, Verified
from .payments.credit import CreditScheme

DAY = 86400
PAYER = "free"
EVERYONE = "*"  # the identity every free call also counts under (``free_calls_per_day``)


def today(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // DAY)


def address_of(host: str) -> str:
    """The address a client is counted by: itself, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class FreeScheme(CreditScheme):
    """How a free call goes through the payment seam: like credit, nothing moves on chain; and
    nothing is held or charged (its quote is 0). No rail carries it: it is never offered."""

    name = "free"
    rails = ()


class FreeTier:
    def __init__(self, settings: Any, store: Any, key: bytes, chain_id: int, token: str, payee: str) -> None:
        self.settings, self.store = settings, store
        self.key = hashlib.sha256(b"tollway free tier|" + key).digest()
        self.scheme = FreeScheme(chain_id=chain_id, token=token, payee=payee, timeout=0)

    def covers(self, call: ChatCall, models: dict[str, Any]) -> bool:
        """Every model the call may be served by is free."""
        return all(models[m.model].free for m in call.members)

    def identity(self, request: Request, wallet: str | None) -> tuple[str, int, str]:
        """(the keyed hash the call is counted under, its daily quota, what it is: wallet or address)."""
        if wallet is not None:
            who, quota, kind = f"wallet:{wallet}", self.settings.free_calls_per_wallet, "wallet"
        else:
            host = request.client.host if request.client else ""
            who, quota, kind = f"address:{address_of(host)}", self.settings.free_calls_per_address, "address"
        return hmac.new(self.key, who.encode(), hashlib.sha256).hexdigest()[:32], quota, kind

    def take(self, request: Request, call: ChatCall, wallet: str | None) -> tuple[FreeScheme, Verified, Quote]:
        """A slot of the day's quota for this call (429 once it is spent), as a payment of 0."""
        identity, quota, kind = self.identity(request, wallet)
        now = time.time()
        day = today(now)
        tomorrow = max(1, int((day + 1) * DAY - now))
        n = self.store.take_free_call(identity, day, quota)
        if n is None:
            raise TooManyRequests(
                f"the free tier's {quota} calls a day per {kind} are spent for today (UTC)"
                + ("; a wallet that signs in (SIGN-IN-WITH-X) has a quota of its own" if kind == "address" else ""),
                code="free_quota_exhausted",
                retry_after=tomorrow,
            )
        if self.store.take_free_call(EVERYONE, day, self.settings.free_calls_per_day) is None:
            self.store.return_free_call(identity, day)
            raise TooManyRequests(
                f"the free tier's {self.settings.free_calls_per_day} calls a day, all clients together,"
                " are spent for today (UTC)",
                code="free_tier_exhausted",
                retry_after=tomorrow,
            )
        s = self.scheme
        payment = Verified(
            scheme=s.name,
            network=s.network,
            asset=s.token.lower(),
            payer=PAYER,
            payee=s.payee.lower(),
            amount=0,
            lock_key=f"free:{identity}:{day}:{n}:{os.urandom(8).hex()}",  # (a slot given back is taken again)
            proof={"free": identity, "day": day},
        )
        # (served with at most the default output cap, all its choices together: a free call asking
        # for 100k tokens, or for 8 choices of the cap each, would keep an operator's own model busy)
        cap = min(call.cap(metered=False), max(1, self.settings.default_max_tokens // call.choices))
        return s, payment, replace(call.quote(cap), amount=0)

    def give_back(self, payment: Verified) -> None:
        """The call was not served: its slots are free again."""
        for identity in (payment.proof["free"], EVERYONE):
            self.store.return_free_call(identity, payment.proof["day"])
