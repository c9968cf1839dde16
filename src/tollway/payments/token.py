"""What the schemes that move one token on one EVM chain with a signed authorization share
(``exact``: EIP-3009; ``upto``: Permit2): where they pay and who settles, the offer, and a short
memory of payers just found short of funds (so a flood of their payments costs no RPC calls)."""

from __future__ import annotations

import time
from typing import Any, Self

from ..bounded import Recently
from ..errors import PaymentInvalid
from .base import Context, Offer
from .chain import Chain

SHORT_MEMORY = 2.0  # seconds a payer found short of funds is refused without asking the chain again


class TokenScheme:
    name: str
    rails: tuple[str, ...] = ("x402",)

    def __init__(
        self,
        *,
        chain: Chain,
        chain_id: int,
        token: str,
        token_name: str,
        token_version: str,
        payee: str,
        settler: str,
        timeout: int,
        min_validity: int,
    ) -> None:
        self.chain = chain
        self.chain_id = chain_id
        self.network = f"eip155:{chain_id}"
        self.token = token
        self.payee = payee
        self.settler = settler  # the settlement account: it sends (and simulates) every settlement
        self.timeout = timeout
        self.min_validity = min_validity  # how long an authorization must stay valid, from now
        self.extra: dict[str, Any] = {"name": token_name, "version": token_version}
        self._short = Recently(SHORT_MEMORY)  # payers known to be short of funds

    @classmethod
    def from_settings(cls, ctx: Context) -> Self:
        return cls(**cls.where(ctx))

    @classmethod
    def where(cls, ctx: Context) -> dict[str, Any]:
        """The token, chain and accounts a scheme of this kind is built for, from settings."""
        c = ctx.settings.chain
        if not (c.token and c.payee):
            raise ValueError(f"the {cls.name} scheme needs chain.token and chain.payee")
        return dict(
            chain=ctx.chain,
            chain_id=ctx.chain_id,
            token=c.token,
            token_name=c.token_name,
            token_version=c.token_version,
            payee=c.payee,
            settler=ctx.settler,
            timeout=ctx.settings.offer_timeout_seconds,
            min_validity=ctx.settings.min_validity_seconds,
        )

    def offer(self, amount: int) -> Offer:
        return Offer(self.name, self.network, self.token, self.payee, amount, self.timeout, dict(self.extra))

    def extensions(self) -> dict[str, Any]:
        return {}

    def response_extra(self, channel: dict[str, Any] | None, charged: int | None) -> dict[str, Any] | None:
        return None

    def refuse_if_short(self, payer: str) -> float:
        """Refuse a payer found short of funds moments ago; the time now (monotonic) otherwise."""
        if payer in self._short:
            raise PaymentInvalid("payer balance does not cover this payment", code="insufficient_funds")
        return time.monotonic()

    def remember_short(self, payer: str, now: float) -> None:
        self._short.add(payer, now)
