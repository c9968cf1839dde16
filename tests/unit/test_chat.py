"""The quote bounds the call: one strict parse, caps lowered to the priced cap, unpriced fields refused."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from tollway.chat import parse_chat
from tollway.config import ModelPrice, Settings
from tollway.errors import BadRequest, NotFound
from tollway.pricing import CAP_FIELDS, Prices

MODELS = {
    "m": ModelPrice(prompt=Decimal("0.000001"), completion=Decimal("0.000002")),
    "long": ModelPrice(
        prompt=Decimal("0.000003"),
        completion=Decimal("0.000015"),
        cache_write=Decimal("0.00000375"),
        cache_write_1h=Decimal("0.000006"),
        upstream_model="vendor/long",
    ),
}
SETTINGS = Settings(models=MODELS, default_max_tokens=1024, max_choices=4)
PRICES = {k: Prices.of(v, 6) for k, v in MODELS.items()}


def parse(body: dict | bytes, **kw):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_chat(raw, SETTINGS, PRICES, **kw)


def body(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def refused(b: dict | bytes, code: str) -> str:
    with pytest.raises(BadRequest) as exc:
        parse(b)
    assert exc.value.code == code, exc.value.message
    return exc.value.message


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","messages":[{"role":"user","content":"a"}],"max_tokens":1,"max_tokens":100000}',
        b'{"model":"m","model":"m","messages":[{"role":"user","content":"a"}]}',
        b'{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}',
    ],
)
def test_duplicate_keys_are_refused(raw):
    refused(raw, "duplicate_key")


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
def test_non_finite_numbers_are_refused(number):
    refused(b'{"model":"m","messages":[{"role":"user","content":"a"}],"temperature":' + number + b"}", "invalid_number")


def test_the_priced_cap_goes_in_the_upstreams_own_cap_field_alone():
    call = parse(body(max_tokens=1, max_completion_tokens=100_000, n_predict=-1))
    assert call.quote().max_tokens == 1
    for own in ("max_tokens", "max_completion_tokens", "n_predict"):
        sent = json.loads(call.forward(own, 1))
        assert sent[own] == 1 and not [f for f in CAP_FIELDS if f in sent and f != own], sent
    assert call.cap(metered=True) == call.cap(metered=False) == 1  # the request's own cap, whatever the scheme
    assert call.forward("max_tokens", 1) is call.forward("max_tokens", 1)  # (made once)


@pytest.mark.parametrize("field", ["n_predict", "max_new_tokens", "max_output_tokens", "max_completion_tokens"])
def test_a_cap_set_in_a_field_the_upstream_does_not_read_is_sent_in_its_own_too(field):
    """Priced at the client's cap, in whatever cap field it named: the upstream must get that cap in
    the field it reads, or it generates (and bills) up to its own default."""
    call = parse(body(**{field: 2}))
    assert call.quote().max_tokens == 2
    for own in ("max_tokens", "max_completion_tokens", "n_predict"):
        sent = json.loads(call.forward(own, 2))
        assert sent[own] == 2 and (field == own or field not in sent), sent
        assert len(call.forward(own, 2)) <= call.quote().prompt_bound


def test_metered_payments_are_priced_at_the_metered_cap():
    call = parse(body())
    assert (
        call.cap(metered=False) == SETTINGS.default_max_tokens and call.cap(metered=True) == SETTINGS.metered_max_tokens
    )
    assert call.quote(call.cap(metered=True)).amount > call.quote().amount


def test_a_request_without_a_cap_gets_the_upstreams_own_field():
    call = parse(body())
    assert call.quote().max_tokens == 1024
    assert json.loads(call.forward("max_tokens", 1024))["max_tokens"] == 1024
    as_llama = json.loads(call.forward("n_predict", 1024))
    assert as_llama["n_predict"] == 1024 and "max_tokens" not in as_llama


def test_the_bound_covers_the_widest_body_any_upstream_gets():
    for call in (parse(body()), parse(body(provider={"order": ["x"] * 20, "max_price": {"prompt": 5}}))):
        for field in ("max_tokens", "max_completion_tokens", "n_predict"):
            for cap in (call.cap(metered=False), call.cap(metered=True)):
                for routes_providers in (False, True):
                    assert len(call.forward(field, cap, routes_providers)) <= call.quote().prompt_bound


def test_provider_preferences_go_only_to_an_upstream_that_routes_between_providers():
    call = parse(body(provider={"order": ["vendor-a"], "max_price": {"completion": 3}}))
    assert "provider" not in json.loads(call.forward("max_tokens", 8))  # a vendor's API may refuse it
    sent = json.loads(call.forward("max_tokens", 8, routes_providers=True))["provider"]
    # OpenRouter may charge at most tollway's prices (USD per million tokens)
    assert sent == {"order": ["vendor-a"], "max_price": {"prompt": 1.0, "completion": 2.0, "request": 0.0}}
    plain = json.loads(parse(body()).forward("max_tokens", 8, routes_providers=True))
    assert plain["provider"] == {"max_price": {"prompt": 1.0, "completion": 2.0, "request": 0.0}}
    nitro = parse(body(model="m:nitro"))
    assert nitro.model == "m" and json.loads(nitro.forward("max_tokens", 8))["model"] == "m"
    assert json.loads(nitro.forward("max_tokens", 8, True))["provider"]["sort"] == "throughput"


def test_a_model_dearer_than_the_payers_max_price_is_refused_before_any_quote():
    message = refused(body(provider={"max_price": {"completion": "1.5"}}), "no_route")
    assert "completion" in message
    assert parse(body(provider={"max_price": {"prompt": 1, "completion": 2}})).model == "m"
    refused(body(provider={"sort": "fastest"}), "invalid_provider")


def test_choices_multiply_the_priced_output():
    one, three = parse(body(max_tokens=100)), parse(body(max_tokens=100, n=3))
    per_choice = 100 * PRICES["m"].completion // PRICES["m"].denominator
    assert three.quote().choices == 3
    assert three.quote().amount - one.quote().amount >= 2 * per_choice
    assert parse(body(max_tokens=100, best_of=4)).quote().choices == 4
    refused(body(n=5), "unpriced_parameter")
    refused(body(n=0), "invalid_request")


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        ({"plugins": [{"id": "web"}]}, "plugins"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"tools": [{"type": "web_search_preview"}]}, "web_search_preview"),
    ],
)
def test_fields_whose_cost_cannot_be_bounded_are_refused(extra, word):
    assert word in refused(body(**extra), "unpriced_parameter")


def test_a_fallback_list_is_quoted_at_its_dearest_model_and_each_gets_its_own_body():
    alone = parse(body(max_tokens=100))
    listed = parse(body(max_tokens=100, models=["long", "m"]))  # model m, then long
    assert [c.model for c in listed.members] == ["m", "long"]
    dearest = parse(body(model="long", max_tokens=100))
    assert listed.quote().amount == max(dearest.quote().amount, alone.quote().amount) > alone.quote().amount
    assert listed.quote().model == "m"  # (the quote names the first)
    sent = json.loads(listed.member("long").forward("max_tokens", 100))
    assert sent["model"] == "vendor/long" and "models" not in sent
    assert "models" not in json.loads(listed.forward("max_tokens", 100))
    assert listed.member("long").prices == dearest.prices
    only_list = parse({"models": ["long", "m"], "messages": [{"role": "user", "content": "hi"}]})
    assert [c.model for c in only_list.members] == ["long", "m"]


@pytest.mark.parametrize(
    ("models", "code"),
    [
        ("m", "invalid_models"),
        ([], "invalid_models"),
        ([1], "invalid_models"),
        (["m"] * 9, "invalid_models"),
    ],
)
def test_a_malformed_fallback_list_is_refused(models, code):
    refused(body(models=models), code)


def test_a_fallback_list_names_only_offered_models_within_every_cap():
    with pytest.raises(NotFound):
        parse(body(models=["m", "nope"]))
    capped = Settings(models={**MODELS, "small": ModelPrice(prompt=1, completion=1, max_tokens=50)})
    prices = {**PRICES, "small": Prices.of(capped.models["small"], 6)}
    with pytest.raises(BadRequest) as err:
        parse_chat(json.dumps(body(models=["small"], max_tokens=100)).encode(), capped, prices)
    assert err.value.code == "max_tokens_too_large"
    both = parse_chat(json.dumps(body(models=["small"])).encode(), capped, prices)
    assert both.cap(metered=False) == 50 and both.cap(metered=True) == 50  # (what every model can serve)


@pytest.mark.parametrize("part", ["input_audio", "file", "video_url", "input_file", "document"])
def test_unpriced_media_is_refused(part):
    content = [{"type": "text", "text": "what is this?"}, {"type": part, part: {"data": "AAAA"}}]
    refused({"model": "m", "messages": [{"role": "user", "content": content}]}, "unpriced_parameter")


def test_images_are_priced_by_their_allowance():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    plain = parse(body(max_tokens=1))
    one = parse({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [image]}]})
    assert one.quote().prompt_bound >= SETTINGS.image_token_allowance
    assert one.quote().amount > plain.quote().amount


def test_a_request_with_tools_allows_for_the_providers_hidden_tool_prompt():
    """Anthropic models add a tool-use system prompt (~350 tokens) through chat too: a small request
    with one tiny tool was quoted below what it cost, and the operator paid the difference."""
    from tollway.chat import TOOL_PROMPT_TOKENS

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    plain, tooled = parse(body(max_tokens=1)), parse(body(max_tokens=1, tools=[tool]))
    assert tooled.quote().prompt_bound >= plain.quote().prompt_bound + TOOL_PROMPT_TOKENS
    legacy = parse(body(max_tokens=1, functions=[tool["function"]]))  # (the field tools replaced)
    assert legacy.quote().prompt_bound >= plain.quote().prompt_bound + TOOL_PROMPT_TOKENS


def test_one_hour_cache_writes_need_their_price():
    marked = {
        "role": "user",
        "content": [{"type": "text", "text": "long", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
    }
    refused({"model": "m", "messages": [marked]}, "unpriced_parameter")
    five_minutes = parse({"model": "long", "messages": [{**marked, "content": [{"type": "text", "text": "x"}]}]})
    one_hour = parse({"model": "long", "messages": [marked]})
    assert one_hour.long_cache and not five_minutes.long_cache
    odd = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "9d"}}
    bad_ttl = {**marked, "content": [odd]}
    refused({"model": "long", "messages": [bad_ttl]}, "unpriced_parameter")


def test_cache_writes_bill_at_one_hour_only_as_far_as_the_upstream_wrote_them_for_an_hour():
    """A request marking a one-hour prefix and a five-minute breakpoint: Anthropic's usage tells the
    writes apart (``cache_creation``), and each bills at its own TTL's price. Where the upstream does
    not tell them apart, all of them bill at the hour's. (Adversarial review: +58% on such calls.)"""
    from tollway.usage import parse_usage

    prices = PRICES["long"]
    apart = {
        "input_tokens": 10,
        "output_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 50_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 50_000, "ephemeral_1h_input_tokens": 0},
    }
    usage = parse_usage(apart)
    assert usage.cache_write_tokens == 50_000 and usage.cache_write_1h_tokens == 0
    five_minutes = 10 * 3 + 50_000 * Decimal("3.75")  # (millionths of a dollar)
    assert prices.cost(usage, long_cache=True) == five_minutes
    hour = parse_usage({**apart, "cache_creation": {"ephemeral_1h_input_tokens": 50_000}})
    assert prices.cost(hour, long_cache=True) == 10 * 3 + 50_000 * 6
    together = parse_usage({k: v for k, v in apart.items() if k != "cache_creation"})
    assert prices.cost(together, long_cache=True) == 10 * 3 + 50_000 * 6
    lying = parse_usage({**apart, "cache_creation": {"ephemeral_1h_input_tokens": 10**9}})
    assert lying.cache_write_1h_tokens == 50_000  # (no more written for an hour than written)


def test_forwarding_keeps_strings_and_order_and_renames_the_model():
    messages = [
        {"role": "system", "content": "  spaced\u00a0 ünïcode 🦊 \\n", "cache_control": {"type": "ephemeral"}},
        {"content": "b", "role": "user"},
    ]
    raw = json.dumps({"zeta": 1, "model": "long", "messages": messages, "alpha": "x"}, indent=2).encode()
    call = parse(raw)
    sent = json.loads(call.forward("max_tokens", 1024))
    assert sent["messages"] == messages
    assert list(sent) == ["zeta", "model", "messages", "alpha", "max_tokens"]
    assert [list(m) for m in sent["messages"]] == [list(m) for m in messages]
    assert sent["model"] == "vendor/long"


def test_streams_always_ask_for_usage():
    sent = json.loads(parse(body(stream=True, stream_options={"other": 1})).forward("max_tokens", 8))
    assert sent["stream_options"] == {"other": 1, "include_usage": True}


def test_a_quote_too_large_for_the_ledger_is_refused():
    huge = {"m": ModelPrice(prompt=Decimal(10**12), completion=Decimal(1))}
    with pytest.raises(BadRequest) as exc:
        parse_chat(json.dumps(body()).encode(), Settings(models=huge), {"m": Prices.of(huge["m"], 6)})
    assert exc.value.code == "quote_too_large"


def test_require_parameters_keeps_the_models_known_to_support_the_request():
    models = {
        "plain": ModelPrice(
            prompt=Decimal("0.000001"), completion=Decimal("0.000002"), supported_parameters=["max_tokens"]
        ),
        "schema": ModelPrice(
            prompt=Decimal("0.000001"),
            completion=Decimal("0.000002"),
            supported_parameters=["max_tokens", "response_format", "structured_outputs", "temperature"],
        ),
        "unknown": ModelPrice(prompt=Decimal("0.000001"), completion=Decimal("0.000002")),
    }
    settings, prices = Settings(models=models), {k: Prices.of(v, 6) for k, v in models.items()}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}

    def ask(model: str, **extra):
        raw = {"model": model, "messages": [{"role": "user", "content": "hi"}], "response_format": fmt, **extra}
        return parse_chat(json.dumps(raw).encode(), settings, prices)

    assert ask("plain").model == "plain"  # (not required: the upstream decides)
    with pytest.raises(BadRequest) as exc:
        ask("plain", provider={"require_parameters": True})
    assert exc.value.code == "no_route" and "response_format, structured_outputs" in exc.value.message
    assert ask("plain", models=["schema"], provider={"require_parameters": True}).model == "schema"
    assert ask("unknown", provider={"require_parameters": True}).model == "unknown"  # (nothing known against it)
    with pytest.raises(BadRequest) as exc:
        ask("schema", provider={"require_parameters": "yes"})
    assert exc.value.code == "invalid_provider"


def test_what_orjson_refuses_is_priced_and_forwarded_all_the_same():
    """A body orjson cannot encode (an integer beyond 64 bits) takes the standard library's path for
    its digest, its prompt bound and the bytes forwarded alike: the upstream gets exactly the JSON
    that was priced, and the digest does not depend on key order."""
    body = {"model": "m", "messages": [{"role": "user", "content": "naïve ✓"}], "seed": 2**70}
    call = parse(body)
    sent = json.loads(call.forward("max_tokens", call.cap(metered=True)))
    assert sent["seed"] == 2**70 and sent["messages"] == body["messages"]
    reordered = {k: body[k] for k in reversed(list(body))}
    assert parse(reordered).digest == call.digest
    assert call.prompt_bound >= len(json.dumps(body["messages"], ensure_ascii=False).encode()) // 4
