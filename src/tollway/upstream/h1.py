"""The upstream's httpx transport, on asyncio and httptools (llhttp, the C parser uvicorn uses).

aiohttp's client (the transport before this one was built on it) spends ~0.2 ms of CPU per call in
its machinery; a bare asyncio protocol feeding httptools does the same HTTP/1.1 exchange for a
fraction of that (``scripts/bench_client.py``). The chain's JSON-RPC client uses it too.
``H1Transport`` is that protocol under httpx: one ``asyncio.Protocol`` per connection feeds an
``httptools.HttpResponseParser``, and the request's own coroutine waits on a loop future for the
head, then for each piece of the body (no task, queue or event per request).

What it keeps of httpx's own transport:
- timeouts per request, from httpx's ``timeout`` extension: ``connect`` bounds the TCP and TLS
  handshake, ``read`` each wait for bytes (the headers' and every chunk's), ``pool`` the wait for
  a free connection plus the connect; ``write`` bounds each wait for the socket to drain while a
  large request body is sent (``WriteTimeout``; aiohttp has none);
- one pool of at most ``limits.max_connections`` connections, reused per scheme, host and port;
  idle ones (at most ``limits.max_keepalive_connections``) kept ``limits.keepalive_expiry``
  seconds; an idle one the server closed is noticed (EOF, or a closing transport) and never
  reused; TCP_NODELAY; TLS verified against httpx's certificates (certifi, or ``SSL_CERT_FILE``)
  unless an ``ssl.SSLContext`` is given (``verify=False``: not verified);
- httpx's error types: a refused, unresolvable or untrusted connection is a ``ConnectError``; a
  connect that timed out a ``ConnectTimeout``, a wait for room in the pool a ``PoolTimeout``, a read
  that did a ``ReadTimeout``; a
  peer that closed before answering or cut a body short (or answered garbage, or a header block
  over ``MAX_HEAD``) a ``RemoteProtocolError``, as with h11; a reset connection a ``ReadError``; a
  URL that is not http(s) an ``UnsupportedProtocol``;
- content-encoding: a body compressed although the gateway asked for none (gzip, deflate) is
  decoded here in steps of at most 64 KiB, so the body cap stops a gzip bomb; any other encoding
  fails (``DecodingError``); the headers httpx gets then lack content-encoding and content-length;
- streaming: the body reaches httpx piece by piece as it arrives (Content-Length, chunked, or read
  until the server closes); past ``HIGH_WATER`` unread bytes the socket stops being read until the
  reader catches up;
- closing: a response closed before its body ended closes its connection (a half-read body never
  goes back to the pool); one read to the end returns it to the pool, unless the server said
  ``Connection: close`` (or spoke HTTP/1.0, or ended the body by closing); ``aclose`` closes them all.

A URL's user information (``https://user:secret@rpc.example/``) is sent as HTTP Basic credentials,
unless the request has an ``Authorization`` of its own. Request bodies are bytes (sent with the
head in one write when small) or an httpx async stream (sent chunked, as httpx's
``Transfer-Encoding: chunked`` header says). Like the httpcore transport it speaks HTTP/1.1 only
and uses no proxy; cookies stay the httpx client's business. A request that fails is never
retried (an upstream call may cost money).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import sys
import zlib
from collections import deque
from collections.abc import AsyncIterator
from typing import NamedTuple

import httptools
import httpx

MAX_HEAD = 64 * 1024  # an answer's status line and headers (h11 allows 16 KiB; a tollway's 402 sends ~8 KB)
DECODE_STEP = 64 * 1024  # the most one step of decoding a compressed body may produce
HIGH_WATER = 256 * 1024  # unread body bytes past which the socket is not read until the reader takes them
ONE_WRITE = 64 * 1024  # a bytes body up to this size goes out joined with the head, in one write
NO_TIMEOUT: dict[str, float | None] = {}


class _Origin(NamedTuple):
    key: tuple[str, bytes]  # (scheme, host[:port]): connections are pooled per origin
    host: str
    port: int
    tls: bool


def _basic(url: httpx.URL) -> bytes:
    """HTTP Basic credentials from a URL's user information (an RPC or upstream URL may carry them)."""
    return b"Basic " + base64.b64encode(f"{url.username}:{url.password}".encode())


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)  # (a timed-out wait; a wake-up is True)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: the parser's callbacks fill in the current exchange's answer, and the
    request's coroutine (head, then body) waits on ``waiter`` for them."""

    def __init__(self, pool: H1Transport, key: tuple[str, bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # (set by connection_made)
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[bool] | None = None
        self.drainer: asyncio.Future[bool] | None = None
        self.write_paused = False
        self.read_paused = False
        self.lost = False  # the server closed the connection, or it broke
        self.retired = False  # closed on our side, out of the pool's count
        self.idle_at = 0.0
        self.chunks: list[bytes] = []
        self.start(head_only=False)  # busy from the start: owned by the request that connects it

    def start(self, head_only: bool) -> None:
        """A new exchange on this connection."""
        self.busy = True
        self.head_only = head_only
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False  # the whole answer was received
        self.keep_alive = False
        self.head_bytes = 0
        self.idle_bytes = 0
        self.buffered = 0
        self.error: httpx.TransportError | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # (asyncio and uvloop set it already; this says so, for any loop)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done:  # bytes nobody asked for: the connection is not reused
            self.keep_alive = False
            if not self.busy:
                self.pool._discard(self)
            return
        if not self.head_done:
            self.head_bytes += len(data)  # (at least the head's size so far: the body's first bytes may count)
        else:
            self.idle_bytes += len(data)  # (bytes past the head no body, trailer or end has come of yet)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.keep_alive = False
            if not self.done:  # (else: bytes past the end of a whole answer, see on_message_begin)
                self.fail(httpx.RemoteProtocolError(f"invalid HTTP answer: {exc}"))
        if not self.head_done:
            if self.head_bytes > MAX_HEAD:  # (llhttp has no bound of its own)
                self.fail(httpx.RemoteProtocolError(f"the answer's header block is over {MAX_HEAD} bytes"))
        elif self.idle_bytes > 2 * MAX_HEAD and not self.done:  # (a trailer line that never ends, say)
            self.fail(httpx.RemoteProtocolError(f"the answer sent {self.idle_bytes} bytes that are not its body"))
        elif self.buffered > HIGH_WATER and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.busy:
            if not self.done:
                if exc is not None:
                    self.fail(httpx.ReadError(str(exc) or type(exc).__name__))
                elif self.head_done and self.until_close():
                    self.done = True  # the body was "until the server closes", and it did
                elif self.head_done:
                    self.fail(httpx.RemoteProtocolError("the server closed the connection before the body ended"))
                else:
                    self.fail(httpx.RemoteProtocolError("the server closed the connection without answering"))
            self.wake()
            if self.drainer is not None and not self.drainer.done():
                self.drainer.set_result(True)
        elif not self.retired:
            self.pool._discard(self)  # an idle connection the server closed

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drainer is not None and not self.drainer.done():
            self.drainer.set_result(True)

    # -- httptools' callbacks

    def on_message_begin(self) -> None:
        if self.done:  # a second answer to one request: refuse it (data_received then keeps the first)
            raise httptools.HttpParserError("data after the answer")

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:  # a trailer: bounded as the head is
            self.idle_bytes = 0
            self.head_bytes += len(name) + len(value) + 4
            if self.head_bytes > 2 * MAX_HEAD:
                raise httptools.HttpParserError(f"the trailers are over {MAX_HEAD} bytes")
        self.headers.append((name, value.rstrip(b" \t")))  # (llhttp strips the leading space, not the trailing)

    def on_headers_complete(self) -> None:
        if self.head_bytes > MAX_HEAD and sum(len(k) + len(v) + 4 for k, v in self.headers) > MAX_HEAD:
            raise httptools.HttpParserError(f"the header block is over {MAX_HEAD} bytes")
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the answer follows (101 is refused, as an upgrade)
            self.headers = []
            self.reason = b""
            return
        self.status = status
        self.head_done = True
        if self.head_only:  # an answer to HEAD has no body, whatever its headers say (the parser can't know)
            self.done = True

    def on_body(self, body: bytes) -> None:
        self.idle_bytes = 0
        if not self.done:
            self.chunks.append(body)
            self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.head_done and not self.done:  # (not the end of a 1xx)
            self.done = True
            self.keep_alive = self.parser.should_keep_alive()  # (False after Connection: close, or in HTTP/1.0)

    # -- the request's side

    def fail(self, error: httpx.TransportError) -> None:
        if self.error is None:
            self.error = error
        self.keep_alive = False

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(True)

    async def wait(self, timeout: float | None) -> bool:
        """Until the parser or the connection has news (True), or ``timeout`` seconds (False)."""
        fut = self.waiter = self.loop.create_future()
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    async def drain(self, timeout: float | None) -> None:
        while self.write_paused and not self.lost:
            fut = self.drainer = self.loop.create_future()
            timer = None if timeout is None else self.loop.call_later(timeout, _expire, fut)
            try:
                if not await fut:
                    raise httpx.WriteTimeout("timed out sending the request body")
            finally:
                self.drainer = None
                if timer is not None:
                    timer.cancel()

    def take(self) -> bytes:
        """The body bytes received since the last take."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.read_paused:
            self.read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
        return data

    def until_close(self) -> bool:
        """Whether the answer's body is framed by the connection's end (neither a length nor chunked)."""
        for name, value in self.headers:
            name = name.lower()
            if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    def close(self) -> None:
        if not self.retired:
            self.retired = True
            self.transport.close()
            self.pool._retire(self)
        if not self.done:  # a reader waiting on it (its response was closed from another task) ends now
            self.fail(httpx.ReadError("the connection was closed"))
            self.wake()


class H1Body(httpx.AsyncByteStream):
    """An answer's body as httpx's stream: each piece as it arrives — decoded, if the upstream
    compressed it although it was asked not to, a bounded step at a time."""

    def __init__(self, pool: H1Transport, conn: _Connection, encoding: str, timeout: float | None) -> None:
        self.pool = pool
        self.conn: _Connection | None = conn
        self.encoding = encoding
        self.timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        if conn is None:
            raise httpx.StreamClosed()
        try:
            if self.encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
                raise httpx.DecodingError(f"unsupported content-encoding {self.encoding[:40]!r}")
            decoder = None if self.encoding in ("", "identity") else zlib.decompressobj(wbits=47)  # gzip or zlib
            while True:
                if conn.chunks:
                    chunk = conn.take()
                    if decoder is None:
                        yield chunk
                        continue
                    while chunk:
                        try:
                            part = decoder.decompress(chunk, DECODE_STEP)
                        except zlib.error as exc:
                            raise httpx.DecodingError(f"bad {self.encoding} body: {exc}") from exc
                        chunk = decoder.unconsumed_tail
                        if part:
                            yield part
                elif conn.done:
                    break
                elif conn.error is not None:
                    raise conn.error
                elif not await conn.wait(self.timeout):
                    raise httpx.ReadTimeout("timed out reading the body")
            if decoder is not None and (tail := decoder.flush()):  # (all input is consumed: bounded)
                yield tail
        except BaseException:  # an error, or the reader left midway (GeneratorExit): the connection goes
            self.release(reuse=False)
            raise
        self.release(reuse=True)

    def release(self, reuse: bool) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.pool._release(conn, reuse)

    async def aclose(self) -> None:
        self.release(reuse=False)  # (read to the end, it was released already)

    def __del__(self) -> None:  # a response dropped unclosed: its connection must not hold a pool slot forever
        if self.conn is not None:
            with contextlib.suppress(RuntimeError):  # (the loop may be closed by now)
                self.release(reuse=False)


class H1Transport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> None:
        self.limits = limits
        self.max = limits.max_connections or sys.maxsize
        self.max_idle = sys.maxsize if limits.max_keepalive_connections is None else limits.max_keepalive_connections
        self.expiry = limits.keepalive_expiry
        self.ssl = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
        self.origins: dict[tuple[str, bytes], _Origin] = {}
        self.conns: set[_Connection] = set()  # open and in the count (those connecting are only counted)
        self.size = 0  # connections open or opening, at most self.max
        self.idle: dict[tuple[str, bytes], list[_Connection]] = {}  # per origin, the oldest first
        self.n_idle = 0
        self.waiters: deque[asyncio.Future[None]] = deque()  # requests waiting for room in the pool
        self.sweeper: asyncio.TimerHandle | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = self.origins.get((url.scheme, url.netloc)) or self._origin(url)
        timeout = request.extensions.get("timeout") or NO_TIMEOUT
        conn = self._take_idle(origin.key) or await self._connect_or_wait(origin, timeout)
        method = request.method
        conn.start(head_only=method == "HEAD")
        try:
            parts = [method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
            for name, value in request.headers.raw:
                parts += (name, b": ", value, b"\r\n")
            if url.userinfo and "authorization" not in request.headers:
                parts += (b"Authorization: ", _basic(url), b"\r\n")  # (as httpx's client and aiohttp do)
            parts.append(b"\r\n")
            try:
                body = request.content
            except httpx.RequestNotRead:  # a streamed body
                conn.transport.write(b"".join(parts))
                await self._send_stream(conn, request, timeout.get("write"))
            else:
                if len(body) <= ONE_WRITE:
                    parts.append(body)
                    conn.transport.write(b"".join(parts))
                else:
                    conn.transport.write(b"".join(parts))
                    conn.transport.write(body)
                if conn.write_paused:
                    await conn.drain(timeout.get("write"))
            read = timeout.get("read")
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                if not await conn.wait(read):
                    raise httpx.ReadTimeout("timed out waiting for the answer")
        except BaseException:
            self._release(conn, reuse=False)
            raise
        headers = conn.headers
        encoding = ""
        for name, value in headers:
            if name.lower() == b"content-encoding":
                encoding = value.decode("latin-1").strip().lower()
                headers = [(k, v) for k, v in headers if k.lower() not in (b"content-encoding", b"content-length")]
                break
        return httpx.Response(
            status_code=conn.status,
            headers=headers,
            stream=H1Body(self, conn, encoding, read),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
        )

    async def _send_stream(self, conn: _Connection, request: httpx.Request, timeout: float | None) -> None:
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()  # (httpx's own choice)
        async for part in request.stream:  # type: ignore[union-attr]
            if conn.lost:  # the server answered early, or went: read what it said
                return
            if part:
                conn.transport.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
                if conn.write_paused:
                    await conn.drain(timeout)
        if chunked and not conn.lost:
            conn.transport.write(b"0\r\n\r\n")

    def _origin(self, url: httpx.URL) -> _Origin:
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}: only http and https")
        if not url.raw_host:
            raise httpx.UnsupportedProtocol(f"no host in the URL {url}")
        tls = url.scheme == "https"
        origin = _Origin((url.scheme, url.netloc), url.raw_host.decode("ascii"), url.port or (443 if tls else 80), tls)
        if len(self.origins) >= 256:  # (the upstreams' few origins; anything more is not worth keeping)
            self.origins.clear()
        self.origins[origin.key] = origin
        return origin

    # -- the pool

    def _take_idle(self, key: tuple[str, bytes]) -> _Connection | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()  # the most recently used: the least likely to have been closed
            self.n_idle -= 1
            stale = self.expiry is not None and conn.loop.time() - conn.idle_at >= self.expiry
            if conn.lost or stale or conn.transport.is_closing():
                conn.close()
                continue
            return conn
        return None

    async def _connect_or_wait(self, origin: _Origin, timeout: dict[str, float | None]) -> _Connection:
        loop = asyncio.get_running_loop()
        connecting = False  # (a timeout while still waiting for room is the pool's, not the upstream's)
        try:
            async with asyncio.timeout(timeout.get("pool")):  # the wait for room, and the connect
                while True:
                    conn = self._take_idle(origin.key)
                    if conn is not None:
                        return conn
                    if self.size >= self.max and self.n_idle:
                        self._evict()  # an idle connection to another origin makes room
                    if self.size < self.max:
                        break
                    waiter = loop.create_future()
                    self.waiters.append(waiter)
                    try:
                        await waiter
                    except BaseException:
                        if waiter.done() and not waiter.cancelled():
                            self._wake()  # woken, but leaving: the room goes to the next one waiting
                        raise
                self.size += 1
                connecting = True
                conn = _Connection(self, origin.key, loop)
                try:
                    async with asyncio.timeout(timeout.get("connect")):
                        await loop.create_connection(
                            lambda: conn,
                            origin.host,
                            origin.port,
                            ssl=self.ssl if origin.tls else None,
                            server_hostname=origin.host if origin.tls else None,
                        )
                except BaseException:
                    if conn.transport is not None:  # (asyncio closes it too; this is in case)
                        conn.transport.close()
                    self.size -= 1
                    self._wake()
                    raise
                self.conns.add(conn)
                return conn
        except TimeoutError as exc:  # (before OSError: TimeoutError is one)
            if not connecting:
                raise httpx.PoolTimeout(f"no free connection to {origin.host}:{origin.port} in time") from exc
            raise httpx.ConnectTimeout(f"timed out connecting to {origin.host}:{origin.port}") from exc
        except OSError as exc:  # refused, unresolvable, TLS (an untrusted certificate)
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc

    def _release(self, conn: _Connection, reuse: bool) -> None:
        conn.busy = False
        if (
            reuse
            and conn.done
            and conn.keep_alive
            and not conn.chunks
            and not conn.lost
            and not conn.retired
            and self.n_idle < self.max_idle
        ):
            conn.idle_at = conn.loop.time()
            self.idle.setdefault(conn.key, []).append(conn)
            self.n_idle += 1
            if self.sweeper is None and self.expiry is not None:
                self.sweeper = conn.loop.call_at(conn.idle_at + self.expiry, self._sweep, conn.loop)
            self._wake()
        else:
            conn.close()

    def _retire(self, conn: _Connection) -> None:
        """``conn`` was closed: out of the count, and its room to whoever waits for it."""
        self.conns.discard(conn)
        self.size -= 1
        self._wake()

    def _discard(self, conn: _Connection) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            self.n_idle -= 1
        conn.close()

    def _evict(self) -> None:
        oldest = min((conns for conns in self.idle.values() if conns), key=lambda conns: conns[0].idle_at)
        self.n_idle -= 1
        oldest.pop(0).close()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():  # (one that timed out is cancelled)
                waiter.set_result(None)
                return

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Closes the connections idle for ``keepalive_expiry``; again when the next one will be."""
        self.sweeper = None
        expiry = self.expiry
        assert expiry is not None
        now = loop.time()
        next_at = None
        for conns in self.idle.values():
            while conns and now - conns[0].idle_at >= expiry:
                self.n_idle -= 1
                conns.pop(0).close()
            if conns and (next_at is None or conns[0].idle_at < next_at):
                next_at = conns[0].idle_at
        if next_at is not None:
            self.sweeper = loop.call_at(next_at + expiry, self._sweep, loop)

    async def aclose(self) -> None:
        for conn in list(self.conns):
            conn.close()
        self.idle.clear()
        self.n_idle = 0
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None


def h1_transport(limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> H1Transport:
    """The upstream client's transport: ``httpx.AsyncClient(transport=h1_transport(limits))``."""
    return H1Transport(limits, verify)
