"""The upstream client's transport under httpx (``H1Transport``: asyncio + httptools): plain HTTP
and kept-alive connections, TLS, timeouts per request, the pool's limit, streaming chunk by chunk,
closing (an abandoned stream closes its connection; ``aclose`` closes them all), connection reuse
and framing, backpressure, and the failures as httpx's errors — then the same failures through
``Upstream.send`` as the gateway's own errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import socket
import ssl
import struct
import subprocess
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import uvicorn

from support import free_port
from tollway.config import UpstreamSettings
from tollway.errors import UpstreamDown, UpstreamError, UpstreamUnavailable
from tollway.mock_upstream import create_app
from tollway.upstream import client as upstream_client
from tollway.upstream.client import Upstream, make_http_client
from tollway.upstream.h1 import HIGH_WATER, H1Transport, h1_transport

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "over h1"}], "max_tokens": 4}
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(n: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % n


def json_answer(doc: Any) -> bytes:
    body = json.dumps(doc).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


class RawServer:
    """An HTTP/1.1 server on raw asyncio whose every answer ``answer`` writes (it may stall, cut the
    connection, or write garbage); it counts connections, and notes those the client closed."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.opened = 0
        self.live = 0
        self.peak = 0
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []
        self.client_closed = asyncio.Event()  # a connection saw EOF from the client
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self.live += 1
        self.peak = max(self.peak, self.live)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.client_closed.set()
                    return
                self.heads.append(head)
                lines = head.lower().split(b"\r\n")
                length = next((int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length:")), 0)
                if any(x.startswith(b"transfer-encoding:") and b"chunked" in x for x in lines):
                    body = b""
                    while (size := int((await reader.readline()).strip(), 16)) > 0:
                        body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readline()
                else:
                    body = await reader.readexactly(length)
                self.bodies.append(body)
                await self.answer(reader, writer, body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.client_closed.set()
        finally:
            self.live -= 1
            writer.close()


@contextlib.asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[RawServer]:
    raw = RawServer(answer)
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield raw
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def serve(**ssl_options: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), port=port, log_level="warning", **ssl_options))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, port


def client(max_connections: int = 4, **kwargs: Any) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(transport=h1_transport(limits, **kwargs))


# -- plain HTTP, TLS ---------------------------------------------------------------------------------------


async def test_plain_http_over_one_kept_alive_connection():
    server, task, port = await serve()
    transport = h1_transport(httpx.Limits(max_connections=4, max_keepalive_connections=4))
    async with httpx.AsyncClient(transport=transport) as http:
        for _ in range(3):  # the connection is kept alive and reused
            r = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY)
            assert r.json()["choices"][0]["message"]["content"] == "echo: over h1"
            assert r.http_version == "HTTP/1.1" and r.reason_phrase == "OK"
        assert len(server.server_state.connections) == 1
        r = await http.get(f"http://127.0.0.1:{port}/v1/models", params={"q": "a b/ü"})  # a GET, a query
        assert r.status_code == 200 and r.json()["data"]
    server.should_exit = True
    await task


async def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "1",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server, task, port = await serve(ssl_keyfile=str(key), ssl_certfile=str(cert))
    trusted = ssl.create_default_context(cafile=str(cert))
    async with client(verify=trusted) as http:
        r = await http.post(f"https://localhost:{port}/v1/chat/completions", json=BODY)
        assert r.status_code == 200
    async with client() as http:
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
            await http.post(f"https://localhost:{port}/v1/chat/completions", json=BODY)
    server.should_exit = True
    await task


async def test_request_bodies_arrive_whole_bytes_or_streamed():
    async def answer(reader, writer, body):
        writer.write(json_answer({"ok": True}))

    async def parts():
        yield b'{"a":'
        yield b"1}"

    async with raw_server(answer) as raw, client() as http:
        assert (await http.post(raw.url + "/x", content=b"{}")).json() == {"ok": True}
        assert (await http.post(raw.url + "/x", content=parts())).json() == {"ok": True}  # sent chunked
    assert raw.bodies == [b"{}", b'{"a":1}']


async def test_request_head_is_what_httpx_built():
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        length = next(int(x.split(b":")[1]) for x in head.lower().split(b"\r\n") if x.startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(json_answer({}))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with client() as http:
        await http.post(f"http://127.0.0.1:{port}/v1/x?a=%2F", content=b"{}", headers={"authorization": "Bearer k"})
    server.close()
    request_line, *lines = heads[0].decode().split("\r\n")
    assert request_line == "POST /v1/x?a=%2F HTTP/1.1"  # the URL as httpx encoded it, not re-quoted
    headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines if x)}
    assert headers["authorization"] == "Bearer k"
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["content-length"] == "2"
    assert headers["user-agent"].startswith("python-httpx/")  # (httpx's headers)


# -- streaming and closing ---------------------------------------------------------------------------------


async def test_a_stream_is_relayed_chunk_by_chunk():
    """The second event is written only after the client has the first one: nothing is buffered."""
    got_first = asyncio.Event()

    async def answer(reader, writer, body):
        writer.write(SSE_HEAD + chunk(event(1)))
        await writer.drain()
        await asyncio.wait_for(got_first.wait(), 5)
        writer.write(chunk(event(2)) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    async with raw_server(answer) as raw, client() as http:
        async with http.stream("POST", raw.url, content=b"{}") as r:
            assert r.headers["content-type"] == "text/event-stream"
            chunks = []
            async for part in r.aiter_raw():
                chunks.append(part)
                got_first.set()
        assert chunks[0] == event(1)
        assert b"".join(chunks) == event(1) + event(2) + b"data: [DONE]\n\n"
        async with http.stream("POST", raw.url, content=b"{}") as r:  # read to the end: the connection is reused
            await r.aread()
        got_first.clear()
    assert raw.opened == 1


async def test_an_abandoned_stream_closes_its_connection():
    async def answer(reader, writer, body):
        writer.write(SSE_HEAD + chunk(event(1)))
        await writer.drain()
        await reader.read(1)  # stalls until the client goes; b"" when it closed the connection
        raw.client_closed.set()

    async with raw_server(answer) as raw, client() as http:
        async with http.stream("POST", raw.url, content=b"{}") as r:
            async for _part in r.aiter_raw():
                break  # the client has what it wants and leaves mid-stream
        await asyncio.wait_for(raw.client_closed.wait(), 2)  # the upstream saw the connection close
        async with http.stream("POST", raw.url, content=b"{}") as r:  # a new connection, not the half-read one
            async for _part in r.aiter_raw():
                break
        assert raw.opened == 2


async def test_a_stream_closed_from_another_task_ends_its_reader_at_once():
    """The gateway cuts a stream (its payment failed on chain) by closing the upstream's response
    from a task of its own while the relay waits for the next chunk: the relay must hear of it
    now, not at the read timeout."""

    async def answer(reader, writer, body):
        if body != b"stream":
            writer.write(json_answer({"ok": True}))
            return
        writer.write(SSE_HEAD + chunk(event(1)))
        await writer.drain()
        await reader.read(1)  # and nothing more

    async with raw_server(answer) as raw, client() as http:
        request = http.build_request("POST", raw.url, content=b"stream", timeout=httpx.Timeout(30))
        r = await http.send(request, stream=True)
        parts = r.aiter_raw()
        assert await parts.__anext__() == event(1)
        asyncio.get_running_loop().call_later(0.1, lambda: asyncio.ensure_future(r.aclose()))
        started = time.monotonic()
        with pytest.raises(httpx.ReadError):
            await parts.__anext__()
        assert time.monotonic() - started < 2
        assert (await http.post(raw.url, content=b"{}")).status_code == 200  # (the pool is whole)
        assert raw.opened == 2


# -- the pool's limit ----------------------------------------------------------------------------------------


def held_stream(release: asyncio.Event) -> Answer:
    """An upstream's answer: a stream's first event, then its end once ``release`` is set."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> None:
        writer.write(SSE_HEAD + chunk(event(1)))
        await writer.drain()
        await release.wait()
        writer.write(b"0\r\n\r\n")

    return answer


async def test_the_pool_never_opens_more_than_max_connections():
    release = asyncio.Event()
    answer = held_stream(release)

    async with raw_server(answer) as raw, client(max_connections=2) as http:
        held = [await http.send(http.build_request("POST", raw.url, content=b"{}"), stream=True) for _ in range(2)]
        assert raw.live == 2
        started = time.monotonic()
        with pytest.raises(httpx.PoolTimeout):  # no free connection within the pool timeout (the upstream is up)
            await http.post(raw.url, content=b"{}", timeout=httpx.Timeout(5, pool=0.3))
        assert 0.25 < time.monotonic() - started < 3
        waiting = asyncio.create_task(http.post(raw.url, content=b"{}", timeout=5))
        await asyncio.sleep(0.1)
        assert not waiting.done() and raw.peak == 2
        await held[0].aclose()  # a connection frees up: the waiting request takes it
        release.set()
        assert (await asyncio.wait_for(waiting, 5)).status_code == 200
        await held[1].aclose()
    assert raw.peak == 2


# -- timeouts, per request -------------------------------------------------------------------------------------


async def test_read_timeout_before_the_answer_is_per_request():
    async def answer(reader, writer, body):
        await asyncio.sleep(0.5)
        writer.write(json_answer({"slow": True}))

    async with raw_server(answer) as raw, client() as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.post(raw.url, content=b"{}", timeout=httpx.Timeout(5, read=0.15))
        assert time.monotonic() - started < 0.45
        r = await http.post(raw.url, content=b"{}", timeout=httpx.Timeout(5, read=2))  # the same client, more time
        assert r.json() == {"slow": True}


async def test_read_timeout_between_chunks():
    async def answer(reader, writer, body):
        writer.write(SSE_HEAD + chunk(event(1)))
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_server(answer) as raw, client() as http:
        got = []
        with pytest.raises(httpx.ReadTimeout):
            async with http.stream("POST", raw.url, content=b"{}", timeout=httpx.Timeout(5, read=0.2)) as r:
                async for part in r.aiter_raw():
                    got.append(part)
        assert got == [event(1)]


async def test_connect_timeout():
    # A listening socket whose backlog is full does not complete a handshake: the connect times out.
    import select
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    while len(fillers) < 64:  # connect until one handshake hangs: from then on the backlog is full
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
        if not select.select([], [s], [], 0.3)[1]:
            break
    else:
        pytest.fail("every handshake completed: the listening socket's backlog never filled")
    try:
        async with client() as http:
            started = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                await http.get(f"http://127.0.0.1:{port}/", timeout=httpx.Timeout(5, connect=0.2))
            assert time.monotonic() - started < 2
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- failures as httpx errors ---------------------------------------------------------------------------------


async def test_refused_is_a_connect_error():
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{free_port()}/")


async def test_closed_without_answering_is_a_remote_protocol_error():
    async def answer(reader, writer, body):
        writer.close()

    async with raw_server(answer) as raw, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(raw.url, content=b"{}")


async def test_endless_trailers_are_a_remote_protocol_error():
    async def answer(reader, writer, body):
        writer.write(SSE_HEAD + chunk(event(1)) + b"0\r\n")
        for i in range(20_000):  # (~400 KB of trailers, and no end)
            writer.write(b"x-trailer-%d: %s\r\n" % (i, b"v" * 8))
        await writer.drain()
        await asyncio.sleep(5)

    async with raw_server(answer) as raw, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", raw.url, content=b"{}") as r:
                async for _ in r.aiter_raw():
                    pass


async def test_one_trailer_that_never_ends_is_a_remote_protocol_error_before_it_is_large():
    """httptools gathers a header's value until its line ends, so a trailer is bounded once
    whole: one whose value never ends would grow for ever (the bytes keep coming, so the read
    timeout never fires). Bytes past the head that come to no body, trailer or end are bounded."""
    sent = 0

    async def answer(reader, writer, body):
        nonlocal sent
        writer.write(SSE_HEAD + chunk(event(1)) + b"0\r\nx-trailer: ")
        for _ in range(16 * 1024 * 1024 // 65536):  # (16 MB of one value, and no end)
            writer.write(b"v" * 65536)
            sent += 65536
            await writer.drain()
        await asyncio.sleep(5)

    async with raw_server(answer) as raw, client() as http:
        tracemalloc.start()
        try:
            with pytest.raises(httpx.RemoteProtocolError, match="not its body"):
                async with http.stream("POST", raw.url, content=b"{}") as r:
                    async for _ in r.aiter_raw():
                        pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 2 * 1024 * 1024 and sent < 16 * 1024 * 1024, (peak, sent)  # (cut short: not all sent)


async def test_a_stream_cut_short_is_a_remote_protocol_error():
    async def answer(reader, writer, body):
        writer.write(SSE_HEAD + chunk(event(1)))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with raw_server(answer) as raw, client() as http:
        got = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", raw.url, content=b"{}") as r:
                async for part in r.aiter_raw():
                    got.append(part)
        assert got == [event(1)]


async def test_garbage_is_a_remote_protocol_error():
    async def answer(reader, writer, body):
        writer.write(b"this is not HTTP\r\n\r\n")

    async with raw_server(answer) as raw, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(raw.url, content=b"{}")


async def test_a_large_header_is_read():
    """A 402 from an upstream tollway carries its offers in one header, up to its 8 KB budget."""
    big = b"x" * 12_000

    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 402 Payment Required\r\npayment-required: %s\r\ncontent-length: 2\r\n\r\n{}" % big)

    async with raw_server(answer) as raw, client() as http:
        r = await http.post(raw.url, content=b"{}")
        assert r.status_code == 402 and r.headers["payment-required"] == big.decode()


# -- connections: reuse, framing, backpressure -----------------------------------------------------------------


async def test_an_idle_connection_the_server_closed_is_not_reused():
    async def answer(reader, writer, body):
        writer.write(json_answer({"ok": True}))
        await writer.drain()
        asyncio.get_running_loop().call_later(0.05, writer.close)  # the server drops the idle connection

    async with raw_server(answer) as raw, client() as http:
        assert (await http.post(raw.url, content=b"{}")).json() == {"ok": True}
        await asyncio.sleep(0.3)  # (the client has seen the connection close)
        assert (await http.post(raw.url, content=b"{}")).json() == {"ok": True}  # a new connection, not a failure
    assert raw.opened == 2


async def test_an_answer_saying_connection_close_closes_its_connection():
    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        await reader.read(1)  # the server leaves the closing to the client

    async with raw_server(answer) as raw, client() as http:
        for _ in range(2):
            assert (await http.post(raw.url, content=b"{}")).json() == {}
        await asyncio.wait_for(raw.client_closed.wait(), 2)
    assert raw.opened == 2


async def test_a_body_read_until_the_server_closes():
    """No Content-Length, not chunked: the body ends when the connection does (which is not reused)."""

    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart 1, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part 2")
        await writer.drain()
        writer.close()

    async with raw_server(answer) as raw, client() as http:
        async with http.stream("POST", raw.url, content=b"{}") as r:
            chunks = [part async for part in r.aiter_raw()]
        assert chunks[0] == b"part 1, " and b"".join(chunks) == b"part 1, part 2"
        assert (await http.post(raw.url, content=b"{}")).content == b"part 1, part 2"
    assert raw.opened == 2


async def test_a_chunked_body_read_whole_keeps_its_connection():
    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"ab") + chunk(b"cd"))
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"2;ext=1\r\nef\r\n" + b"0\r\nx-trailer: 1\r\n\r\n")  # a chunk extension, a trailer

    async with raw_server(answer) as raw, client() as http:
        for _ in range(3):
            assert (await http.post(raw.url, content=b"{}")).content == b"abcdef"
    assert raw.opened == 1


async def test_an_answer_to_head_has_no_body():
    async def answer(reader, writer, body):
        if raw.heads[-1].startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")  # the length GET would have
        else:
            writer.write(json_answer({"ok": True}))

    async with raw_server(answer) as raw, client() as http:
        r = await http.head(raw.url)
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "1000"
        assert (await http.post(raw.url, content=b"{}")).json() == {"ok": True}


async def test_an_interim_answer_is_skipped():
    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n" + json_answer({"ok": True}))

    async with raw_server(answer) as raw, client() as http:
        r = await http.post(raw.url, content=b"{}")
        assert r.json() == {"ok": True} and "link" not in r.headers


async def test_a_large_request_body_arrives_whole():
    async def answer(reader, writer, body):
        writer.write(json_answer({"size": len(body)}))

    big = bytes(range(256)) * 4096  # 1 MiB: more than one write, more than the socket takes at once
    async with raw_server(answer) as raw, client() as http:
        assert (await http.post(raw.url, content=big)).json() == {"size": len(big)}
    assert raw.bodies == [big]


async def test_an_idle_connection_is_closed_after_the_keepalive_expiry():
    async def answer(reader, writer, body):
        writer.write(json_answer({"ok": True}))

    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=0.2)
    async with raw_server(answer) as raw, httpx.AsyncClient(transport=h1_transport(limits)) as http:
        assert (await http.post(raw.url, content=b"{}")).status_code == 200
        await asyncio.wait_for(raw.client_closed.wait(), 3)
        assert (await http.post(raw.url, content=b"{}")).status_code == 200
    assert raw.opened == 2


async def test_bytes_after_the_answer_keep_the_answer_but_not_the_connection():
    async def answer(reader, writer, body):
        writer.write(json_answer({"ok": True}) + b"HTTP/1.1 200 OK\r\n")  # an answer nobody asked for begins

    async with raw_server(answer) as raw, client() as http:
        for _ in range(2):
            assert (await http.post(raw.url, content=b"{}")).json() == {"ok": True}
    assert raw.opened == 2


async def test_a_header_block_over_the_bound_is_a_remote_protocol_error():
    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"x-big: %s\r\n" % (b"x" * 100_000) + b"content-length: 2\r\n\r\n{}")

    async with raw_server(answer) as raw, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(raw.url, content=b"{}")


async def test_a_reset_connection_is_a_read_error():
    async def answer(reader, writer, body):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a RST
        writer.transport.abort()

    async with raw_server(answer) as raw, client() as http:
        with pytest.raises(httpx.ReadError):
            await http.post(raw.url, content=b"{}")


async def test_a_url_not_http_is_unsupported():
    async with client() as http:
        with pytest.raises(httpx.UnsupportedProtocol):
            await http.get("ftp://127.0.0.1/")


async def test_one_pool_for_every_origin():
    """``max_connections`` bounds the connections to all upstreams together: with one, a request to
    another origin closes the idle connection to the first rather than open a second."""

    async def answer(reader, writer, body):
        writer.write(json_answer({"ok": True}))

    async with raw_server(answer) as a, raw_server(answer) as b, client(max_connections=1) as http:
        for raw in (a, b, a):
            assert (await http.post(raw.url, content=b"{}")).status_code == 200
            await asyncio.sleep(0.05)  # (the server sees the other connection close)
            assert a.live + b.live == 1
    assert (a.opened, b.opened) == (2, 1)


async def test_a_large_body_read_slowly_is_not_buffered_whole():
    """Past HIGH_WATER unread bytes the connection stops reading: a slow reader holds the server's
    writes back instead of buffering its whole body; read on, it gets every byte, and the connection."""
    size = 8 * 1024 * 1024
    big = bytes(range(256)) * (size // 256)

    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for i in range(0, size, 64 * 1024):
            writer.write(big[i : i + 64 * 1024])
            await writer.drain()

    async with raw_server(answer) as raw, client() as http:
        h1 = http._transport
        assert isinstance(h1, H1Transport)
        got = bytearray()
        paused = 0
        async with http.stream("POST", raw.url, content=b"{}") as r:
            async for part in r.aiter_raw():
                got += part
                if paused < 3:  # a slow reader, for a while
                    await asyncio.sleep(0.1)
                    (conn,) = h1.conns
                    assert conn.buffered <= HIGH_WATER + 256 * 1024  # (one socket read past the mark, at most)
                    paused += conn.read_paused
        assert paused == 3 and bytes(got) == big
        assert (await http.post(raw.url, content=b"{}")).status_code == 200  # read to the end: reused
    assert raw.opened == 1


async def test_a_request_body_the_server_does_not_read_is_a_write_timeout():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)  # never reads: the client's socket buffer fills up
        writer.close()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield bytes(1024 * 1024)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with client() as http:
        started = time.monotonic()
        with pytest.raises(httpx.WriteTimeout):
            await http.post(f"http://127.0.0.1:{port}/", content=endless(), timeout=httpx.Timeout(5, write=0.2))
        assert time.monotonic() - started < 3
    server.close()


async def test_aclose_closes_every_connection():
    async def answer(reader, writer, body):
        if body == b"stream":
            writer.write(SSE_HEAD + chunk(event(1)))
            await writer.drain()
            await reader.read(1)
        else:
            writer.write(json_answer({"ok": True}))

    async with raw_server(answer) as raw:
        http = client()
        held = await http.send(http.build_request("POST", raw.url, content=b"stream"), stream=True)  # one busy
        assert (await http.post(raw.url, content=b"{}")).status_code == 200  # one idle
        transport = http._transport
        assert isinstance(transport, H1Transport) and len(transport.conns) == 2
        await http.aclose()
        assert not transport.conns and transport.size == 0 and transport.n_idle == 0
        for _ in range(40):
            if raw.live == 0:
                break
            await asyncio.sleep(0.05)
        assert raw.live == 0
        with pytest.raises(httpx.ReadError):  # the held stream's connection was closed under it
            await held.aread()


# -- through Upstream.send: the gateway's errors --------------------------------------------------------------


def upstream(url: str, **settings: Any) -> tuple[Upstream, httpx.AsyncClient]:
    s = UpstreamSettings(name="u", url=url + "/v1", **settings)
    http = make_http_client(s)
    return Upstream(s, http), http


async def test_upstream_send_json_and_stream():
    async def answer(reader, writer, body):
        if b'"stream"' in body:
            writer.write(SSE_HEAD + chunk(event(1)))
            await writer.drain()
            writer.write(chunk(event(2)) + b"0\r\n\r\n")
        else:
            writer.write(json_answer({"choices": [{"message": {"content": "hi"}}]}))

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url)
        opened = await up.send(b"{}", False, {})
        assert json.loads(opened.first)["choices"][0]["message"]["content"] == "hi"
        opened = await up.send(b'{"stream":true}', True, {})
        rest = [part async for part in opened.rest()]
        await opened.response.aclose()
        assert opened.first + b"".join(rest) == event(1) + event(2) and opened.error is None
        await http.aclose()


def authorizations(head: bytes) -> list[bytes]:
    return [x.split(b":", 1)[1].strip() for x in head.split(b"\r\n") if x.lower().startswith(b"authorization:")]


async def test_upstream_credentials_in_its_url_go_as_basic_auth_unless_it_has_a_key():
    async def answer(reader, writer, body):
        writer.write(json_answer({"choices": [{"message": {"content": "hi"}}]}))

    async with raw_server(answer) as raw:
        url = raw.url.replace("http://", "http://op:se%2Fcret@")
        up, http = upstream(url)
        await up.send(b"{}", False, {})
        keyed, http2 = upstream(url, api_key="sk-upstream-key-0123")
        await keyed.send(b"{}", False, {})
        await http.aclose()
        await http2.aclose()
    assert authorizations(raw.heads[0]) == [b"Basic " + base64.b64encode(b"op:se/cret")]
    assert authorizations(raw.heads[1]) == [b"Bearer sk-upstream-key-0123"]
    assert all(b"se%2Fcret" not in h and b"op:" not in h.split(b"\r\n")[0] for h in raw.heads)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_upstream_answering_compressed_is_decoded(stream):
    """The upstream is asked for uncompressed answers (the gateway meters and relays the bytes),
    and one that compresses anyway is decoded: httpx asks for gzip by default, and the gateway
    took an upstream's gzip bytes for its answer (unmeterable, relayed as garbage)."""
    doc = {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}

    async def answer(reader, writer, body):
        if stream:
            z = zlib.compressobj(wbits=31)  # gzip, flushed per event as a streaming server does
            head = SSE_HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n")
            writer.write(head + chunk(z.compress(event(1)) + z.flush(zlib.Z_SYNC_FLUSH)))
            await writer.drain()
            writer.write(chunk(z.compress(event(2)) + z.flush()) + b"0\r\n\r\n")
        else:
            data = gzip.compress(json.dumps(doc).encode())
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(data), data)
            )

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url)
        opened = await up.send(b'{"stream":true}' if stream else b"{}", stream, {})
        if stream:
            rest = [part async for part in opened.rest()]
            await opened.response.aclose()
            assert opened.first + b"".join(rest) == event(1) + event(2) and opened.error is None
        else:
            assert json.loads(opened.first) == doc
        assert b"\r\naccept-encoding: identity\r\n" in raw.heads[0].lower()
        await http.aclose()


async def test_upstream_unreachable_is_down():
    up, http = upstream(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamDown) as err:
        await up.send(b"{}", False, {})
    assert err.value.code == "upstream_unavailable" and "ConnectError" in err.value.message
    await http.aclose()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_hanging_is_a_timeout(stream):
    async def answer(reader, writer, body):
        await asyncio.sleep(2)

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url, read_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(UpstreamDown) as err:
            await up.send(b"{}", stream, {})
        assert err.value.code == "upstream_timeout" and time.monotonic() - started < 1.5
        await http.aclose()


@pytest.mark.parametrize("lists_models", [False, True], ids=["hangs on everything", "answers its model list"])
async def test_a_sole_upstream_that_hangs_is_taken_for_down_only_if_a_probe_fails_too(lists_models):
    """A timeout may be the request's doing (a long prompt) and cools nothing by itself; an upstream
    that timed out a call no other served is probed, and taken for down (quotes then get a 503 until
    it answers again) only if it does not answer the probe either."""
    from tollway.upstream.router import Router

    async def answer(reader, writer, body):
        if raw.heads[-1].startswith(b"GET") and lists_models:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]")
            return
        await asyncio.sleep(3)

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url, read_timeout=0.2, connect_timeout=0.3)
        r = Router([up], sticky_idle=60, cooldown=5)
        with pytest.raises(UpstreamDown):
            await r.send(["m"], lambda: "k", lambda u, m: b"{}", False, {})
        for _ in range(30):
            await asyncio.sleep(0.05)
            if not r._checking:
                break
        assert (r.down_for("m") > 0) is not lists_models, r.health()
        await http.aclose()


async def test_an_upstream_whose_connections_are_all_busy_is_not_down():
    """A full pool is the gateway's own bound (a payer's slow streams can fill it): the call is told
    to retry, and the upstream — which never had the request — is neither probed nor taken for down
    (it was a ``ConnectTimeout``, taken for an upstream no connection could be made to)."""
    from tollway.upstream.router import Router

    release = asyncio.Event()
    answer = held_stream(release)

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url, read_timeout=0.3, max_connections=1)
        r = Router([up], sticky_idle=60, cooldown=5)
        held = await r.send(["m"], lambda: "k", lambda u, m: b"{}", True, {})
        with pytest.raises(UpstreamUnavailable) as busy:
            await r.send(["m"], lambda: "k", lambda u, m: b"{}", True, {})
        assert not isinstance(busy.value, UpstreamDown) and busy.value.code == "upstream_unavailable"
        assert r.down_for("m") == 0 and not r._checking and r.health()[0]["healthy"]
        release.set()
        await held.response.aclose()
        await http.aclose()


async def test_upstream_disconnecting_before_answering_is_down():
    async def answer(reader, writer, body):
        writer.close()

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url)
        with pytest.raises(UpstreamDown) as err:
            await up.send(b"{}", False, {})
        assert err.value.code == "upstream_unavailable" and "RemoteProtocolError" in err.value.message
        await http.aclose()


async def test_upstream_stalling_before_the_first_event_is_unavailable():
    async def answer(reader, writer, body):
        writer.write(SSE_HEAD + chunk(b": keep-alive\n\n"))
        await writer.drain()
        await asyncio.sleep(2)

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url, read_timeout=0.2)
        with pytest.raises(UpstreamUnavailable) as err:
            await up.send(b"{}", True, {})
        assert err.value.code == "upstream_timeout" and not isinstance(err.value, UpstreamDown)
        await http.aclose()


async def test_upstream_stream_breaking_midway_ends_with_a_note():
    async def answer(reader, writer, body):
        writer.write(SSE_HEAD + chunk(event(1)))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(event(2)))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url)
        opened = await up.send(b'{"stream":true}', True, {})
        rest = [part async for part in opened.rest()]
        await opened.response.aclose()
        assert opened.first == event(1) and b"".join(rest) == event(2)
        assert opened.error == "upstream stream broke: RemoteProtocolError"
        await http.aclose()


async def test_upstream_body_over_the_cap_is_refused(monkeypatch):
    monkeypatch.setattr(upstream_client, "MAX_BODY", 64 * 1024)

    async def answer(reader, writer, body):
        big = b"x" * (256 * 1024)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(big))
        for i in range(0, len(big), 16 * 1024):
            writer.write(big[i : i + 16 * 1024])
            await writer.drain()

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url)
        with pytest.raises(UpstreamError, match="too large"):
            await up.send(b"{}", False, {})
        await asyncio.wait_for(raw.client_closed.wait(), 2)  # and the connection was dropped, not pooled
        await http.aclose()


async def test_a_compressed_answer_is_decoded_in_bounded_steps(monkeypatch):
    """A gzip bomb from an upstream (256 MiB of zeros in ~256 KiB) is refused at the body cap, never
    inflated whole: decoding goes 64 KiB at a time, so memory stays near the cap."""
    import tracemalloc

    monkeypatch.setattr(upstream_client, "MAX_BODY", 1024 * 1024)
    bomb = gzip.compress(bytes(256 * 1024 * 1024), compresslevel=9)

    async def answer(reader, writer, body):
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(bomb), bomb)
        )

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url)
        tracemalloc.start()
        try:
            with pytest.raises(UpstreamError, match="too large"):
                await up.send(b"{}", False, {})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * 1024 * 1024, peak
        await http.aclose()


async def test_an_unknown_content_encoding_is_a_failure_before_answering():
    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: zz-unknown\r\ncontent-length: 2\r\n\r\n{}")

    async with raw_server(answer) as raw:
        up, http = upstream(raw.url)
        with pytest.raises(UpstreamError, match="before answering"):
            await up.send(b"{}", False, {})
        await http.aclose()


async def test_the_gateway_client_keeps_no_cookie_an_upstream_sets():
    """A cookie set in one payer's call must not go out with another's."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: session=payer-1; Path=/\r\n"
            b"content-length: 2\r\n\r\n{}"
        )

    async with raw_server(answer) as raw:
        http = make_http_client(UpstreamSettings(url=raw.url + "/v1"))
        async with http:
            for _ in range(2):
                assert (await http.post(raw.url + "/v1/chat/completions", content=b"{}")).status_code == 200
            assert len(http.cookies) == 0
    assert [b"cookie:" in head.lower() for head in raw.heads] == [False, False]


async def test_the_probe_of_an_upstream_and_its_usage_lookup_read_no_endless_body():
    """An upstream taken for down is asked ``GET /models`` every few seconds, and an OpenRouter-like
    one ``/generation`` after a stream: a hostile one answering an endless body must not fill memory."""
    from tollway.config import UpstreamSettings
    from tollway.upstream.client import Upstream, make_http_client

    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(32 * 16):  # (32 MB, were it all read)
            writer.write(chunk(b"x" * 65536))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async with raw_server(answer) as raw:
        settings = UpstreamSettings(name="hostile", url=raw.url + "/v1", usage_lookup="openrouter")
        http = make_http_client(settings)
        upstream = Upstream(settings, http)
        tracemalloc.start()
        try:
            assert await asyncio.wait_for(upstream.probe(), 30)  # (it answers: it is up)
            assert await asyncio.wait_for(upstream.usage_after("gen-1", attempts=1, first_wait=0), 30) is None
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            await http.aclose()
    assert peak < 4 * 1024 * 1024, peak


async def test_a_402_answered_by_its_paid_retry_is_dropped_without_reading_an_endless_body():
    """tollway's paying client reads a 402 before its paid retry (so that its connection may be
    reused): a hostile upstream's may never end."""
    from tollway.client.transport import _drop

    async def answer(reader, writer, body):
        writer.write(b"HTTP/1.1 402 Payment Required\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(32 * 16):  # (32 MB, were it all read)
            writer.write(chunk(b"x" * 65536))
            await writer.drain()

    async with raw_server(answer) as raw, client() as http:
        tracemalloc.start()
        try:
            response = await http.send(http.build_request("POST", raw.url, content=b"{}"), stream=True)
            await asyncio.wait_for(_drop(response), 30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert response.is_closed and peak < 4 * 1024 * 1024, peak
