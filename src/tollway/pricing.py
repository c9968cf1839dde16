"""Prices → amounts: the quote's upper bound before a call and the actual cost after it.

The one rounding rule: a call's cost is summed exactly in USD (``Fraction``) and converted to
the asset's atomic units once, rounding **up** (a payer is never charged a fraction of a unit
more than the exact cost, and the gateway never undercharges by rounding).

Upper bound on prompt tokens: every token of a byte-level BPE or SentencePiece tokenizer covers
at least one UTF-8 byte, and the JSON framing of each message (``{"role":"user","content":""}``,
28 bytes) outweighs the few special tokens a chat template adds, so the byte length of the
request body — messages, tools, response format: all that becomes prompt — bounds the prompt
tokens (JSON escapes only make it longer). Images are not bytes-bounded; each image part adds a
configured allowance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .config import Price
from .errors import BadRequest
from .usage import Usage

MAX_OUTPUT_TOKENS = 10_000_000  # no model writes more; bounds every quote far below uint256
MAX_AMOUNT = 2**63 - 1  # the ledger's integers are 64-bit: no amount may reach 2**63


def to_atomic(usd: Fraction, decimals: int) -> int:
    """USD (exact) → atomic units of a USD stablecoin, rounding up."""
    return math.ceil(usd * 10**decimals)


def atomic_to_usd(amount: int, decimals: int) -> Decimal:
    return Decimal(amount).scaleb(-decimals)


def plain(value: Decimal) -> str:
    """A decimal as people write it: ``0.0000001``, ``10`` — never ``1E-7`` or ``1E+1``."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def money(amount: int | None, decimals: int) -> dict[str, str] | None:
    """An amount as the API shows it: atomic units and USD, both exact decimal strings."""
    return None if amount is None else {"atomic": str(amount), "usd": plain(atomic_to_usd(int(amount), decimals))}


def per_million(price: Decimal) -> Decimal:
    return price * 1_000_000


def prompt_token_bound(encoded: bytes, images: int, image_tokens: int) -> int:
    """An upper bound on the prompt tokens of a chat request (see module docstring): the bytes of
    the body forwarded, plus an allowance per image."""
    return len(encoded) + images * image_tokens


# Output-cap fields of the dialects tollway forwards to: OpenAI (both), Responses, llama.cpp, TGI.
CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict", "max_new_tokens")


def asked_cap(body: dict[str, Any], model_cap: int | None) -> int | None:
    """The output-token cap a request sets itself: the smallest of its cap fields (None if it
    sets none; llama.cpp's ``n_predict`` <= 0 means "no limit"), never above the model's own."""
    asked = []
    for f in CAP_FIELDS:
        value = body.get(f)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(f"{f} must be a positive integer", code="invalid_max_tokens")
        if f == "n_predict" and value <= 0:
            continue
        if value < 1:
            raise BadRequest(f"{f} must be a positive integer", code="invalid_max_tokens")
        if value > MAX_OUTPUT_TOKENS:
            raise BadRequest(f"{f} may be at most {MAX_OUTPUT_TOKENS}", code="max_tokens_too_large")
        asked.append(value)
    if not asked:
        return None
    cap = min(asked)
    if model_cap and cap > model_cap:
        raise BadRequest(f"max_tokens may be at most {model_cap} for this model", code="max_tokens_too_large")
    return cap


@dataclass(frozen=True)
class Prices:
    """A model's prices, exact, as integers over one common ``denominator``: atomic units of the
    asset per token (per call for ``request``). Integer sums keep the hot path fast and exact.
    ``cache_write_1h`` is None when the model has no price for one-hour cache writes.

    The fields are the base prices; ``tiers`` are a long-context model's dearer ones, each from its
    threshold of prompt tokens on (``at``). A quote covers every tier up to its prompt bound's; a
    call costs its real prompt's tier — one of those, as the real prompt is within the bound."""

    prompt: int
    completion: int
    request: int
    cache_read: int
    cache_write: int
    denominator: int
    cache_write_1h: int | None = None
    tiers: tuple[tuple[int, Prices], ...] = ()  # (min_prompt_tokens, prices), ascending

    @classmethod
    def of(cls, p: Price, decimals: int) -> Prices:
        base = cls._exact(p.per_token(), decimals)
        if not p.tiers:
            return base
        return replace(base, tiers=tuple((n, cls._exact(per, decimals)) for n, per in p.tier_prices()))

    @classmethod
    def _exact(cls, per_token: dict[str, Decimal], decimals: int) -> Prices:
        units = {k: Fraction(v) * 10**decimals for k, v in per_token.items()}
        denominator = math.lcm(*(f.denominator for f in units.values()))
        return cls(**{k: int(f * denominator) for k, f in units.items()}, denominator=denominator)

    def at(self, prompt_tokens: int) -> Prices:
        """The prices a call of ``prompt_tokens`` prompt tokens bills at: its tier's, or the base."""
        found = self
        for threshold, prices in self.tiers:
            if prompt_tokens < threshold:
                break
            found = prices
        return found

    def scaled(self, share: Fraction) -> Prices:
        """These prices times ``share`` (a BYOK call pays ``byok_fee`` of the list price), exactly."""
        n, d = share.numerator, share.denominator
        one_hour = None if self.cache_write_1h is None else self.cache_write_1h * n
        return Prices(
            self.prompt * n,
            self.completion * n,
            self.request * n,
            self.cache_read * n,
            self.cache_write * n,
            self.denominator * d,
            one_hour,
            tuple((threshold, prices.scaled(share)) for threshold, prices in self.tiers),
        )

    def _atomic(self, numerator: int) -> int:
        return -(-numerator // self.denominator)  # rounding up, once per call

    def bound(self, prompt_tokens: int, output_tokens: int, *, long_cache: bool = False) -> int:
        """The most a call can cost: every prompt token at the dearest input price (one-hour cache
        writes included when the request asks for them), in the dearest tier a prompt within the
        bound ``prompt_tokens`` can reach (the bound's own, unless a tier below it is dearer)."""
        dearest_input = max(self.prompt, self.cache_write, self.cache_read)
        if long_cache and self.cache_write_1h is not None:
            dearest_input = max(dearest_input, self.cache_write_1h)
        most = self._atomic(self.request + prompt_tokens * dearest_input + output_tokens * self.completion)
        for threshold, tier in self.tiers:  # (a tier has no tiers of its own)
            if prompt_tokens < threshold:
                break
            most = max(most, tier.bound(prompt_tokens, output_tokens, long_cache=long_cache))
        return most

    def cost(self, usage: Usage, *, long_cache: bool = False) -> int:
        """What a call cost from its usage; unknown cache figures bill at the plain prompt price.
        Cache writes of a request that asked for one-hour caching bill at that price — those the
        upstream says it wrote for an hour, when it tells them apart; else all of them. At the tier
        of the prompt's tokens (all of them, cached ones included)."""
        if self.tiers and (tier := self.at(usage.prompt_tokens)) is not self:
            return tier.cost(usage, long_cache=long_cache)
        cached = usage.cached_tokens or 0
        written = usage.cache_write_tokens or 0
        plain = max(usage.prompt_tokens - cached - written, 0)
        hour = 0
        if long_cache and self.cache_write_1h is not None:
            hour = written if usage.cache_write_1h_tokens is None else min(usage.cache_write_1h_tokens, written)
        return self._atomic(
            self.request
            + plain * self.prompt
            + cached * self.cache_read
            + (written - hour) * self.cache_write
            + hour * (self.cache_write_1h or 0)
            + usage.completion_tokens * self.completion
        )

    def per_million(self, field: str) -> int:
        """Atomic units per million tokens (rounded up)."""
        return self._atomic(getattr(self, field) * 1_000_000)
