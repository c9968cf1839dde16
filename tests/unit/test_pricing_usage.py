"""Prices, bounds, usage dialects and stream tails — pure functions."""

import json
from decimal import Decimal
from fractions import Fraction

import pytest

from tollway.config import ModelPrice
from tollway.errors import BadRequest
from tollway.mock_upstream import count_tokens
from tollway.pricing import Prices, asked_cap, prompt_token_bound, to_atomic
from tollway.usage import MAX_COUNT, StreamTail, Usage, answer_doc, parse_usage, usage_of_answer

PRICES = Prices.of(
    ModelPrice(
        prompt=Decimal("0.000001"),
        completion=Decimal("0.000002"),
        cache_read=Decimal("0.0000001"),
        cache_write=Decimal("0.00000125"),
        request=Decimal("0.0001"),
    ),
    6,
)


def test_rounding_is_up_and_exact():
    assert to_atomic(Fraction(0), 6) == 0
    assert to_atomic(Fraction(1, 10**6), 6) == 1
    assert to_atomic(Fraction(1, 10**7), 6) == 1  # a tenth of a unit rounds up to one
    assert to_atomic(Fraction(3, 1), 6) == 3_000_000


def test_bound_uses_dearest_input_price():
    # 100 prompt tokens at the cache-write price, 10 output tokens, one request fee
    usd = Fraction("0.0001") + 100 * Fraction("0.00000125") + 10 * Fraction("0.000002")
    assert PRICES.bound(100, 10) == to_atomic(usd, 6)


def test_cost_splits_cached_and_written_tokens():
    usage = Usage(prompt_tokens=100, completion_tokens=10, cached_tokens=60, cache_write_tokens=30)
    expected = (
        Fraction("0.0001")
        + 10 * Fraction("0.000001")
        + 60 * Fraction("0.0000001")
        + 30 * Fraction("0.00000125")
        + 10 * Fraction("0.000002")
    )
    assert PRICES.cost(usage) == to_atomic(expected, 6)
    unknown = Usage(prompt_tokens=100, completion_tokens=10)  # no cache figures: plain prompt price
    usd = Fraction("0.0001") + 100 * Fraction("0.000001") + 10 * Fraction("0.000002")
    assert PRICES.cost(unknown) == to_atomic(usd, 6)


@pytest.mark.parametrize(
    "content",
    ["hi", "héllo wörld " * 50, "🦊🦊🦊 emoji", "中文字符测试" * 20, 'a\nb\tc\\"d', "x" * 5000, ""],
)
def test_prompt_bound_covers_the_mock_tokenizer(content):
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]}
    for raw in (json.dumps(body).encode(), json.dumps(body, ensure_ascii=False).encode()):
        assert prompt_token_bound(raw, 0, 0) >= count_tokens(body["messages"])


def test_images_add_an_allowance():
    raw = b'{"messages":[]}'
    assert prompt_token_bound(raw, 2, 500) == prompt_token_bound(raw, 0, 500) + 1000


def test_fractional_prices_stay_exact():
    thirds = Prices.of(ModelPrice(prompt=Decimal(1) / 3, completion=Decimal("0.0000000001")), 6)
    # 3 prompt tokens at 1/3 USD... is exactly 1 USD: no float, no premature rounding
    assert thirds.cost(Usage(3, 0)) == to_atomic(3 * Fraction(Decimal(1) / 3), 6)
    assert thirds.cost(Usage(0, 1)) == 1  # a ten-thousandth of a unit still costs one unit


def test_output_cap():
    assert asked_cap({}, None) is None
    assert asked_cap({"max_tokens": 50}, None) == 50
    assert asked_cap({"max_tokens": 50, "max_completion_tokens": 20}, None) == 20
    assert asked_cap({"max_tokens": 1, "max_completion_tokens": 100_000}, None) == 1
    assert asked_cap({"n_predict": -1}, None) is None  # llama.cpp: "no limit"
    assert asked_cap({"n_predict": 7, "max_output_tokens": 9, "max_new_tokens": 8}, None) == 7
    for bad in (0, -1, "10", 1.5, True):
        with pytest.raises(BadRequest):
            asked_cap({"max_tokens": bad}, None)
    with pytest.raises(BadRequest):
        asked_cap({"max_tokens": 300}, 256)


DIALECTS = {
    "openai": (
        {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 64}},
        None,
        (100, 5, 64, None),
    ),
    "openrouter": (
        {
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "cost": 0.00012,
            "prompt_tokens_details": {"cached_tokens": 64, "cache_write_tokens": 36},
        },
        None,
        (100, 5, 64, 36),
    ),
    "deepseek": (
        {"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36},
        None,
        (100, 5, 64, None),
    ),
    "anthropic": (
        {"input_tokens": 6, "output_tokens": 5, "cache_read_input_tokens": 64, "cache_creation_input_tokens": 30},
        None,
        (100, 5, 64, 30),
    ),
    "llamacpp": ({"prompt_tokens": 100, "completion_tokens": 5}, {"cache_n": 64}, (100, 5, 64, None)),
    "none": ({"prompt_tokens": 100, "completion_tokens": 5}, None, (100, 5, None, None)),
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_usage_dialects(dialect):
    usage, timings, (prompt, completion, cached, written) = DIALECTS[dialect]
    u = parse_usage(usage, timings)
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.cache_write_tokens) == (
        prompt,
        completion,
        cached,
        written,
    )


def test_reasoning_reported_beside_the_output_is_charged_as_output():
    """xAI counts reasoning apart from ``completion_tokens``, but in ``total_tokens`` (and its bill):
    the output is what the total says beyond the prompt. (Adversarial review: 386 of 387 output
    tokens went uncharged.)"""
    xai = {
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "total_tokens": 397,
        "completion_tokens_details": {"reasoning_tokens": 386},
    }
    assert parse_usage(xai).completion_tokens == 387
    openai = {**xai, "completion_tokens": 387, "completion_tokens_details": {"reasoning_tokens": 386}}
    assert parse_usage(openai).completion_tokens == 387  # (reasoning inside the output: counted once)
    assert parse_usage({**xai, "total_tokens": 5}).completion_tokens == 1  # (a total short of the parts: the parts)


def test_upstream_cost_is_kept_exact():
    assert parse_usage(DIALECTS["openrouter"][0]).upstream_cost == Decimal("0.00012")


def test_an_upstream_cost_that_is_no_number_is_no_figure():
    for said in (b"NaN", b"Infinity", b"-Infinity", b"true", b'"0.1"'):
        doc = answer_doc(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 1, "cost": %s}}' % said)
        assert usage_of_answer(doc).upstream_cost is None, said


def test_usage_garbage_is_none():
    for garbage in (None, "x", [], {}, {"prompt_tokens": "3", "completion_tokens": 1}, {"prompt_tokens": -1}):
        assert parse_usage(garbage) is None
    assert answer_doc(b"not json") is None and usage_of_answer(answer_doc(b"not json")) is None


def test_stream_tail_reads_usage_from_the_last_chunk():
    tail = StreamTail(keep=512)
    for i in range(200):  # far more than the tail keeps
        tail.feed(b'data: {"choices":[{"delta":{"content":"w%d "}}]}\n\n' % i)
    final = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 200}}
    tail.feed(b"data: " + json.dumps(final).encode() + b"\n\n")
    tail.feed(b"data: [DONE]\n\n")
    assert tail.usage() == Usage(7, 200)
    assert tail.error() is None


def test_a_stream_counts_its_events_not_the_data_colons_a_model_wrote():
    """A stream without usage is charged by its events: "data:" in the content is no event (each
    one counted a model's most tokens per event), and a line's start split across reads still is."""
    events = [b'data: {"choices":[{"delta":{"content":"data: data:data:"}}]}', b'data: {"choices":[]}', b"data: [DONE]"]
    stream = b"\n\n".join(events) + b"\n\n"
    for cuts in ([], [len(events[0]) + 1], [len(events[0]) + 2, len(events[0]) + 4], [30], [*range(1, len(stream))]):
        tail = StreamTail()
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            tail.feed(stream[a:b])
        assert tail.events_seen == 3, cuts
    crlf = StreamTail()
    crlf.feed(stream.replace(b"\n", b"\r\n"))
    assert crlf.events_seen == 3


def test_stream_tail_reports_midstream_error():
    tail = StreamTail()
    tail.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    tail.feed(b'data: {"error":{"message":"provider died","code":500},"choices":[]}\n\n')
    assert tail.error() == "provider died"
    assert tail.usage() is None


def test_absurd_token_counts_are_kept_within_what_the_ledger_stores():
    usage = parse_usage({"prompt_tokens": 2**63, "completion_tokens": 10**30, "total_tokens": -1})
    assert usage is not None and usage.prompt_tokens == usage.completion_tokens == MAX_COUNT


PRICED = Prices.of(ModelPrice(prompt="0.000001", completion="0.000002", cache_read="1e-7", cache_write="1.25e-6"), 6)


@pytest.mark.parametrize(
    "reported",
    [
        {
            "prompt_tokens": 1000,
            "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 1000},
        },
        {"prompt_tokens": 1000, "completion_tokens": 0, "prompt_tokens_details": {"cache_write_tokens": 50_000}},
        {
            "prompt_tokens": 1000,
            "completion_tokens": 0,
            "cache_read_input_tokens": 1000,
            "cache_creation_input_tokens": 1000,
        },
    ],
)
def test_no_prompt_token_is_billed_as_both_read_from_the_cache_and_written_to_it(reported):
    usage = parse_usage(reported)
    assert (usage.cached_tokens or 0) + usage.cache_write_tokens <= usage.prompt_tokens
    assert PRICED.cost(usage) <= PRICED.bound(usage.prompt_tokens, usage.completion_tokens)


@pytest.mark.parametrize("bad", [12000.0, -1, "12000"])
def test_a_malformed_prompt_count_is_unknown_in_every_dialect(bad):
    cache_fields = {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    assert parse_usage({"prompt_tokens": bad, "completion_tokens": 5}) is None
    assert parse_usage({"input_tokens": bad, "output_tokens": 5, **cache_fields}) is None  # (was 0: a free prompt)
    assert parse_usage({"prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": bad, "completion_tokens": 5}) is None
    assert parse_usage({"output_tokens": 5, **cache_fields}).prompt_tokens == 0  # (no input count: the cache's alone)


def test_a_stream_without_usage_is_estimated_within_the_output_it_was_asked_for():
    tail = StreamTail()
    for i in range(10):
        tail.feed(b'data: {"choices":[{"delta":{"content":"w%d "}}]}\n\n' % i)
    assert tail.estimate(100, 16, output_bound=1000).completion_tokens == 160
    assert tail.estimate(100, 16, output_bound=2 * 3).completion_tokens == 6  # (max_tokens 2, n 3)


@pytest.mark.parametrize(
    ("events", "answered"),
    [
        (["content_block_stop"], True),
        (["content_block_stop", "ping"], True),  # (Messages' keep-alive after the answer's end)
        (["content_block_stop", "content_block_start", "content_block_delta"], False),  # (a thinking block's end)
        (["response.output_item.done"], True),
        (["response.output_item.done", "response.output_item.added"], False),
    ],
)
def test_a_stream_has_answered_once_its_newest_event_ends_a_block(events, answered):
    tail = StreamTail()
    for kind in events:
        tail.feed(f"event: {kind}\ndata: {json.dumps({'type': kind, 'index': 0})}\n\n".encode())
    assert tail.answered() is answered
