"""``metering.RelayResponse``: a relayed stream sends every chunk, stops when its client goes (its
generator then runs its cleanup: what meters the stream and closes the upstream), and lets a
cancellation from elsewhere (the server shutting down) through."""

from __future__ import annotations

import asyncio

import pytest

from tollway.metering import RelayResponse

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}


def relay(events: list[str], gap: float = 0.0) -> tuple[RelayResponse, list[str]]:
    cleaned: list[str] = []

    async def body():
        try:
            for e in events:
                yield e.encode()
                await asyncio.sleep(gap)
        finally:
            cleaned.append("cleaned")

    return RelayResponse(body(), media_type="text/event-stream"), cleaned


async def test_every_chunk_is_sent_and_nothing_is_left_running():
    response, cleaned = relay(["a", "b", "c"])
    sent: list[dict] = []
    gone = asyncio.Event()

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    before = asyncio.all_tasks()
    await response(SCOPE, receive, send)
    bodies = [m.get("body") for m in sent if m["type"] == "http.response.body"]
    assert bodies == [b"a", b"b", b"c", b""] and cleaned == ["cleaned"]
    await asyncio.sleep(0)
    assert not asyncio.all_tasks() - before  # (no task of its own left running: the listener is gone)


async def test_a_client_that_goes_stops_the_relay_and_its_cleanup_runs():
    response, cleaned = relay([f"e{i}" for i in range(100)], gap=0.01)
    sent: list[dict] = []

    async def receive():
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(response(SCOPE, receive, send), 2)  # (returns: the disconnect is no error)
    assert 1 < len(sent) < 50 and cleaned == ["cleaned"]
    assert not asyncio.current_task().cancelling()  # (the relay's own cancellation was taken back)


async def test_a_cancellation_from_elsewhere_goes_through():
    response, cleaned = relay([f"e{i}" for i in range(100)], gap=0.01)

    async def receive():
        await asyncio.Event().wait()  # the client stays

    async def send(message):
        pass

    task = asyncio.ensure_future(response(SCOPE, receive, send))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["cleaned"]
