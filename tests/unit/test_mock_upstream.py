"""Tests for the deterministic mock upstream (src/tollway/mock_upstream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from tollway.mock_upstream import MockDisconnect, MockOptions, count_tokens, create_app, tokenize

MODEL = "mock/echo"
LONG = " ".join(f"word{i}" for i in range(200))


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://mock")


def body(text: str = "hello world", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def parse_sse(raw: str) -> tuple[list[str], list[Any]]:
    """Return (comment lines, data payloads: parsed JSON or the literal '[DONE]')."""
    comments, events = [], []
    for block in raw.split("\n\n"):
        for line in block.splitlines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return comments, events


@contextlib.asynccontextmanager
async def live_server(app) -> AsyncIterator[str]:
    """Run ``app`` under a real uvicorn server on a free port, in this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


# --------------------------------------------------------------------------------------------- basics


async def test_models_list():
    async with client_for(create_app(MockOptions(models=["a/b", "c/d"]))) as c:
        r = await c.get("/v1/models")
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "data": [
            {"id": "a/b", "object": "model", "created": 0, "owned_by": "tollway-mock"},
            {"id": "c/d", "object": "model", "created": 0, "owned_by": "tollway-mock"},
        ],
    }


async def test_non_stream_completion_and_usage():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello   big\nworld"}]
    async with client_for(create_app()) as c:
        r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs})
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == MODEL
    assert data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello big world"}
    assert choice["finish_reason"] == "stop"
    # "be brief" = 2 tokens, "hello   big\nworld" = 3 tokens, + 3 per message
    expected_prompt = 2 + 3 + 2 * 3
    assert count_tokens(msgs) == expected_prompt
    u = data["usage"]
    assert u["prompt_tokens"] == expected_prompt
    assert u["completion_tokens"] == len(tokenize("echo: hello big world")) == 5
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_reply_is_truncated_to_max_tokens():
    async with client_for(create_app()) as c:
        r = await c.post("/v1/chat/completions", json=body(LONG, max_tokens=7))
        r2 = await c.post("/v1/chat/completions", json=body(LONG, max_completion_tokens=3, max_tokens=50))
        r3 = await c.post("/v1/chat/completions", json=body(LONG))
        r4 = await c.post("/v1/chat/completions", json=body("hi", max_tokens=0))
    d = r.json()
    assert d["usage"]["completion_tokens"] == 7
    assert d["choices"][0]["finish_reason"] == "length"
    assert d["choices"][0]["message"]["content"] == "echo: word0 word1 word2 word3 word4"
    assert r2.json()["usage"]["completion_tokens"] == 3
    assert r3.json()["usage"]["completion_tokens"] == 16  # default cap
    assert r4.json()["usage"]["completion_tokens"] == 0
    assert r4.json()["choices"][0]["message"]["content"] == ""


async def test_text_parts_and_last_user_message():
    msgs = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {}}],
        },
    ]
    async with client_for(create_app()) as c:
        r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs})
    d = r.json()
    assert d["choices"][0]["message"]["content"] == "echo: look at"
    assert d["usage"]["prompt_tokens"] == 2 + 2 + 2 + 3 * 3


# ------------------------------------------------------------------------------------------ streaming


async def test_stream_chunk_order_usage_and_done():
    async with client_for(create_app()) as c:
        r = await c.post(
            "/v1/chat/completions",
            json=body("one two three", stream=True, stream_options={"include_usage": True}),
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith(": MOCK PROCESSING\n\n")
    comments, events = parse_sse(r.text)
    assert comments == [": MOCK PROCESSING"]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert len({ch["id"] for ch in chunks}) == 1
    content = [ch for ch in chunks if ch["choices"] and "content" in ch["choices"][0]["delta"]]
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in ch["choices"][0]["delta"] for ch in content[1:])
    assert "".join(ch["choices"][0]["delta"]["content"] for ch in content) == "echo: one two three"
    assert len(content) == len(tokenize("echo: one two three"))
    assert all(ch["choices"][0]["finish_reason"] is None for ch in content)
    finish, usage_chunk = chunks[len(content)], chunks[len(content) + 1]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(content)
    assert usage_chunk["usage"]["prompt_tokens"] == 3 + 3
    assert len(chunks) == len(content) + 2


async def test_stream_without_include_usage_and_length_finish():
    async with client_for(create_app()) as c:
        r = await c.post("/v1/chat/completions", json=body(LONG, stream=True, max_tokens=4))
    _, events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in ev for ev in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(events) == 4 + 2


async def test_streaming_is_incremental_over_real_http():
    app = create_app(MockOptions(chunk_delay=0.1))
    async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        start = time.monotonic()
        arrivals: list[float] = []
        async with c.stream("POST", "/v1/chat/completions", json=body("a b c d e f", stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic() - start)
    # 8 content chunks (echo : a b c d e f) -> 7 delays of 0.1s between first and last.
    assert len(arrivals) == 8 + 2
    # The first chunk arrived while the rest were still being produced (no absolute bound: on a
    # loaded machine starting the server alone can take a few hundred ms).
    assert arrivals[-1] - arrivals[0] >= 0.6


# --------------------------------------------------------------------------------- bytes >= tokens


@pytest.mark.parametrize(
    "content",
    [
        "",
        "a",
        "x y",
        "🙂" * 50,
        "👨‍👩‍👧‍👦 family 🇯🇵 flags",
        "日本語のテキストです。句読点、も。",
        "a!b@c#d$e%f^g&h*(i)",
        " \n\t " * 30,
        "\u0000\u0001 control \u200b zero-width",
        "Ünïcödé wörds ñ " * 100,
        LONG * 5,
        '"quoted" \\ backslashes / slashes',
        "!" * 1000,
    ],
)
def test_prompt_tokens_never_exceed_json_bytes(content: str):
    variants = [
        [{"role": "user", "content": content}],
        [{"role": "system", "content": content}, {"role": "user", "content": content}],
        [{"role": "user", "content": [{"type": "text", "text": content}, {"type": "text", "text": content}]}],
        [{}, {"content": content}, {"role": "u"}],
    ]
    for msgs in variants:
        tokens = count_tokens(msgs)
        for dumped in (
            json.dumps(msgs, separators=(",", ":"), ensure_ascii=False),
            json.dumps(msgs, separators=(",", ":")),
            json.dumps(msgs),
        ):
            assert tokens <= len(dumped.encode("utf-8")), (content[:30], msgs)
    assert "".join(tokenize(content)) == content


async def test_api_prompt_tokens_bound_by_bytes():
    async with client_for(create_app(MockOptions(cache=False))) as c:
        for content in ("🙂🙂🙂", "a b c", "!?" * 100):
            msgs = [{"role": "user", "content": content}]
            r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs})
            compact = json.dumps(msgs, separators=(",", ":"), ensure_ascii=False).encode()
            assert r.json()["usage"]["prompt_tokens"] <= len(compact)


# ----------------------------------------------------------------------------------------- dialects


async def _usage_for(dialect: str, **kw: Any) -> dict[str, Any]:
    """Two calls sharing a long prefix, second one's full JSON returned (it has cache hits)."""
    async with client_for(create_app(MockOptions(dialect=dialect))) as c:
        await c.post("/v1/chat/completions", json=body(LONG + " first"))
        r = await c.post("/v1/chat/completions", json=body(LONG + " second", **kw))
    assert r.status_code == 200
    return r.json()


async def test_dialect_openai():
    d = await _usage_for("openai")
    u = d["usage"]
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert 0 < u["prompt_tokens_details"]["cached_tokens"] < u["prompt_tokens"]
    assert set(u["prompt_tokens_details"]) == {"cached_tokens"}
    assert "timings" not in d


async def test_dialect_openrouter_with_cost():
    prices = {"prompt": 1e-6, "completion": 2e-6, "cache_read": 1e-7}
    d = await _usage_for("openrouter", mock={"cost_prices": prices})
    u = d["usage"]
    cached, written = (
        u["prompt_tokens_details"]["cached_tokens"],
        u["prompt_tokens_details"]["cache_write_tokens"],
    )
    assert cached > 0
    assert written == u["prompt_tokens"] - cached
    expected = cached * 1e-7 + written * 1e-6 + u["completion_tokens"] * 2e-6
    assert u["cost"] == pytest.approx(expected)
    d2 = await _usage_for("openrouter")
    assert "cost" not in d2["usage"]


async def test_dialect_deepseek():
    u = (await _usage_for("deepseek"))["usage"]
    assert "prompt_tokens_details" not in u
    assert u["prompt_cache_hit_tokens"] > 0
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]


async def test_dialect_anthropic():
    u = (await _usage_for("anthropic"))["usage"]
    assert "prompt_tokens_details" not in u
    assert u["cache_read_input_tokens"] > 0
    assert u["cache_creation_input_tokens"] == u["prompt_tokens"] - u["cache_read_input_tokens"]
    assert u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"] == u["prompt_tokens"]
    assert u["output_tokens"] == u["completion_tokens"]
    async with client_for(create_app(MockOptions(dialect="anthropic", cache=False))) as c:
        u = (await c.post("/v1/chat/completions", json=body("hi there"))).json()["usage"]
    assert u["input_tokens"] == u["prompt_tokens"] == 5
    assert u["cache_read_input_tokens"] == u["cache_creation_input_tokens"] == 0


async def test_dialect_llamacpp():
    d = await _usage_for("llamacpp")
    cached = d["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert d["timings"] == {
        "cache_n": cached,
        "prompt_n": d["usage"]["prompt_tokens"] - cached,
        "predicted_n": d["usage"]["completion_tokens"],
    }


async def test_dialect_none_and_per_request_override():
    u = (await _usage_for("none"))["usage"]
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    u2 = (await _usage_for("openai", mock={"dialect": "deepseek"}))["usage"]
    assert "prompt_cache_hit_tokens" in u2


async def test_dialect_in_stream_usage_chunk():
    async with client_for(create_app(MockOptions(dialect="llamacpp"))) as c:
        r = await c.post("/v1/chat/completions", json=body("x", stream=True, stream_options={"include_usage": True}))
    _, events = parse_sse(r.text)
    assert events[-2]["choices"] == []
    assert events[-2]["timings"]["predicted_n"] == events[-2]["usage"]["completion_tokens"]


# ------------------------------------------------------------------------------------- prefix cache


async def test_prefix_cache_hits_and_misses():
    async with client_for(create_app()) as c:
        first = (await c.post("/v1/chat/completions", json=body(LONG + " tail one"))).json()["usage"]
        second = (await c.post("/v1/chat/completions", json=body(LONG + " tail two"))).json()["usage"]
        other = (await c.post("/v1/chat/completions", json=body("completely different " * 50))).json()["usage"]
        short = (await c.post("/v1/chat/completions", json=body("a"))).json()["usage"]
        short2 = (await c.post("/v1/chat/completions", json=body("a"))).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    # role marker + 200 shared words + " tail" are common: 202 tokens -> rounded down to blocks of 4.
    assert cached == 200
    assert cached % 4 == 0
    assert other["prompt_tokens_details"]["cached_tokens"] == 0
    # "a" prompt = 4 tokens = one full block: first call writes it, identical second call hits it.
    assert short["prompt_tokens_details"]["cached_tokens"] == 0
    assert short2["prompt_tokens_details"]["cached_tokens"] == 4


async def test_prefix_cache_is_per_model_and_respects_block_size():
    app = create_app(MockOptions(cache_block=64))
    async with client_for(app) as c:
        await c.post("/v1/chat/completions", json=body(LONG))
        other_model = {**body(LONG), "model": "mock/echo-large"}
        u = (await c.post("/v1/chat/completions", json=other_model)).json()["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] == 0
        u = (await c.post("/v1/chat/completions", json=body(LONG + " more"))).json()["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] == 192  # 204 prompt tokens -> 3 blocks of 64


async def test_prefix_cache_ttl_expiry_disable_and_reset():
    async with client_for(create_app(MockOptions(cache_ttl=0.2))) as c:
        await c.post("/v1/chat/completions", json=body(LONG))
        u = (await c.post("/v1/chat/completions", json=body(LONG))).json()["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] > 0
        await asyncio.sleep(0.3)
        u = (await c.post("/v1/chat/completions", json=body(LONG))).json()["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] == 0
        # reset clears the cache
        await c.post("/mock/reset")
        u = (await c.post("/v1/chat/completions", json=body(LONG))).json()["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] == 0
        # cache off -> never any hit, no writes
        await c.post("/mock/options", json={"cache": False, "dialect": "openrouter"})
        u = (await c.post("/v1/chat/completions", json=body(LONG))).json()["usage"]
        assert u["prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}


def test_prefix_cache_lru_bound():
    app = create_app(MockOptions(cache_entries=10))
    cache = app.state.mock.cache
    opts = app.state.mock.options
    for i in range(20):
        cache.lookup_and_store("m", [f"t{i}-{j}" for j in range(40)], opts)
    assert len(cache._blocks) == 10


# --------------------------------------------------------------------------------------- directives


@pytest.mark.parametrize("status", [500, 429, 503, 401, 402])
async def test_fail_directive(status: int):
    app = create_app()
    async with client_for(app) as c:
        r = await c.post("/v1/chat/completions", json=body(mock={"fail": status}))
        stats = (await c.get("/mock/stats")).json()
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert isinstance(err["message"], str)
    if status in (429, 503):
        assert r.headers["retry-after"] == "1"
    else:
        assert "retry-after" not in r.headers
    assert stats["failures"] == 1
    assert stats["requests"] == 1


async def test_latency_directive_and_option():
    async with client_for(create_app()) as c:
        t0 = time.monotonic()
        r = await c.post("/v1/chat/completions", json=body(mock={"latency": 0.3}))
        assert r.status_code == 200
        assert time.monotonic() - t0 >= 0.3
        t0 = time.monotonic()
        await c.post("/v1/chat/completions", json=body())
        assert time.monotonic() - t0 < 0.2
    async with client_for(create_app(MockOptions(latency=0.2))) as c:
        t0 = time.monotonic()
        await c.post("/v1/chat/completions", json=body())
        assert time.monotonic() - t0 >= 0.2


async def test_hang_directive_times_out_client():
    app = create_app()
    async with live_server(app) as url:
        # (the hang is in the answer: connecting gets time of its own, a loaded machine may need it)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(0.3, connect=5)) as c:
            t0 = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/chat/completions", json=body(mock={"hang": True}))
            assert time.monotonic() - t0 < 2
        # the server is still healthy afterwards
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            assert (await c.post("/v1/chat/completions", json=body())).status_code == 200


async def test_hang_directive_under_asgi_transport():
    async with client_for(create_app()) as c:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.post("/v1/chat/completions", json=body(mock={"hang": True})), 0.2)


async def test_fail_after_chunks_error_mode():
    async with client_for(create_app()) as c:
        r = await c.post(
            "/v1/chat/completions",
            json=body(
                "a b c d e",
                stream=True,
                stream_options={"include_usage": True},
                mock={"fail_after_chunks": 2},
            ),
        )
        stats = (await c.get("/mock/stats")).json()
    assert r.status_code == 200
    _, events = parse_sse(r.text)
    content = [ev for ev in events[:2]]
    assert "".join(ev["choices"][0]["delta"]["content"] for ev in content) == "echo:"
    err = events[2]
    assert err["error"]["code"] == 500 and err["error"]["message"]
    assert err["choices"][0]["finish_reason"] == "error"
    assert events[3:] == ["[DONE]"]
    assert not any(isinstance(ev, dict) and "usage" in ev for ev in events)
    assert stats["failures"] == 1 and stats["streams"] == 1


async def test_fail_after_chunks_disconnect_mode():
    directive = {"fail_after_chunks": 2, "fail_mode": "disconnect"}
    # ASGITransport: the exception surfaces as an httpx.RemoteProtocolError subclass.
    async with client_for(create_app()) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post("/v1/chat/completions", json=body("a b c d", stream=True, mock=directive))
    assert issubclass(MockDisconnect, httpx.RemoteProtocolError)
    # Real HTTP: the connection is cut mid-body, after the first chunks, without [DONE].
    async with live_server(create_app()) as url, httpx.AsyncClient(base_url=url, timeout=5) as c:
        lines: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream("POST", "/v1/chat/completions", json=body("a b c d", stream=True, mock=directive)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    lines.append(line)
        data = [ln for ln in lines if ln.startswith("data: ")]
        assert len(data) == 2
        assert "data: [DONE]" not in lines


async def test_reply_directive_and_chunk_delay_directive():
    async with client_for(create_app()) as c:
        r = await c.post("/v1/chat/completions", json=body(mock={"reply": "Exactly this, please."}))
        assert r.json()["choices"][0]["message"]["content"] == "Exactly this, please."
        assert r.json()["usage"]["completion_tokens"] == len(tokenize("Exactly this, please.")) == 5
        r = await c.post("/v1/chat/completions", json=body(max_tokens=2, mock={"reply": "one two three"}))
        assert r.json()["choices"][0]["message"]["content"] == "one two"
        t0 = time.monotonic()
        r = await c.post("/v1/chat/completions", json=body("a b c", stream=True, mock={"chunk_delay": 0.05}))
        assert time.monotonic() - t0 >= 0.05 * 4
        _, events = parse_sse(r.text)
        assert events[-1] == "[DONE]"


async def test_invalid_directive_is_400():
    async with client_for(create_app()) as c:
        for bad in ({"fail": "x"}, {"latency": -1}, {"dialect": "klingon"}, {"fail_mode": "boom"}, "nope"):
            r = await c.post("/v1/chat/completions", json=body(mock=bad))
            assert r.status_code == 400, bad
            assert r.json()["error"]["code"] == "invalid_mock_directive"


# ----------------------------------------------------------------------------------- request errors


async def test_request_errors():
    async with client_for(create_app()) as c:
        r = await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await c.post("/v1/chat/completions", json={"model": MODEL})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 400
        r = await c.post("/v1/chat/completions", json={**body(), "model": "gpt-nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await c.post("/v1/chat/completions", json=body(max_tokens=-1))
        assert r.status_code == 400
        r = await c.post("/v1/chat/completions", json=[1, 2])
        assert r.status_code == 400
        stats = (await c.get("/mock/stats")).json()
    assert stats["requests"] == 6 and stats["failures"] == 6


# -------------------------------------------------------------------------------------------- admin


async def test_admin_stats_reset_and_options():
    async with client_for(create_app()) as c:
        await c.post("/v1/chat/completions", json=body())
        await c.post("/v1/chat/completions", json=body(stream=True))
        s = (await c.get("/mock/stats")).json()
        assert (s["requests"], s["streams"], s["failures"]) == (2, 1, 0)
        assert s["prompt_tokens"] > 0 and s["completion_tokens"] > 0
        await c.post("/mock/reset")
        s = (await c.get("/mock/stats")).json()
        assert (s["requests"], s["streams"], s["failures"]) == (0, 0, 0)

        r = await c.post("/mock/options", json={"models": ["x/y"], "dialect": "deepseek"})
        assert r.status_code == 200
        assert r.json()["models"] == ["x/y"] and r.json()["latency"] == 0.0
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "x/y"
        r = await c.post("/v1/chat/completions", json={**body(), "model": "x/y"})
        assert "prompt_cache_hit_tokens" in r.json()["usage"]
        assert (await c.post("/mock/options", json={"dialect": "nope"})).status_code == 400
        assert (await c.post("/mock/options", json={"unknown_field": 1})).status_code == 400
        assert (await c.post("/mock/options", content=b"[")).status_code == 400


def test_options_validation():
    with pytest.raises(ValueError):
        MockOptions(dialect="bogus")
    opts = MockOptions()
    assert opts.models == ["mock/echo", "mock/echo-large"]
    assert (opts.latency, opts.chunk_delay, opts.dialect, opts.cache, opts.cache_ttl, opts.cache_block) == (
        0.0,
        0.0,
        "openai",
        True,
        300,
        4,
    )
