"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools one, with the two bounds it lacks.

uvicorn's httptools protocol takes a request's head (its line and headers) of any size, and the
parser joins a header's pieces as they arrive: one client sending a header of a few hundred MiB
held the event loop for seconds at a time, every call and the settlement worker with it. And it
waits for a request's bytes for ever: a body that never ends kept its connection and task open.
nginx in front (``deploy/nginx.conf``) bounds both; ``tollway serve`` on its own now does too:

- a head over ``MAX_HEAD`` bytes is answered ``431`` and its connection closed;
- a request begun (or a connection opened) that sends nothing for ``IDLE_SECONDS`` while its
  head or body is unfinished is answered ``408`` (if nothing was answered yet) and closed. Time
  spent with reading paused by the server (a body the app has not taken yet) does not count.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD = 128 * 1024  # bytes of a request line and its headers (what deploy/nginx.conf lets through: 4 x 32 KiB)
IDLE_SECONDS = 30.0  # the longest a client may send nothing while a request of its is unfinished

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: int | None = 0  # bytes received of the request head being read (None: reading a body)
        self._heads = 0  # request heads read whole on this connection
        self._waiting = False  # for bytes of an unfinished request (or a connection's first)
        self._heard = 0.0  # when bytes last arrived
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting = False
        if self._idle is not None:
            self._idle.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._heard = self.loop.time()
        if self._head is None:  # (a body)
            super().data_received(data)
            return
        heads = self._heads
        super().data_received(data)  # (one read, at most 256 KiB: parsed at once, not joined piece by piece)
        if self._heads == heads and self._head is not None:  # all of it head, and the head goes on
            self._head += len(data)
            if self._head > MAX_HEAD and not self.transport.is_closing():
                self._refuse(431, "request head too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._wait()

    def on_headers_complete(self) -> None:
        self._head, self._heads = None, self._heads + 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head, self._waiting = 0, False
        super().on_message_complete()

    def _wait(self) -> None:
        self._waiting, self._heard = True, self.loop.time()
        if self._idle is None:
            self._idle = self.loop.call_later(IDLE_SECONDS, self._check_idle)

    def _check_idle(self) -> None:
        """Re-armed for the rest of the time rather than on every read (a timer a read costs more)."""
        self._idle = None
        if not self._waiting or self.transport.is_closing():
            return
        left = self._heard + IDLE_SECONDS - self.loop.time()
        if left > 0 or (self.flow is not None and self.flow.read_paused):
            self._idle = self.loop.call_later(max(left, IDLE_SECONDS / 10), self._check_idle)
            return
        self._refuse(408, "request not received in time")

    def _answering(self) -> bool:
        """Whether an answer is on its way: while a head is read, the answer to the request before it
        (pipelined); while a body is, this request's (the app answered before it read it all)."""
        if self._head is None:
            return bool(self.cycle.response_started)
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (unless an answer to this request began: the app's) and close the connection."""
        cycle = self.cycle
        if not self._answering():
            body = message.encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, REASONS[status], len(body), body)
            )
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # (the app, waiting for the body, hears the client gone; its answer is dropped)
            cycle.message_event.set()
        self.transport.close()
