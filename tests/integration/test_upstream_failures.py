"""Failures around a paid call: the upstream (error statuses, timeout, unreachable, a stream
breaking midway) and the chain's RPC. Before the upstream commits to an answer no money may
move: the payment is ``released``, the call ``failed``, the payer's balance unchanged.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from support import (
    CHAT,
    SETTLE_WAIT,
    RpcSwitch,
    ServerThread,
    call_rows,
    chat_body,
    dedicated_gateway,
    error_code,
    eventually,
    exact_offer,
    exact_payment,
    free_port,
    payment_header,
    payment_required,
    payment_rows,
    receipt,
    then_the_mock,
    wait_receipt,
)


def paid_headers(client: httpx.Client, body: dict[str, Any], payer: Any) -> tuple[dict[str, str], int]:
    """Ask for the 402 of ``body`` and sign its first offer: (headers for the retry, amount)."""
    required = payment_required(client.post(CHAT, json=body))
    offer = exact_offer(required)
    return payment_header(exact_payment(payer, required, offer)), int(offer["amount"])


def assert_nothing_charged(engine: Any, chain: Any, payer: Any, before: int, r: httpx.Response) -> None:
    """The one payment of ``payer`` was released, its call failed, and the balance did not move."""
    assert "PAYMENT-RESPONSE" not in r.headers
    rows = payment_rows(engine, payer.address)
    assert [(p["state"], p["tx_hash"]) for p in rows] == [("released", None)], rows
    statuses = [c["status"] for c in call_rows(engine, rows[0]["id"])]
    assert statuses == ["failed"], statuses
    time.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before


# -- upstream error statuses (the shared gateway and mock) -------------------------------------------

STATUS_CASES = {
    # upstream status: (gateway status, error code, Retry-After expected)
    500: (502, "upstream_error", False),
    502: (502, "upstream_error", False),
    504: (502, "upstream_error", False),
    401: (502, "upstream_error", False),
    429: (503, "upstream_unavailable", True),
    503: (503, "upstream_unavailable", True),
    400: (400, "upstream_rejected_request", False),
    404: (404, "upstream_rejected_request", False),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("upstream_status", list(STATUS_CASES))
def test_upstream_error_status_charges_nothing(gateway, chain, upstream_status, stream):
    status, code, retry_after = STATUS_CASES[upstream_status]
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body(f"upstream answers {upstream_status}", stream=stream, mock={"fail": upstream_status})
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        headers, _amount = paid_headers(client, body, payer)
        r = client.post(CHAT, json=body, headers=headers)
    assert (r.status_code, error_code(r)) == (status, code), r.text
    if retry_after:
        assert r.headers.get("retry-after", "").isdigit(), r.headers
    assert_nothing_charged(gateway.store.engine, chain, payer, before, r)


def test_an_error_answered_with_status_200_charges_nothing(gateway, chain):
    """OpenRouter answers an error that came once the model started with status 200 and an error
    body: served, it was charged its whole quote with nothing to show for it."""
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("an error under 200", mock={"fail": 502, "fail_as_200": True})
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        headers, _amount = paid_headers(client, body, payer)
        r = client.post(CHAT, json=body, headers=headers)
    assert (r.status_code, error_code(r)) == (502, "upstream_error"), r.text
    assert_nothing_charged(gateway.store.engine, chain, payer, before, r)


# -- no answer at all ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_timeout_before_the_first_byte(gateway, chain, tmp_path, stream):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("the upstream hangs", stream=stream, mock={"hang": True})
    with (
        dedicated_gateway(gateway, chain, tmp_path, read_timeout=1.0) as (url, engine),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        headers, _amount = paid_headers(client, body, payer)
        started = time.monotonic()
        r = client.post(CHAT, json=body, headers=headers)
        elapsed = time.monotonic() - started
        assert (r.status_code, error_code(r)) == (503, "upstream_timeout"), r.text
        assert r.headers.get("retry-after", "").isdigit(), r.headers
        assert elapsed < 10, elapsed
        assert_nothing_charged(engine, chain, payer, before, r)


def test_upstream_unreachable(gateway, chain, tmp_path):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("nobody is listening upstream")
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with (
        dedicated_gateway(gateway, chain, tmp_path, upstream_url=closed) as (url, engine),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        headers, _amount = paid_headers(client, body, payer)
        r = client.post(CHAT, json=body, headers=headers)
        assert r.status_code in (502, 503), r.text
        assert error_code(r) == "upstream_unavailable", r.text
        assert r.headers.get("retry-after", "").isdigit(), r.headers
        assert_nothing_charged(engine, chain, payer, before, r)


# -- a stream that breaks after the upstream committed ----------------------------------------------------


def receipt_when_finished(gateway_url: str, receipt_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = receipt(gateway_url, receipt_id)
        if doc["status"] not in ("streaming", "metering"):
            return doc
        assert time.monotonic() < deadline, f"call {receipt_id} never finished: {doc}"
        time.sleep(0.02)


@pytest.mark.parametrize("fail_mode", ["error", "disconnect"])
def test_mid_stream_failure_is_recorded_as_incomplete(gateway, chain, fail_mode):
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body(
        "one two three four five six seven",
        stream=True,
        mock={"fail_after_chunks": 2, "fail_mode": fail_mode},
    )
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        headers, amount = paid_headers(client, body, payer)
        with client.stream("POST", CHAT, json=body, headers=headers) as r:
            assert r.status_code == 200
            text = "".join(r.iter_text())
            receipt_id = r.headers["x-tollway-receipt"]
    assert '"content":"echo"' in text.replace(" ", "")  # the first chunks were relayed
    if fail_mode == "error":
        assert "injected mid-stream failure" in text  # and the upstream's error event too
    doc = receipt_when_finished(gateway.url, receipt_id)
    assert doc["status"] == "incomplete", doc
    assert doc["error"], doc
    doc = wait_receipt(gateway.url, receipt_id)  # the upstream committed: the quote is paid, no more
    assert doc["paid"]["atomic"] == str(amount)
    time.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before - amount


@pytest.mark.parametrize("fail_mode", ["error", "done"])
def test_stream_failing_before_any_content_charges_nothing(gateway, chain, fail_mode):
    """The upstream opens the stream (a keep-alive comment) and fails before the first token — with
    an error event, or by ending the stream (a bare ``[DONE]``, which was taken for an answer).

    Nothing was answered, so nothing may be charged (pipeline: "Money only moves after the
    upstream has committed to an answer").
    """
    payer = chain.fund()
    before = chain.balance(payer.address)
    mock = {"fail_after_chunks": 0, "fail_mode": fail_mode}
    body = chat_body("fail before the first token", stream=True, mock=mock)
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        headers, _amount = paid_headers(client, body, payer)
        with client.stream("POST", CHAT, json=body, headers=headers) as r:
            text = "".join(r.iter_text())
    assert '"content":"echo' not in text.replace(" ", "")  # the upstream produced no content
    rows = payment_rows(gateway.store.engine, payer.address)
    assert [p["state"] for p in rows] == ["released"], f"charged for a call that produced nothing: {rows}"
    time.sleep(SETTLE_WAIT)
    assert chain.balance(payer.address) == before


# -- the chain's RPC fails -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["http-502", "garbage", "rpc-error"])
def test_chain_rpc_outage_charges_nothing(gateway, chain, devnet, tmp_path, mode):
    rpc = RpcSwitch(devnet.rpc_url)
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body(f"the chain RPC is down: {mode}")
    with (
        ServerThread(rpc.app()) as proxy,
        dedicated_gateway(gateway, chain, tmp_path, rpc_url=proxy.url) as (url, engine),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        headers, _amount = paid_headers(client, body, payer)
        rpc.mode = mode
        r = client.post(CHAT, json=body, headers=headers)
        rpc.mode = "up"
        assert_nothing_charged(engine, chain, payer, before, r)
        assert (r.status_code, error_code(r)) == (503, "chain_unavailable"), r.text
        assert r.headers.get("retry-after", "").isdigit(), r.headers


def sse(doc: dict[str, Any]) -> bytes:
    kind = doc.get("type")
    return (f"event: {kind}\n" if kind else "").encode() + b"data: " + json.dumps(doc).encode() + b"\n\n"


def chat_upstream(answer: Any) -> ServerThread:
    """An upstream whose chat completions ``answer`` gives (a Starlette endpoint)."""
    return ServerThread(Starlette(routes=[Route("/chat/completions", answer, methods=["POST"])]))


def hang_up_at_the_finish(url: str, body: dict[str, Any], payer: Any) -> None:
    """A paid stream whose client hangs up once it has read the answer's ``finish_reason``."""
    with httpx.Client(base_url=url, timeout=30) as client:
        headers, _ = paid_headers(client, body, payer)
        with client.stream("POST", CHAT, json=body, headers=headers) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"finish_reason":"stop"' in line.replace(" ", ""):
                    break  # (and the connection is closed)


def the_call(engine: Any, payer: Any) -> dict[str, Any]:
    """The one call ``payer`` paid for."""
    (call,) = [c for p in payment_rows(engine, payer.address) for c in call_rows(engine, p["id"])]
    return call


CHUNK = {"object": "chat.completion.chunk", "model": "mock/echo"}
RESPONSE = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
# What each API opens a stream with before its first token — the role alone (OpenAI, vLLM and
# llama.cpp), an empty content block, an output item and content part added empty — then a failure.
OPENED_THEN_FAILED = {
    "/v1/chat/completions": [
        {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**CHUNK, "error": {"message": "provider overloaded", "code": 502}, "choices": []},
    ],
    "/v1/messages": [
        {"type": "message_start", "message": {"id": "m1", "role": "assistant", "content": [], "usage": {}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    ],
    "/v1/responses": [
        {"type": "response.created", "response": RESPONSE},
        {"type": "response.output_item.added", "output_index": 0, "item": {"type": "message", "content": []}},
        {"type": "response.content_part.added", "output_index": 0, "part": {"type": "output_text", "text": ""}},
        {"type": "error", "code": "server_error", "message": "The server had an error"},
    ],
}
BODIES = {
    "/v1/chat/completions": chat_body("hi", max_tokens=100, stream=True),
    "/v1/messages": {
        "model": "mock/echo",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/v1/responses": {"model": "mock/echo", "max_output_tokens": 100, "stream": True, "input": "hi"},
}


@pytest.mark.parametrize("path", list(OPENED_THEN_FAILED))
def test_a_stream_opened_without_content_that_then_fails_charges_nothing(gateway, chain, tmp_path, path):
    """Its opening events carry no token: the failure after them is one before the answer (it was
    taken as an answer, and charged the prompt at its bound and an estimate of output never sent)."""

    async def opened_then_failed(request: Any) -> StreamingResponse:
        return StreamingResponse(iter([sse(e) for e in OPENED_THEN_FAILED[path]]), media_type="text/event-stream")

    upstream = Starlette(routes=[Route(p.removeprefix("/v1"), opened_then_failed, methods=["POST"]) for p in BODIES])
    payer = chain.fund()
    before = chain.balance(payer.address)
    with (
        ServerThread(upstream) as up,
        dedicated_gateway(gateway, chain, tmp_path, upstream_url=up.url) as (url, engine),
    ):
        with httpx.Client(base_url=url, timeout=30) as client:
            required = payment_required(client.post(path, json=BODIES[path]))
            headers = payment_header(exact_payment(payer, required, exact_offer(required)))
            r = client.post(path, json=BODIES[path], headers=headers)
        assert r.status_code == 502, r.text
        assert_nothing_charged(engine, chain, payer, before, r)


ERROR = {"message": "provider overloaded", "code": 502}
# 200s that are no answer: served, each was charged its quote (review of the routing and fail-over)
NO_ANSWERS = {
    "an HTML page": b"<html><body>502 Bad Gateway</body></html>",
    "whitespace": b"  \n",
    "vLLM's error object": json.dumps({"object": "error", "message": "boom", "type": "InternalServerError"}).encode(),
    "an error and null usage": json.dumps({"error": ERROR, "usage": None}).encode(),
    "an error and no choices": json.dumps({"error": ERROR, "choices": []}).encode(),
    "Anthropic's error": json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}).encode(),
    "an empty object": b"{}",
}
# Streams that never answer: each was taken as answered at its first line and charged ~80% of its quote
NEVER_ANSWERED = {
    "a data line that is not JSON": [b"data: upstream overloaded\n\n", b"data: [DONE]\n\n"],
    "an error chunk without its error field": [
        sse({**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]}),
        b"data: [DONE]\n\n",
    ],
}


@pytest.mark.parametrize("name,stream", [(n, False) for n in NO_ANSWERS] + [(n, True) for n in NEVER_ANSWERED])
def test_a_200_that_is_no_answer_charges_nothing_and_fails_over(gateway, chain, tmp_path, name, stream):
    """Alone, the upstream's no-answer is a 502 and the payment is released; with a second upstream
    the call goes there (it failed before the first byte) and is served."""
    from tollway.config import UpstreamSettings

    async def no_answer(request: Any) -> Response:
        if stream:
            return StreamingResponse(iter(NEVER_ANSWERED[name]), media_type="text/event-stream")
        return Response(NO_ANSWERS[name], media_type="application/json")

    body = chat_body("hi", max_tokens=100, stream=stream)
    payer = chain.fund()
    before = chain.balance(payer.address)
    with chat_upstream(no_answer) as up:
        with (
            dedicated_gateway(gateway, chain, tmp_path / "alone", upstream_url=up.url) as (url, engine),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            r = client.post(CHAT, json=body, headers=paid_headers(client, body, payer)[0])
            assert r.status_code == 502 and error_code(r) == "upstream_error", r.text
            assert_nothing_charged(engine, chain, payer, before, r)
        upstreams = then_the_mock(gateway, UpstreamSettings(name="hostile", url=up.url))
        with (
            dedicated_gateway(gateway, chain, tmp_path / "two", upstreams=upstreams) as (url, engine),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            r = client.post(CHAT, json=body, headers=paid_headers(client, body, payer)[0])
            assert r.status_code == 200, r.text
            assert [a["upstream"] for a in receipt(url, r.headers["x-tollway-receipt"])["attempts"]][-1] == "good"


def processing_forever():
    """An upstream whose streams send OpenRouter's keep-alive comment and nothing else, for ever."""

    async def processing(request: Any) -> StreamingResponse:
        async def comments():
            while True:
                yield b": OPENROUTER PROCESSING\n\n"
                await asyncio.sleep(0.2)

        return StreamingResponse(comments(), media_type="text/event-stream")

    return chat_upstream(processing)


def paid_stream(url: str, payer: Any, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as client:
        return client.post(CHAT, json=body, headers=paid_headers(client, body, payer)[0])


def test_keep_alive_comments_hold_a_call_no_longer_than_the_upstreams_read_timeout(gateway, chain, tmp_path):
    """Each keep-alive comment reset the upstream's read timeout: the whole ``max_call_seconds``
    went to an upstream that never answered, and no other was asked. It has its ``read_timeout`` to
    start answering; then the next upstream serves the call."""
    from tollway.config import UpstreamSettings

    body = chat_body("hi", max_tokens=100, stream=True)
    with processing_forever() as stalling:
        upstreams = then_the_mock(gateway, UpstreamSettings(name="stalling", url=stalling.url, read_timeout=1.0))
        with dedicated_gateway(gateway, chain, tmp_path, upstreams=upstreams, max_call_seconds=60) as (url, _):
            started = time.monotonic()
            r = paid_stream(url, chain.fund(), body)
            assert r.status_code == 200 and time.monotonic() - started < 10, r.text
            attempts = [(a["upstream"], a["outcome"]) for a in receipt(url, r.headers["x-tollway-receipt"])["attempts"]]
            assert attempts == [("stalling", "upstream_timeout"), ("good", "served")]


def test_a_call_out_of_time_keeps_the_attempt_it_was_on(gateway, chain, tmp_path):
    """When ``max_call_seconds`` ran out while an upstream was asked, the call ended with no attempt
    recorded (the router was cancelled): its receipt and the live figures did not name the upstream."""
    from tollway.config import UpstreamSettings

    payer = chain.fund()
    before = chain.balance(payer.address)
    with processing_forever() as stalling:
        upstreams = [UpstreamSettings(name="stalling", url=stalling.url, read_timeout=60)]
        with dedicated_gateway(gateway, chain, tmp_path, upstreams=upstreams, max_call_seconds=2) as (url, engine):
            r = paid_stream(url, payer, chat_body("hi", max_tokens=100, stream=True))
            assert (r.status_code, error_code(r)) == (503, "upstream_timeout"), r.text
            assert_nothing_charged(engine, chain, payer, before, r)
            (row,) = call_rows(engine, payment_rows(engine, payer.address)[0]["id"])
            assert [a[:2] for a in json.loads(row["attempts"])] == [["stalling", "upstream_timeout"]]


def test_attack_hanging_up_around_a_held_opening(gateway, chain, tmp_path):
    """A payer who wants a stream free hangs up at the worst moments around its opening, which the
    gateway holds until the first token: while it is held, or just after the first token. Neither is
    free — the upstream worked on the prompt at its request — and neither is charged more than its
    prompt and the events that reached the relay; the upstream is let go once the relay finds the
    client gone (for one held: at its first token, not at the end of its stream)."""
    import threading

    role = {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    word = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "paid"}, "finish_reason": None}]}
    let_go = threading.Event()

    async def thinking(request: Any) -> StreamingResponse:
        held = (await request.json())["messages"][0]["content"] == "held"

        async def events():
            try:
                yield sse(role)
                if not held:
                    yield sse(word)
                await asyncio.sleep(5)  # (thinking: a reasoning model between its role and its first token)
                yield sse(word)
            finally:
                let_go.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    payer = chain.fund()
    upstream = chat_upstream(thinking)
    with upstream as up, dedicated_gateway(gateway, chain, tmp_path, upstream_url=up.url) as (url, engine):
        for moment in ("held", "after the first token"):
            let_go.clear()
            body = chat_body(moment, max_tokens=50, stream=True)
            with httpx.Client(base_url=url, timeout=30) as client:
                headers, _ = paid_headers(client, body, payer)
                with (
                    pytest.raises(httpx.ReadTimeout),
                    client.stream("POST", CHAT, json=body, headers=headers, timeout=httpx.Timeout(30, read=1.0)) as r,
                ):
                    for _ in r.iter_raw():
                        pass  # (until the client gives up: it hangs up)
            assert let_go.wait(9), f"{moment}: the upstream kept working after the client left"
        time.sleep(SETTLE_WAIT)
        payments = payment_rows(engine, payer.address)
        charged = [c for p in payments for c in call_rows(engine, p["id"])]
    per_event = gateway.settings.models["mock/echo"].max_tokens_per_event
    assert [p["state"] for p in payments] == ["settled", "settled"], payments
    for call in charged:
        assert call["events"] <= 2, call
        assert call["completion_tokens"] <= 2 * per_event and 0 < call["cost"] < call["quote"], call


def test_attack_hanging_up_between_the_answer_and_its_usage_is_charged_the_reasoning(gateway, chain, tmp_path):
    """A payer reads a reasoning model's whole answer and hangs up at its ``finish_reason``, before
    the usage chunk. Its hidden reasoning was no event: the estimate of a stream cut there charged a
    few tokens of the thousands the upstream bills. The relay reads on for the usage instead.
    (Adversarial review.)"""

    reasoning = 3000

    async def reasoning_model(request: Any) -> StreamingResponse:
        async def events():
            yield sse({**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for w in ("The", " answer", " is", " 42."):
                yield sse({**CHUNK, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]})
            yield sse({**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            await asyncio.sleep(0.5)  # (the usage chunk a moment later: the client is gone by then)
            usage = {"prompt_tokens": 20, "completion_tokens": reasoning + 4, "total_tokens": reasoning + 24}
            yield sse({**CHUNK, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    payer = chain.fund()
    upstream = chat_upstream(reasoning_model)
    with upstream as up, dedicated_gateway(gateway, chain, tmp_path, upstream_url=up.url) as (url, engine):
        body = chat_body("what is the answer?", max_tokens=8000, stream=True)
        hang_up_at_the_finish(url, body, payer)
        time.sleep(1.5 + SETTLE_WAIT)
        call = the_call(engine, payer)
    assert call["completion_tokens"] == reasoning + 4 and call["usage_dialect"] != "estimated", call


# The same answers' ends on the other APIs: its usage comes in a later event (message_delta; response.completed)
ANSWERED = {  # the other APIs' answers, ended: a content block (an output item) complete
    "/v1/messages": [
        {"type": "message_start", "message": {"id": "m1", "role": "assistant", "content": [], "usage": {}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "42"}},
        {"type": "content_block_stop", "index": 0},
    ],
    "/v1/responses": [
        {"type": "response.created", "response": RESPONSE},
        {"type": "response.output_item.added", "output_index": 0, "item": {"type": "message", "content": []}},
        {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "42"},
        {"type": "response.output_item.done", "output_index": 0, "item": {"type": "message", "content": []}},
    ],
}
THINKING_THEN_ANSWERING = {  # a block (item) ended, and the visible answer begun after it
    "/v1/messages": [
        {"type": "message_start", "message": {"id": "m1", "role": "assistant", "content": [], "usage": {}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "The"}},
    ],
    "/v1/responses": [
        {"type": "response.created", "response": RESPONSE},
        {"type": "response.output_item.done", "output_index": 0, "item": {"type": "reasoning", "summary": []}},
        {"type": "response.output_item.added", "output_index": 1, "item": {"type": "message", "content": []}},
        {"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "delta": "The"},
    ],
}


def usage_event(path: str, output_tokens: int) -> dict[str, Any]:
    """The event that ends a ``path`` stream with its usage."""
    usage = {"input_tokens": 20, "output_tokens": output_tokens}
    if path == "/v1/messages":
        return {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}
    return {"type": "response.completed", "response": {**RESPONSE, "status": "completed", "usage": usage}}


def hung_up(
    gateway, chain, tmp_path, path: str, before: list[dict[str, Any]], output_tokens: int, at: str, silence=0.5
):
    """A paid ``path`` stream whose upstream sends ``before``, then ``silence`` seconds later its
    usage (``output_tokens`` generated); its client hangs up at the line that holds ``at``. The
    call's row, once metered."""

    async def model(request: Any) -> StreamingResponse:
        async def events():
            for event in before:
                yield sse(event)
            await asyncio.sleep(silence)  # (the client is gone by then)
            yield sse(usage_event(path, output_tokens))

        return StreamingResponse(events(), media_type="text/event-stream")

    payer = chain.fund()
    upstream = Starlette(routes=[Route(path.removeprefix("/v1"), model, methods=["POST"])])
    with ServerThread(upstream) as up, dedicated_gateway(gateway, chain, tmp_path, upstream_url=up.url) as (url, db):
        with httpx.Client(base_url=url, timeout=30) as client:
            required = payment_required(client.post(path, json=BODIES[path]))
            headers = payment_header(exact_payment(payer, required, exact_offer(required)))
            with client.stream("POST", path, json=BODIES[path], headers=headers) as r:
                assert r.status_code == 200
                next(line for line in r.iter_lines() if at in line)  # (then the connection is closed)
        time.sleep(1.5)
        eventually(lambda: the_call(db, payer)["status"] != "streaming", timeout=20, what="the call metered")
        time.sleep(SETTLE_WAIT)
        return the_call(db, payer)


@pytest.mark.parametrize("path", list(ANSWERED))
def test_attack_hanging_up_between_the_answer_and_its_usage_event_is_charged_the_reasoning(
    gateway, chain, tmp_path, path
):
    """As above, on the other APIs: the payer hangs up once the answer's block (item) is complete,
    before the event with its usage. The relay read on only for chat's, and charged the estimate.
    (Adversarial review.)"""
    call = hung_up(gateway, chain, tmp_path, path, ANSWERED[path], 3000, at=ANSWERED[path][-1]["type"])
    assert call["completion_tokens"] == 3000 and call["usage_dialect"] != "estimated", call


@pytest.mark.parametrize("path", list(ANSWERED))
def test_attack_an_answer_whose_usage_never_comes_holds_the_relay_only_the_grace_on_every_api(
    gateway, chain, tmp_path, path
):
    """Time: the payer hangs up at the answer's end and the upstream then says nothing: the relay
    lets it go after ``USAGE_GRACE`` and charges the estimate, within the quote — neither held to the
    call's limit nor charged nothing."""
    from tollway import metering

    started = time.monotonic()
    call = hung_up(gateway, chain, tmp_path, path, ANSWERED[path], 3000, at=ANSWERED[path][-1]["type"], silence=60)
    assert time.monotonic() - started < metering.USAGE_GRACE + 25  # (not the 60 s the upstream would take)
    assert call["usage_dialect"] == "estimated" and 0 < call["cost"] <= call["quote"], call


@pytest.mark.parametrize("path", list(THINKING_THEN_ANSWERING))
def test_a_payer_who_stops_the_answer_after_a_thinking_block_pays_what_was_relayed(gateway, chain, tmp_path, path):
    """Only an answer that has ended is read on for its usage: the end of a block before it (a
    thinking block, a reasoning item) is not the answer's end, and a payer who stops the answer
    there is charged what was relayed, not what the upstream went on to generate. (Review.)"""
    call = hung_up(gateway, chain, tmp_path, path, THINKING_THEN_ANSWERING[path], 1500, at='"The"')
    assert call["usage_dialect"] == "estimated" and call["completion_tokens"] < 1500, call


def test_attack_an_upstream_that_never_sends_the_usage_after_the_answer_holds_the_relay_only_the_grace(
    gateway, chain, tmp_path
):
    """The relay reads on for the usage chunk only ``USAGE_GRACE`` after its client left an ended
    answer: an upstream that then says nothing more is let go, and the call charged its estimate,
    within its quote."""
    import threading

    from tollway import metering

    let_go = threading.Event()

    async def silent_after_the_answer(request: Any) -> StreamingResponse:
        async def events():
            try:
                yield sse({**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "done"}}]})
                yield sse({**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                await asyncio.sleep(60)  # (no usage, no [DONE])
            finally:
                let_go.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    payer = chain.fund()
    upstream = chat_upstream(silent_after_the_answer)
    with upstream as up, dedicated_gateway(gateway, chain, tmp_path, upstream_url=up.url) as (url, engine):
        body = chat_body("then silence", max_tokens=50, stream=True)
        hang_up_at_the_finish(url, body, payer)
        left = time.monotonic()
        assert let_go.wait(metering.USAGE_GRACE + 5), "the upstream was held past the grace"
        assert time.monotonic() - left >= metering.USAGE_GRACE - 1  # (it was read on, for the usage)
        time.sleep(SETTLE_WAIT)
        call = the_call(engine, payer)
    assert call["usage_dialect"] == "estimated" and 0 < call["cost"] <= call["quote"], call


def test_an_upstream_404_quoting_a_key_in_its_url_path_is_passed_on_without_it(gateway, chain, tmp_path):
    """Some hosts take the key in the URL's path, and a 404 often quotes the path it was asked
    (Express: "Cannot POST /…"): the client learns the refusal, not the operator's key."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    secret = "k3y-0f-the-0perat0r-4f8e2b1c9d"

    async def refuse(request):
        return PlainTextResponse(f"Cannot POST {request.url.path}", status_code=404)

    app = Starlette(routes=[Route("/{path:path}", refuse, methods=["POST"])])
    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("a 404 quoting the path")
    with (
        ServerThread(app) as upstream,
        dedicated_gateway(gateway, chain, tmp_path, upstream_url=f"{upstream.url}/{secret}/v1") as (url, engine),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        headers, _amount = paid_headers(client, body, payer)
        r = client.post(CHAT, json=body, headers=headers)
        assert (r.status_code, error_code(r)) == (404, "upstream_rejected_request"), r.text
        assert secret not in r.text and "[the upstream's URL]/v1/chat/completions" in r.text, r.text
        assert_nothing_charged(engine, chain, payer, before, r)


def test_attack_a_payer_failing_its_own_calls_on_the_cheap_upstream_steers_nobody(gateway, chain, tmp_path):
    """Routing review: a payer restricted to the first upstream (``provider.only``) whose calls it
    fails — five at a time, each released, so free — cooled it for every payer, who then paid the
    next one's prices. The victim's call still goes to the first upstream."""
    from concurrent.futures import ThreadPoolExecutor

    from tollway.config import UpstreamSettings
    from tollway.mock_upstream import create_app as create_mock

    attacker, victim = chain.fund(), chain.fund()
    with ServerThread(create_mock()) as first, ServerThread(create_mock()) as second:
        upstreams = [
            UpstreamSettings(name="first", url=first.url + "/v1"),
            UpstreamSettings(name="second", url=second.url + "/v1"),
        ]
        with (
            dedicated_gateway(gateway, chain, tmp_path, upstreams=upstreams) as (url, engine),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            poison = chat_body("fail me", max_tokens=20, mock={"fail": 500}, provider={"only": ["first"]})
            signed = [paid_headers(client, poison, attacker)[0] for _ in range(5)]
            with ThreadPoolExecutor(5) as pool:
                failed = list(pool.map(lambda h: client.post(CHAT, json=poison, headers=h), signed))
            assert [r.status_code for r in failed] == [502] * 5
            assert {p["state"] for p in payment_rows(engine, attacker.address)} == {"released"}  # (free)
            body = chat_body("an honest question", max_tokens=20)
            r = client.post(CHAT, json=body, headers=paid_headers(client, body, victim)[0])
            assert r.status_code == 200, r.text
            attempts = [(a["upstream"], a["outcome"]) for a in receipt(url, r.headers["x-tollway-receipt"])["attempts"]]
            assert attempts == [("first", "served")]


# -- attacks on the fail-over --------------------------------------------------------------------------------


async def flagging(request: Any) -> Response:
    """OpenRouter's moderation refusing a prompt."""
    flagged = {"message": "Your input was flagged", "metadata": {"reasons": ["x"], "flagged_input": "..."}}
    return Response(json.dumps({"error": {"code": 403, **flagged}}), status_code=403, media_type="application/json")


def test_attack_a_refused_prompt_costs_its_payer_nothing_and_the_gateway_no_gas(gateway, chain, tmp_path):
    """Who pays for a refusal: the upstream's moderation refuses the prompt (403) — no answer, so
    nothing is charged and nothing is settled (no gas spent on a payment that pays for nothing)."""
    payer = chain.fund()
    before = chain.balance(payer.address)
    with (
        chat_upstream(flagging) as up,
        dedicated_gateway(gateway, chain, tmp_path, upstream_url=up.url) as (url, engine),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        body = chat_body("something flagged", max_tokens=50)
        r = client.post(CHAT, json=body, headers=paid_headers(client, body, payer)[0])
        assert (r.status_code, error_code(r)) == (403, "upstream_refused") and "flagged" in r.text, r.text
        assert_nothing_charged(engine, chain, payer, before, r)


def test_attack_one_proof_sent_twice_at_once_through_a_fail_over_pays_once(gateway, chain, tmp_path):
    """Concurrency: the same payment, sent twice at once, while the first upstream answers a 200 that
    is no answer (the payment released, then free to pay a retry) and the second serves: one call is
    served and charged once; the other is refused, never served for nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from tollway.config import UpstreamSettings

    async def no_answer(request: Any) -> Response:
        await asyncio.sleep(0.2)  # (both copies are in flight by then)
        return Response(b"<html>busy</html>", media_type="text/html")

    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("twice at once", max_tokens=50)
    with chat_upstream(no_answer) as up:
        upstreams = then_the_mock(gateway, UpstreamSettings(name="hostile", url=up.url))
        with (
            dedicated_gateway(gateway, chain, tmp_path, upstreams=upstreams) as (url, engine),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            headers, amount = paid_headers(client, body, payer)
            with ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(lambda _: client.post(CHAT, json=body, headers=headers), range(2)))
            served = [r for r in answers if r.status_code == 200]
            refused = [r for r in answers if r.status_code != 200]
            assert len(served) == 1 and len(refused) == 1, [(r.status_code, r.text[:200]) for r in answers]
            assert refused[0].status_code in (402, 409), refused[0].text
            eventually(lambda: [p["state"] for p in payment_rows(engine, payer.address)] == ["settled"], what="settled")
            cost = int(served[0].headers["x-tollway-cost"])
            assert 0 < cost <= amount and before - chain.balance(payer.address) == amount  # (exact: the whole)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_attack_hanging_up_while_the_first_upstream_stalls(gateway, chain, tmp_path, stream):
    """Time: the payer hangs up while the first upstream sends keep-alive comments and no answer.
    A stream was failed over once that upstream's time to answer was up, and the next upstream's
    answer charged to a payer who had left before it was asked. No other upstream is asked for a
    client that has gone: the payment is released, nothing is charged (a non-streamed call, which
    keep-alives hold until the call's time is up, likewise)."""
    from tollway.config import UpstreamSettings

    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("hang up while it stalls", max_tokens=50, stream=stream)
    with processing_forever() as stalling:
        upstreams = then_the_mock(gateway, UpstreamSettings(name="stalling", url=stalling.url, read_timeout=1.5))
        gw = dedicated_gateway(gateway, chain, tmp_path, upstreams=upstreams, max_call_seconds=4)
        with gw as (url, engine):
            with httpx.Client(base_url=url, timeout=30) as client:
                headers, _ = paid_headers(client, body, payer)
                with pytest.raises(httpx.ReadTimeout):
                    client.post(CHAT, json=body, headers=headers, timeout=httpx.Timeout(30, read=0.5))
            eventually(lambda: payment_rows(engine, payer.address)[0]["state"] != "reserved", timeout=10)
            (payment,) = payment_rows(engine, payer.address)
            (call,) = call_rows(engine, payment["id"])
            assert (payment["state"], payment["tx_hash"], call["status"]) == ("released", None, "failed"), call
            assert [a[0] for a in json.loads(call["attempts"])] == ["stalling"]  # (the good one never asked)
        time.sleep(SETTLE_WAIT)
        assert chain.balance(payer.address) == before


def test_attack_failing_the_cheap_upstream_over_to_the_dear_one_is_billed_there_within_the_quote(
    gateway, chain, tmp_path
):
    """What is forwarded vs what was priced: the payer's call fails on the upstream with the list
    price (a 200 that is no answer) and goes to one that prices the model ten times higher. The quote
    already covered the dearest, the call is billed at the prices of the one that served it, never
    past what was paid."""
    from test_provider_prices import DEAR, billed

    from tollway.config import UpstreamSettings

    async def no_answer(request: Any) -> Response:
        return Response(b"   ", media_type="application/json")

    payer = chain.fund()
    before = chain.balance(payer.address)
    body = chat_body("price me " * 20, max_tokens=50)
    with chat_upstream(no_answer) as cheap:
        upstreams = [
            UpstreamSettings(name="cheap", url=cheap.url),
            UpstreamSettings(name="dear", url=str(gateway.settings.upstream.url), prices={"mock/echo": DEAR}),
        ]
        with (
            dedicated_gateway(gateway, chain, tmp_path, upstreams=upstreams) as (url, _),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            headers, amount = paid_headers(client, body, payer)
            r = client.post(CHAT, json=body, headers=headers)
            assert r.status_code == 200, r.text
            doc = wait_receipt(url, r.headers["x-tollway-receipt"])
    assert [a["upstream"] for a in doc["attempts"]] == ["cheap", "dear"] and doc["upstream"] == "dear"
    cost = int(doc["cost"]["atomic"])
    assert cost == billed(doc, DEAR) <= int(doc["quote"]["atomic"]) == amount
    assert chain.balance(payer.address) == before - amount and int(doc["credit_after"]["atomic"]) == amount - cost
