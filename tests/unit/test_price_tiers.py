"""Long-context price tiers: a model whose long prompts cost more (Claude Sonnet 4.5: $3/$15 per M,
$6/$22.50 from 200,000 prompt tokens) is quoted at the tier its prompt bound reaches and charged at
the tier its real prompt reaches — a short call at the base price."""

import json
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from tollway.chat import parse_chat
from tollway.config import ModelPrice, Settings
from tollway.errors import BadRequest
from tollway.pricing import Prices, to_atomic
from tollway.usage import Usage

SONNET = ModelPrice(
    prompt="0.000003",
    completion="0.000015",
    cache_read="3e-7",
    cache_write="3.75e-6",
    tiers=[{"min_prompt_tokens": 200_000, "prompt": "0.000006", "completion": "0.0000225", "cache_read": "6e-7"}],
)
TIERED = Prices.of(SONNET, 6)


def usd(prompt: int, completion: int, p: str, c: str) -> int:
    return to_atomic(prompt * Fraction(p) + completion * Fraction(c), 6)


def test_a_quote_prices_the_tier_its_prompt_bound_reaches():
    # (the dearest input price: the cache write's, below the tier and above it — there, its unnamed write's)
    assert TIERED.bound(199_999, 1000) == usd(199_999, 1000, "3.75e-6", "0.000015")
    assert TIERED.bound(200_000, 1000) == usd(200_000, 1000, "7.5e-6", "0.0000225")
    assert TIERED.bound(150_000, 1000) == Prices.of(SONNET.model_copy(update={"tiers": []}), 6).bound(150_000, 1000)


def test_a_call_costs_its_real_prompts_tier():
    assert TIERED.cost(Usage(1000, 500)) == usd(1000, 500, "0.000003", "0.000015")
    assert TIERED.cost(Usage(250_000, 500, cached_tokens=100_000)) == to_atomic(
        150_000 * Fraction("0.000006") + 100_000 * Fraction("6e-7") + 500 * Fraction("0.0000225"), 6
    )
    assert TIERED.at(199_999) is TIERED and TIERED.at(10**9) is TIERED.tiers[0][1]


def test_a_quote_covers_any_tier_below_its_bound_that_is_dearer():
    cheaper_above = ModelPrice(prompt="0.00001", completion="0.00001", tiers=[{"min_prompt_tokens": 10, "prompt": 0}])
    odd = Prices.of(cheaper_above, 6)
    assert odd.bound(100, 0) == to_atomic(100 * Fraction("0.00001"), 6) >= odd.cost(Usage(9, 0))


def test_scaled_prices_keep_their_tiers():
    byok = TIERED.scaled(Fraction(1, 20))
    assert byok.cost(Usage(1000, 500)) == to_atomic((1000 * Fraction("0.000003") + 500 * Fraction("0.000015")) / 20, 6)
    assert byok.cost(Usage(300_000, 0)) == to_atomic(300_000 * Fraction("0.000006") / 20, 6)
    assert [t for t, _ in byok.tiers] == [200_000]


def test_a_tier_keeps_the_base_prices_it_does_not_name_and_its_cache_prices_move_with_its_prompt():
    """A vendor's cache discount and write premium are multiples of its prompt price (Anthropic's
    long-context writes bill 1.25 times its long-context input): a tier that names no cache prices
    bills them at the base's times its prompt's rise — never below the base's. (Review: billed at the
    tier's plain prompt price, cache reads were charged 10 times over and writes below the bill.)"""
    price = ModelPrice(
        prompt="0.000003",
        completion="0.000015",
        request="0.001",
        cache_read="3e-7",
        cache_write="3.75e-6",
        cache_write_1h="6e-6",
        tiers=[{"min_prompt_tokens": 1000, "prompt": "0.000006"}],
    )
    [(threshold, tier)] = price.tier_prices()
    assert threshold == 1000
    assert tier == {
        "prompt": Decimal("0.000006"),
        "completion": Decimal("0.000015"),
        "request": Decimal("0.001"),
        "cache_read": Decimal("6e-7"),
        "cache_write": Decimal("7.5e-6"),
        "cache_write_1h": Decimal("0.000012"),
    }
    tiered = Prices.of(price, 6)
    written = Usage(250_000, 0, cache_write_tokens=250_000, cache_write_1h_tokens=250_000)
    assert tiered.cost(written, long_cache=True) == to_atomic(Fraction("0.001") + 250_000 * Fraction("0.000012"), 6)
    assert tiered.bound(250_000, 0, long_cache=True) == tiered.cost(written, long_cache=True)


LONG = ModelPrice(prompt="0.000003", completion="0.000015", tiers=[{"min_prompt_tokens": 1000, "prompt": "0.00003"}])
FLAT = ModelPrice(prompt="0.000004", completion="0.000015")
LONG_PROMPT = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}  # (~1,250 tokens expected)


def test_routing_expects_a_long_prompt_to_cost_its_tier():
    """An upstream cheap for short prompts and dear for long ones is not where a long one goes.
    (Review: the router ranked upstreams by base prices, and the payer was billed at the dear tier.)"""
    from tollway.pipeline import expected_costs

    call = parse_chat(json.dumps(LONG_PROMPT).encode(), Settings(models={"m": FLAT}), {"m": Prices.of(FLAT, 6)})
    gw = SimpleNamespace(
        router=SimpleNamespace(upstreams=[object(), object()]),
        upstream_prices={"m": {"tiered": Prices.of(LONG, 6), "flat": Prices.of(FLAT, 6)}},
        upstream_byok_prices={},
    )
    costs = expected_costs(gw, replace(call, prompt=[]), "payer")("m", ["tiered", "flat"])
    assert costs["tiered"] > costs["flat"], costs


def test_a_prompt_long_enough_for_a_tier_above_the_payers_max_price_is_refused():
    """(Review: checked against the base prices only, a long call was charged 7.5 times the payer's max_price.)"""
    settings, prices = Settings(models={"m": LONG}), {"m": Prices.of(LONG, 6)}
    within = {**LONG_PROMPT, "provider": {"max_price": {"prompt": 40}}}
    assert parse_chat(json.dumps(within).encode(), settings, prices).prompt_bound >= 1000
    short = {**LONG_PROMPT, "messages": [{"role": "user", "content": "x"}], "provider": {"max_price": {"prompt": 4}}}
    assert parse_chat(json.dumps(short).encode(), settings, prices).prompt_bound < 1000
    with pytest.raises(BadRequest) as refused:
        parse_chat(json.dumps({**LONG_PROMPT, "provider": {"max_price": {"prompt": 4}}}).encode(), settings, prices)
    assert refused.value.code == "no_route"


@pytest.mark.parametrize(
    "tiers",
    [
        [{"min_prompt_tokens": 500}, {"min_prompt_tokens": 100}],
        [{"min_prompt_tokens": 100}, {"min_prompt_tokens": 100}],
        [{"min_prompt_tokens": 0, "prompt": "1"}],
        [{"min_prompt_tokens": 100, "prompt": "-1"}],
        [{"min_prompt_tokens": 100, "image": "1"}],
    ],
)
def test_tiers_are_in_ascending_order_each_its_own(tiers):
    with pytest.raises(ValidationError):
        ModelPrice(prompt="0.000001", completion="0.000002", tiers=tiers)


def test_a_price_without_tiers_is_priced_as_before():
    flat = Prices.of(ModelPrice(prompt="0.000001", completion="0.000002"), 6)
    assert flat.tiers == () and flat.at(10**9) is flat
    assert flat.bound(1000, 1000) == flat.cost(Usage(1000, 1000)) == usd(1000, 1000, "0.000001", "0.000002")


def test_a_model_two_upstreams_serve_is_quoted_at_the_dearest_of_their_tiers_too():
    """The list price is raised to the dearest upstream's: an upstream whose long prompts cost more
    raises the model's tier, or a long call served there is billed above its quote."""
    from tollway.upstream_prices import dearest

    flat = ModelPrice(prompt="0.000004", completion="0.000015")
    raised = Prices.of(dearest(flat, [SONNET.price()]), 6)
    assert raised.cost(Usage(1000, 500)) == usd(1000, 500, "0.000004", "0.000015")  # (the flat one's dearer base)
    assert raised.cost(Usage(250_000, 500)) == usd(250_000, 500, "0.000006", "0.0000225")
    assert raised.bound(250_000, 500) >= Prices.of(SONNET, 6).bound(250_000, 500)


def test_attack_a_fallback_list_cannot_hide_a_members_tier_from_the_quote():
    """Forwarded vs priced: a long prompt sent with a cheap model first and a tiered one as its
    fallback is quoted at the tiered one's tier — whichever serves it is paid for."""
    settings = Settings(models={"flat": FLAT, "m": LONG})
    prices = {"flat": Prices.of(FLAT, 6), "m": Prices.of(LONG, 6)}
    body = {**LONG_PROMPT, "model": "flat", "models": ["flat", "m"], "max_tokens": 10}
    call = parse_chat(json.dumps(body).encode(), settings, prices)
    quote = call.quote(call.cap(metered=False)).amount
    assert quote >= prices["m"].bound(call.prompt_bound, 10) > prices["flat"].bound(call.prompt_bound, 10)
