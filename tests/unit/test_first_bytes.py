"""What an upstream's stream must send before a call is committed to it (``Upstream._first_bytes``):
its first event that answers. Keep-alive comments and opening events alone do not commit it, and a
stream of nothing else is given up after ``MAX_PREAMBLE`` bytes, each line read once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tollway.errors import UpstreamError, UpstreamUnavailable
from tollway.upstream.client import MAX_PREAMBLE, Upstream, scrubbed, url_secrets


async def chunks(*parts: bytes, then: bytes = b"", times: int = 0) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    for _ in range(times):
        yield then


async def first(stream: AsyncIterator[bytes]) -> bytes:
    return await Upstream._first_bytes(None, stream, True)  # type: ignore[arg-type]


async def test_the_first_answering_event_commits_a_stream_even_split_across_reads():
    got = await first(
        chunks(b": keep-alive\n", b'data: {"type":"message_start"}\n\ndata: {"type":"content_bl', b'ock_delta"}\n')
    )
    assert got.endswith(b'{"type":"content_block_delta"}\n')


async def test_an_error_before_the_answer_is_a_failure():
    with pytest.raises(UpstreamError):
        await first(chunks(b'data: {"type":"message_start"}\n\n', b'data: {"type":"error","error":{"message":"no"}}\n'))


async def test_a_stream_that_ends_before_answering_is_a_failure():
    with pytest.raises(UpstreamError, match="without answering"):
        await first(chunks(b": processing\n\n", b"data: [DONE]\n\n"))


async def test_a_stream_of_keep_alives_alone_is_given_up():
    with pytest.raises(UpstreamError, match="without answering"):
        await first(chunks(then=b": keep-alive\n" * 1260, times=2 * MAX_PREAMBLE // 16_380))


@pytest.mark.parametrize("kind", [b"[1]", b'{"a": 1}', b"7"])
async def test_an_event_whose_type_is_not_a_string_is_a_failure_not_a_crash(kind):
    """A hostile upstream's first event: a failure of the upstream's (502, the next one is tried),
    not a TypeError (a 500, and no other upstream asked)."""
    with pytest.raises(UpstreamError, match="not a string"):
        await first(chunks(b'data: {"type": ' + kind + b"}\n\n"))


async def test_a_chat_chunk_whose_type_is_a_nested_keys_answers():
    got = await first(chunks(b'data: {"choices": [{"delta": {"tool_calls": [{"type": "function"}]}}]}\n\n'))
    assert b"tool_calls" in got


async def test_an_error_event_quoting_a_key_is_passed_on_without_it_nor_a_nul():
    """An upstream's error message goes to the client, the log and the ledger (PostgreSQL's text
    holds no NUL: a payment whose undo could not be stored would stay reserved)."""
    keys = {"sk-operator-secret": "[the upstream's key]", "sk-payer-secret": "[X-Provider-Key]"}
    event = b'data: {"type": "error", "error": {"message": "bad key sk-operator-secret or sk-payer-secret\\u0000"}}\n\n'
    with pytest.raises(UpstreamError) as refused:
        await Upstream._first_bytes(None, chunks(event), True, keys)  # type: ignore[arg-type]
    message = refused.value.message
    assert "secret" not in message and "\x00" not in message and "[the upstream's key]" in message, message


def test_what_an_upstreams_url_holds_is_kept_from_its_messages():
    """A user and password, a query's values (as written and decoded) and a token-long path segment
    are secrets; an API's words in the path, and values too short to be keys, are not."""
    keys = url_secrets("https://bob42x:pa%24%24word@llm.example/api/v1/0123456789abcdef0123?key=s%2Fcr+t-value&v=1")
    assert set(keys) == {
        "bob42x", "pa%24%24word", "pa$$word", "0123456789abcdef0123", "s%2Fcr+t-value", "s/cr+t-value", "s/cr t-value"
    }  # fmt: skip
    text = "no route /api/v1/0123456789abcdef0123 for bob42x:pa$$word (key s%2Fcr+t-value), at most 16384"
    assert scrubbed(text, keys) == (
        "no route /api/v1/[the upstream's URL] for [the upstream's URL]:[the upstream's URL]"
        " (key [the upstream's URL]), at most 16384"
    )


async def test_keep_alives_do_not_hold_a_stream_past_its_patience():
    """OpenRouter's ``: OPENROUTER PROCESSING`` every 15 s resets a read timeout: the upstream's
    ``read_timeout`` after it was asked is all it has to start answering."""
    import asyncio
    import time

    async def processing() -> AsyncIterator[bytes]:
        while True:
            yield b": OPENROUTER PROCESSING\n\n"
            await asyncio.sleep(0.05)

    started = time.perf_counter()
    with pytest.raises(UpstreamUnavailable) as late:
        await Upstream._first_bytes(None, processing(), True, None, started + 0.3)  # type: ignore[arg-type]
    assert late.value.code == "upstream_timeout" and time.perf_counter() - started < 1.0


@pytest.mark.parametrize("choices", [b"1", b"true", b"2.5"])
async def test_choices_that_are_no_list_are_no_answer_and_no_crash(choices):
    """A hostile first chunk: not an answer (the stream ends without one: a failure), not a TypeError."""
    with pytest.raises(UpstreamError, match="without answering"):
        await first(chunks(b'data: {"choices": ' + choices + b"}\n\n", b"data: [DONE]\n\n"))


async def test_vllms_error_object_in_a_stream_is_a_failure():
    with pytest.raises(UpstreamError, match="overloaded"):
        await first(chunks(b'data: {"object": "error", "message": "overloaded", "code": 503}\n\n'))
