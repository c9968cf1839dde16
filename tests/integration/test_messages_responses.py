"""Anthropic's POST /v1/messages and OpenAI's POST /v1/responses, paid like chat: forwarded
untranslated (cache_control marks byte for byte), quoted on their own output-cap field, metered in
their own usage dialects (streamed and not), through the official Anthropic and OpenAI SDKs; what a
quote cannot bound is refused before any quote; a quote for one API pays no other."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import httpx
import pytest

from conftest import gateway_settings
from support import ServerThread, error_code, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport, anthropic_client, openai_client
from tollway.client.payer import sign_exact
from tollway.config import UpstreamSettings
from tollway.mock_upstream import create_app as create_mock
from tollway.payments.x402 import b64json, unb64json
from tollway.pricing import to_atomic

SYSTEM = [
    {"type": "text", "text": "You answer briefly. " + "The rules are long. " * 30},
    {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
]


@pytest.fixture(scope="module")
def gw(devnet, tmp_path_factory):
    """Two mock upstreams: "chat-only" (first; speaks chat alone) and "all", whose key goes in
    x-api-key (as Anthropic's API wants it)."""
    mock = create_mock()
    with ServerThread(create_mock()) as chat_only, ServerThread(mock) as everything:
        settings = gateway_settings(devnet, "", tmp_path_factory.mktemp("surfaces") / "l.sqlite3")
        upstreams = [
            UpstreamSettings(name="chat-only", url=chat_only.url + "/v1", surfaces=["chat"]),
            UpstreamSettings(name="all", url=everything.url + "/v1", api_key="sk-upstream-key", key_header="x-api-key"),
        ]
        settings = settings.model_copy(update={"upstreams": upstreams})
        with ServerThread(create_app(settings)) as server:
            yield server, settings, mock.state.mock


def payer_of(chain, devnet) -> Payer:
    """A payer whose wallet pays by upto (Permit2 approved): the metered cost moves, nothing more."""
    return Payer(chain.fund(permit2=True), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])


def paying(chain, devnet) -> httpx.Client:
    return httpx.Client(transport=SyncPayingTransport(payer_of(chain, devnet)), timeout=30)


def charged(settings, usage: dict) -> int:
    """What the gateway charges for ``usage`` (its receipt's counts) at mock/echo's prices."""
    p = settings.models["mock/echo"]
    cached, written = usage["cached_tokens"] or 0, usage["cache_write_tokens"] or 0
    usd = (
        (usage["prompt_tokens"] - cached - written) * Fraction(p.prompt)
        + cached * Fraction(p.cache_read)
        + written * Fraction(p.cache_write)
        + usage["completion_tokens"] * Fraction(p.completion)
    )
    return to_atomic(usd, 6)


def test_the_anthropic_sdk_pays_for_a_message_metered_in_anthropics_dialect(gw, chain, devnet):
    server, settings, mock = gw
    client = anthropic_client(server.url, payer_of(chain, devnet))
    text = f"hello messages {time.time()}"
    first = client.messages.create(
        model="mock/echo", max_tokens=20, system=SYSTEM, messages=[{"role": "user", "content": text}]
    )
    assert first.content[0].text == f"echo: {text}" and first.stop_reason == "end_turn"
    # forwarded untranslated: every block and cache_control mark as sent; the key in x-api-key
    assert mock.last_request["system"] == SYSTEM and mock.last_request["max_tokens"] == 20
    assert mock.last_headers["x-api-key"] == "sk-upstream-key" and "authorization" not in mock.last_headers
    assert mock.last_headers["anthropic-version"]  # (the SDK's own, passed on)

    again = client.messages.create(
        model="mock/echo", max_tokens=20, system=SYSTEM, messages=[{"role": "user", "content": text + " again"}]
    )
    assert again.usage.cache_read_input_tokens > 0  # the upstream's cache survived the gateway
    r = client.messages.with_raw_response.create(
        model="mock/echo", max_tokens=20, system=SYSTEM, messages=[{"role": "user", "content": text + " third"}]
    )
    message = r.parse()  # (the raw response: the receipt id is a header)
    receipt = wait_receipt(server.url, r.headers["x-tollway-receipt"])
    u = message.usage
    assert receipt["upstream"] == "all" and receipt["usage"]["dialect"] == "anthropic" and receipt["api"] == "messages"
    assert receipt["usage"]["prompt_tokens"] == (
        u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    )
    assert receipt["usage"]["cached_tokens"] == u.cache_read_input_tokens > 0
    assert receipt["usage"]["completion_tokens"] == u.output_tokens
    assert int(receipt["cost"]["atomic"]) == charged(settings, receipt["usage"]) == int(r.headers["x-tollway-cost"])
    assert "cost" not in r.json()["usage"]  # (the answer goes back as the upstream sent it)


def test_a_streamed_message_is_metered_from_its_start_and_delta_events(gw, chain, devnet):
    server, settings, _ = gw
    client = anthropic_client(server.url, payer_of(chain, devnet))
    text = "stream " + " ".join(f"w{i}" for i in range(30))
    with client.messages.stream(
        model="mock/echo", max_tokens=12, system=SYSTEM, messages=[{"role": "user", "content": text}]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
        receipt_id = stream.response.headers["x-tollway-receipt"]
    assert len(pieces) == 12 and final.stop_reason == "max_tokens"
    receipt = wait_receipt(server.url, receipt_id)
    assert receipt["status"] == "served" and receipt["usage"]["dialect"] == "anthropic"
    assert receipt["usage"]["completion_tokens"] == final.usage.output_tokens == 12
    assert receipt["usage"]["prompt_tokens"] == (
        final.usage.input_tokens + final.usage.cache_read_input_tokens + final.usage.cache_creation_input_tokens
    )
    assert int(receipt["cost"]["atomic"]) == charged(settings, receipt["usage"])


def test_the_openai_sdk_pays_for_responses_streamed_and_not(gw, chain, devnet):
    server, settings, mock = gw
    client = openai_client(server.url + "/v1", payer_of(chain, devnet))
    instructions = "Answer briefly. " + "Some long instructions. " * 20
    r = client.responses.with_raw_response.create(
        model="mock/echo", instructions=instructions, input="hello responses", max_output_tokens=30
    )
    response = r.parse()
    assert response.output_text == "echo: hello responses"
    assert mock.last_request["max_output_tokens"] == 30 and mock.last_request["instructions"] == instructions
    receipt = wait_receipt(server.url, r.headers["x-tollway-receipt"])
    assert receipt["api"] == "responses" and receipt["usage"]["prompt_tokens"] == response.usage.input_tokens
    assert receipt["usage"]["completion_tokens"] == response.usage.output_tokens
    assert int(receipt["cost"]["atomic"]) == charged(settings, receipt["usage"])

    with client.responses.with_streaming_response.create(
        model="mock/echo", instructions=instructions, input="hello again", max_output_tokens=30, stream=True
    ) as streamed:
        events = [json.loads(line[5:]) for line in streamed.iter_lines() if line.startswith("data:")]
        receipt_id = streamed.headers["x-tollway-receipt"]
    done = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and done["output"][0]["content"][0]["text"] == "echo: hello again"
    receipt = wait_receipt(server.url, receipt_id)
    assert receipt["usage"]["prompt_tokens"] == done["usage"]["input_tokens"]
    assert receipt["usage"]["cached_tokens"] == done["usage"]["input_tokens_details"]["cached_tokens"] > 0
    assert receipt["usage"]["completion_tokens"] == done["usage"]["output_tokens"]
    assert int(receipt["cost"]["atomic"]) == charged(settings, receipt["usage"])


@pytest.mark.parametrize(
    ("path", "cap_field", "body"),
    [
        ("/v1/messages", "max_tokens", {"messages": [{"role": "user", "content": "no cap"}]}),
        ("/v1/responses", "max_output_tokens", {"input": "no cap"}),
    ],
)
def test_a_request_without_a_cap_is_served_with_the_cap_it_was_priced_at(gw, chain, devnet, path, cap_field, body):
    server, settings, mock = gw
    with paying(chain, devnet) as http:
        r = http.post(server.url + path, json={"model": "mock/echo", **body})
    assert r.status_code == 200, r.text
    assert mock.last_request[cap_field] == settings.metered_max_tokens  # (paid by upto: the metered cap)
    if path == "/v1/messages":  # (Anthropic requires a version: a client that names none gets one)
        assert mock.last_headers["anthropic-version"] == "2023-06-01"
    too_many = {"model": "mock/echo", **body, cap_field: 10**9}
    assert error_code(httpx.post(server.url + path, json=too_many)) == "max_tokens_too_large"


MESSAGE = {"model": "mock/echo", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
RESPONSE = {"model": "mock/echo", "input": "hi"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {**MESSAGE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        ("/v1/messages", {**MESSAGE, "tools": [{"type": "bash_20250124", "name": "bash"}]}),
        ("/v1/messages", {**MESSAGE, "mcp_servers": [{"type": "url", "url": "https://example.com"}]}),
        ("/v1/messages", {**MESSAGE, "container": "c1"}),
        ("/v1/messages", {**MESSAGE, "service_tier": "priority"}),
        ("/v1/messages", {**MESSAGE, "inference_geo": "us"}),  # (1.1 times the list price)
        (
            "/v1/messages",
            {
                **MESSAGE,
                "messages": [
                    {"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "x.pdf"}}]}
                ],
            },
        ),
        (
            "/v1/messages",
            {
                **MESSAGE,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "document", "source": {"type": "text", "data": "x"}}],
                            }
                        ],
                    }
                ],
            },
        ),
        ("/v1/messages", {**MESSAGE, "system": [{"type": "text", "text": "x", "cache_control": {"ttl": "1h"}}]}),
        ("/v1/responses", {**RESPONSE, "previous_response_id": "resp_1"}),
        ("/v1/responses", {**RESPONSE, "conversation": "conv_1"}),
        ("/v1/responses", {**RESPONSE, "prompt": {"id": "pmpt_1"}}),
        ("/v1/responses", {**RESPONSE, "background": True}),
        ("/v1/responses", {**RESPONSE, "tools": [{"type": "web_search"}]}),
        ("/v1/responses", {**RESPONSE, "input": [{"type": "item_reference", "id": "msg_1"}]}),
        (
            "/v1/responses",
            {**RESPONSE, "input": [{"role": "user", "content": "hi"}, {"type": "reasoning", "id": "rs_1"}]},
        ),
        (
            "/v1/responses",
            {**RESPONSE, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        ),
        ("/v1/responses", {**RESPONSE, "service_tier": "priority"}),
    ],
)
def test_what_a_quote_cannot_bound_is_refused_before_any_quote(gw, path, body):
    r = httpx.post(gw[0].url + path, json=body)
    assert r.status_code == 400 and error_code(r) == "unpriced_parameter", r.text


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/messages", {"model": "mock/echo", "max_tokens": 5}, "invalid_messages"),
        ("/v1/messages", {**MESSAGE, "system": 5}, "invalid_messages"),
        ("/v1/responses", {"model": "mock/echo"}, "invalid_input"),
        ("/v1/responses", {"model": "mock/echo", "input": ""}, "invalid_input"),
        ("/v1/responses", {"model": "mock/echo", "input": ["x"]}, "invalid_input"),
        ("/v1/responses", {**RESPONSE, "instructions": 5}, "invalid_input"),
        ("/v1/responses", {**RESPONSE, "model": "nope"}, "model_not_found"),
    ],
)
def test_malformed_requests_are_refused_before_any_quote(gw, path, body, code):
    r = httpx.post(gw[0].url + path, json=body)
    assert r.status_code in (400, 404) and error_code(r) == code, r.text


def test_an_anthropic_beta_that_changes_the_price_is_refused_and_a_priced_one_passes(gw, chain, devnet):
    server, _, mock = gw
    r = httpx.post(server.url + "/v1/messages", json=MESSAGE, headers={"anthropic-beta": "context-1m-2025-08-07"})
    assert r.status_code == 400 and error_code(r) == "unpriced_parameter", r.text
    beta = {"anthropic-beta": "interleaved-thinking-2025-05-14", "anthropic-version": "2023-06-01"}
    with paying(chain, devnet) as http:
        assert http.post(server.url + "/v1/messages", json=MESSAGE, headers=beta).status_code == 200
    assert mock.last_headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {**MESSAGE, "stream": True}),
        ("/v1/responses", {**RESPONSE, "max_output_tokens": 16, "stream": True}),
    ],
)
def test_a_stream_that_breaks_ends_with_its_apis_error_event_and_is_charged_at_most_its_quote(
    gw, chain, devnet, path, body
):
    server, _, _ = gw
    body = {**body, "messages": [{"role": "user", "content": "a b c d e f g"}]} if "messages" in body else body
    body = {**body, "input": "a b c d e f g"} if "input" in body else body
    with (
        paying(chain, devnet) as http,
        http.stream("POST", server.url + path, json={**body, "mock": {"fail_after_chunks": 2}}) as r,
    ):
        text = r.read().decode()
        receipt_id = r.headers["x-tollway-receipt"]
    errors = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and '"error"' in line]
    assert errors and errors[-1]["type"] == "error", text
    receipt = wait_receipt(server.url, receipt_id)
    assert receipt["status"] == "incomplete" and int(receipt["cost"]["atomic"]) <= int(receipt["quote"]["atomic"])
    assert receipt["usage"]["dialect"] == "estimated"
    if path == "/v1/messages":  # its prompt as message_start counted it, not the quote's bound
        start = next(json.loads(x[5:]) for x in text.splitlines() if x.startswith("data:") and "message_start" in x)
        u = start["message"]["usage"]
        counted = u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
        assert receipt["usage"]["prompt_tokens"] == counted


def test_a_failure_before_the_first_event_costs_nothing(gw, chain, devnet):
    server, _, _ = gw
    payer = payer_of(chain, devnet)
    before = chain.balance(payer.account.address)
    with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        r = http.post(server.url + "/v1/responses", json={**RESPONSE, "stream": True, "mock": {"fail": 500}})
    assert r.status_code >= 500 and chain.balance(payer.account.address) == before


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/messages", {**MESSAGE, "stream": True}), ("/v1/responses", {**RESPONSE, "stream": True})],
)
def test_an_error_after_the_opening_events_is_a_failure_before_the_answer(gw, chain, devnet, path, body):
    """Anthropic may open a stream (message_start, ping) and then send an error (overloaded) —
    as may Responses (created, in_progress): no answer was served, so nothing is charged."""
    server = gw[0]
    payer = payer_of(chain, devnet)
    before = chain.balance(payer.account.address)
    with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        r = http.post(server.url + path, json={**body, "mock": {"fail_after_chunks": 0}})
    assert r.status_code == 502 and "failed before answering" in r.text, r.text
    assert chain.balance(payer.account.address) == before


@pytest.mark.parametrize(
    ("quoted", "paid"),
    [
        ("/v1/messages", "/v1/chat/completions"),
        ("/v1/responses", "/v1/messages"),
        ("/v1/chat/completions", "/v1/messages"),
    ],
)
def test_a_quote_for_one_api_pays_no_other(gw, chain, quoted, paid):
    url = gw[0].url
    body = {**MESSAGE, "input": "hi"}  # (valid for all three)
    required = unb64json(httpx.post(url + quoted, json=body).headers["payment-required"])
    offer = next(o for o in required["accepts"] if o["scheme"] == "exact")
    doc = {"x402Version": 2, "resource": required["resource"], "accepted": offer}
    doc["payload"] = sign_exact(chain.fund(), offer, int(time.time()))
    r = httpx.post(url + paid, json=body, headers={"PAYMENT-SIGNATURE": b64json(doc)})
    assert r.status_code == 402, r.text


def test_no_upstream_that_speaks_the_api_is_no_route(gw):
    r = httpx.post(gw[0].url + "/v1/messages", json={**MESSAGE, "provider": {"only": ["chat-only"]}})
    assert r.status_code == 400 and error_code(r) == "no_route", r.text


def test_the_402_declares_the_apis_own_request_for_discovery(gw):
    for path, prompt in (("/v1/messages", "messages"), ("/v1/responses", "input")):
        required = unb64json(httpx.post(gw[0].url + path, json={**MESSAGE, "input": "hi"}).headers["payment-required"])
        body = required["extensions"]["bazaar"]["info"]["input"]["body"]
        assert prompt in body and required["resource"]["url"].endswith(path)


HOSTILE = [
    {"messages": "hi"},
    {"messages": [1, "two", None]},
    {"messages": [{"role": "user", "content": [1, None, "x", {"type": None}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [1, {"type": 5}]}]}]},
    {"messages": [{"role": "user", "content": {"type": "text"}}]},
    {"system": [1, {"type": "text"}], "messages": [{"role": "user", "content": "x"}]},
    {"system": {"cache_control": {"ttl": "1h"}}, "messages": [{"role": "user", "content": "x"}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": "all"},
    {"messages": [{"role": "user", "content": "x"}], "tools": [1, 2]},
    {"messages": [{"role": "user", "content": "x"}], "cache_control": {"ttl": "2h"}},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": "8"},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
    {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
    {"input": [{"type": "message", "content": [{"type": "input_text", "text": 5}]}, {"role": 1}]},
    {"input": [{"type": "function_call_output", "output": [{"type": "input_file"}]}]},
    {"input": [{"type": "message", "role": "user", "content": None}], "instructions": ["a"]},
    {"input": "x", "tools": [{"type": "function"}, {"type": None}]},
    {"input": "x", "max_output_tokens": 10**30},
    {"input": {"role": "user"}},
    {"input": "x", "background": "no"},
]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_get_a_4xx_or_a_quote_never_a_500(gw, path, body):
    r = httpx.post(gw[0].url + path, json={"model": "mock/echo", **body})
    assert r.status_code in (400, 402), (r.status_code, r.text)
    if r.status_code == 400:
        assert error_code(r) != "internal"
