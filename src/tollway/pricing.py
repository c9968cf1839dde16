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
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .config import ModelPrice
from .errors import BadRequest
from .usage import Usage

MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")
MAX_OUTPUT_TOKENS = 10_000_000  # no model writes more; bounds every quote far below uint256


def to_atomic(usd: Fraction, decimals: int) -> int:
    """USD (exact) → atomic units of a USD stablecoin, rounding up."""
    return math.ceil(usd * 10**decimals)


def atomic_to_usd(amount: int, decimals: int) -> Decimal:
    return Decimal(amount).scaleb(-decimals)


def money(amount: int | None, decimals: int) -> dict[str, str] | None:
    """An amount as the API shows it: atomic units and USD, both exact decimal strings."""
    return None if amount is None else {"atomic": str(amount), "usd": str(atomic_to_usd(int(amount), decimals))}


def per_million(price: Decimal) -> Decimal:
    return (price * 1_000_000).normalize()


def prompt_token_bound(raw: bytes, body: dict[str, Any], image_allowance: int) -> int:
    """An upper bound on the prompt tokens of a chat request (see module docstring)."""
    messages = body.get("messages")
    images = sum(
        1
        for m in messages or ()
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image")
    )
    return len(raw) + images * image_allowance


def output_token_cap(body: dict[str, Any], default_cap: int, model_cap: int | None) -> tuple[int, bool]:
    """The output-token cap to price and enforce, and whether the gateway must set it upstream."""
    asked = [body[f] for f in MAX_TOKEN_FIELDS if body.get(f) is not None]
    for value in asked:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadRequest("max_tokens must be a positive integer", code="invalid_max_tokens")
        if value > MAX_OUTPUT_TOKENS:
            raise BadRequest(f"max_tokens may be at most {MAX_OUTPUT_TOKENS}", code="max_tokens_too_large")
    limit = min(default_cap, model_cap) if model_cap else default_cap
    if asked:
        cap = min(asked)
        if model_cap and cap > model_cap:
            raise BadRequest(f"max_tokens may be at most {model_cap} for this model", code="max_tokens_too_large")
        return cap, False
    return limit, True


PRICE_FIELDS = ("prompt", "completion", "request", "cache_read", "cache_write")


@dataclass(frozen=True)
class Prices:
    """A model's prices, exact, as integers over one common ``denominator``: atomic units of the
    asset per token (per call for ``request``). Integer sums keep the hot path fast and exact."""

    prompt: int
    completion: int
    request: int
    cache_read: int
    cache_write: int
    denominator: int

    @classmethod
    def of(cls, p: ModelPrice, decimals: int) -> Prices:
        units = {k: Fraction(v) * 10**decimals for k, v in p.per_token().items()}
        denominator = math.lcm(*(f.denominator for f in units.values()))
        return cls(**{k: int(f * denominator) for k, f in units.items()}, denominator=denominator)

    def _atomic(self, numerator: int) -> int:
        return -(-numerator // self.denominator)  # rounding up, once per call

    def bound(self, prompt_tokens: int, output_tokens: int) -> int:
        """The most a call can cost: every prompt token at the dearest input price."""
        dearest_input = max(self.prompt, self.cache_write, self.cache_read)
        return self._atomic(self.request + prompt_tokens * dearest_input + output_tokens * self.completion)

    def cost(self, usage: Usage) -> int:
        """What a call cost from its usage; unknown cache figures bill at the plain prompt price."""
        cached = usage.cached_tokens or 0
        written = usage.cache_write_tokens or 0
        plain = max(usage.prompt_tokens - cached - written, 0)
        return self._atomic(
            self.request
            + plain * self.prompt
            + cached * self.cache_read
            + written * self.cache_write
            + usage.completion_tokens * self.completion
        )

    def per_million(self, field: str) -> int:
        """Atomic units per million tokens (rounded up)."""
        return self._atomic(getattr(self, field) * 1_000_000)
