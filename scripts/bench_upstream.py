#!/usr/bin/env python3
"""A fast OpenAI-compatible upstream for ``scripts/bench``: raw asyncio, no web framework.

``tollway mock-upstream`` (Starlette on uvicorn) spends its CPU on the framework and saturates one
core near 150 calls/s, which capped the throughput the bench could measure. This server answers
the same calls with the same bytes for the bench's model, from an ``asyncio.Protocol``, without a
framework:

* ``GET /v1/models`` — the model list (what ``tollway doctor`` probes; the gateway's hot path never
  asks for it);
* ``POST /v1/chat/completions`` — ``tollway.mock_upstream``'s answer (``"echo: "`` + the last user
  message, whitespace-collapsed, truncated to ``max_completion_tokens`` / ``max_tokens``, default
  16), with its token rule, its prefix-cache simulation (blocks of 4 tokens, chained hashes, LRU of
  65,536 blocks, 300 s TTL) and its ``openai`` usage dialect (``prompt_tokens``,
  ``completion_tokens``, ``total_tokens``, ``prompt_tokens_details.cached_tokens``). A stream is
  SSE in ``Transfer-Encoding: chunked``, one HTTP chunk per event, written at once: the
  ``: MOCK PROCESSING`` comment, a chunk per token piece (the first with the role), the finish
  chunk, the usage chunk when ``stream_options.include_usage`` is set, and ``data: [DONE]``.

HTTP/1.1 with keep-alive (HTTP/1.0 and ``Connection: close`` are honoured), pipelined requests in
order, ``Content-Length`` request bodies (a chunked request body gets a 411). The ``mock`` test
directives of ``tollway mock-upstream`` are not implemented: a request that carries one gets a 400.

    python scripts/bench_upstream.py --port 8403              # serve
    python scripts/bench_upstream.py --selftest [--seconds 5]  # its own calls/s, pinned to one core
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Any

# The mock's own token rule and prompt sequence (what it counts and caches), so the answers cannot drift.
from tollway.mock_upstream import _TOKEN_RE as TOKEN_RE
from tollway.mock_upstream import _content_texts as texts
from tollway.mock_upstream import _prompt_sequence as prompt_sequence

MODELS = ("mock/echo", "mock/echo-large")  # tollway.mock_upstream's defaults
DEFAULT_MAX_TOKENS = 16
CACHE_BLOCK, CACHE_TTL, CACHE_ENTRIES = 4, 300.0, 65536
MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required"}
REASONS |= {413: "Payload Too Large", 431: "Request Header Fields Too Large"}
ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 411: "length_required"}
ERROR_CODES |= {413: "payload_too_large", 431: "headers_too_large"}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code or ERROR_CODES.get(status, str(status))


class PrefixCache:
    """``tollway.mock_upstream._PrefixCache``: block ``i`` keyed by ``hash((key of block i-1, *its tokens))``."""

    def __init__(self) -> None:
        self.blocks: OrderedDict[int, float] = OrderedDict()

    def lookup_and_store(self, seed: str, tokens: list[str]) -> int:
        blocks, now = self.blocks, time.monotonic()
        expiry, key, cached, matching = now + CACHE_TTL, hash(seed), 0, True
        for start in range(0, len(tokens) - CACHE_BLOCK + 1, CACHE_BLOCK):
            key = hash((key, *tokens[start : start + CACHE_BLOCK]))
            if matching:
                exp = blocks.get(key)
                if exp is not None and exp > now:
                    cached += CACHE_BLOCK
                else:
                    matching = False
            blocks[key] = expiry
            blocks.move_to_end(key)
        while len(blocks) > CACHE_ENTRIES:
            blocks.popitem(last=False)
        return cached


class Upstream:
    """The answers, independent of the transport."""

    def __init__(self) -> None:
        self.cache = PrefixCache()
        self.ids = itertools.count(1)
        self.models_body = dumps(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "tollway-mock"} for m in MODELS],
            }
        )
        self.calls = 0

    def chat(self, raw: bytes) -> tuple[bytes, list[bytes] | None]:
        """(JSON body, None) or (b"", SSE events) for a chat completion; raises BadRequest."""
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest(400, "request body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "request body must be a JSON object")
        if "mock" in body:
            raise BadRequest(400, "scripts/bench_upstream.py implements no `mock` directives", "invalid_mock_directive")
        messages, model = body.get("messages"), body.get("model")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest(400, "`messages` must be a non-empty array of objects", "invalid_messages")
        if not isinstance(model, str):
            raise BadRequest(400, "you must provide a `model` string", "missing_model")
        if model not in MODELS:
            raise BadRequest(404, f"The model `{model}` does not exist", "model_not_found")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is None:
            limit = DEFAULT_MAX_TOKENS
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise BadRequest(400, "max_tokens must be a non-negative integer", "invalid_max_tokens")

        seq = prompt_sequence(messages)
        prompt = len(seq)
        cached = self.cache.lookup_and_store(model, seq)
        last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        words = " ".join(" ".join(texts(last.get("content") if last else None)).split())
        pieces = TOKEN_RE.findall(f"echo: {words}" if words else "echo:")
        finish = "stop"
        if len(pieces) > limit:
            pieces, finish = pieces[:limit], "length"
        completion = len(pieces)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        cid, created = f"chatcmpl-mock-{next(self.ids)}", int(time.time())
        self.calls += 1

        if not body.get("stream"):
            out = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
            return dumps(out), None

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        # The bytes tollway.mock_upstream's json.dumps of each event gives, templated (it is the cost).
        head = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,' % (
            cid.encode(),
            created,
            dumps(model),
        )
        events = [b": MOCK PROCESSING\n\n"]
        delta = b'"choices":[{"index":0,"delta":{"role":"assistant","content":'
        for piece in pieces or [""]:
            events.append(head + delta + dumps(piece) + b'},"logprobs":null,"finish_reason":null}]}\n\n')
            delta = b'"choices":[{"index":0,"delta":{"content":'
        events.append(
            head + b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}]}\n\n' % finish.encode()
        )
        if include_usage:
            events.append(head + b'"choices":[],"usage":' + dumps(usage) + b"}\n\n")
        events.append(b"data: [DONE]\n\n")
        return b"", events


class HttpProtocol(asyncio.Protocol):
    """One connection: parse requests as they arrive and answer each synchronously, in order."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.fail(431, "request head too large")
                return
            try:
                method, path, version, headers = self.parse_head(self.buf[:end])
            except BadRequest as exc:
                self.fail(exc.status, exc.message)
                return
            if "transfer-encoding" in headers:
                self.fail(411, "send the request body with a Content-Length")
                return
            length = headers.get("content-length", "0")
            if not (length.isascii() and length.isdigit()) or int(length) > MAX_BODY:
                self.fail(413 if length.isdigit() else 400, "bad Content-Length")
                return
            start, stop = end + 4, end + 4 + int(length)
            if len(self.buf) < stop:
                return  # the rest of the body is still on its way
            body, self.buf = self.buf[start:stop], self.buf[stop:]
            conn = headers.get("connection", "").lower()
            keep = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
            self.answer(method, path, body, keep)
            if not keep:
                self.close()

    @staticmethod
    def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        return parts[0], parts[1], parts[2], headers

    def answer(self, method: str, path: str, body: bytes, keep: bool) -> None:
        path = path.split("?", 1)[0]
        try:
            if path == "/v1/chat/completions":
                if method != "POST":
                    raise BadRequest(405, "use POST")
                raw, events = self.upstream.chat(body)
                if events is None:
                    self.send(200, raw, keep)
                else:
                    self.send_events(events, keep)
            elif path in ("/v1/models", "/models"):
                if method != "GET":
                    raise BadRequest(405, "use GET")
                self.send(200, self.upstream.models_body, keep)
            elif path == "/healthz":
                self.send(200, b'{"ok":true}', keep)
            else:
                raise BadRequest(404, f"no route {path[:80]}")
        except BadRequest as exc:
            err = {"error": {"message": exc.message, "type": "invalid_request_error", "code": exc.code}}
            self.send(exc.status, dumps(err), keep)

    def send(self, status: int, body: bytes, keep: bool) -> None:
        assert self.transport is not None
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)

    def send_events(self, events: list[bytes], keep: bool) -> None:
        assert self.transport is not None
        out = [
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
            b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n",
            b"connection: keep-alive\r\n\r\n" if keep else b"connection: close\r\n\r\n",
        ]
        for e in events:
            out += (b"%x\r\n" % len(e), e, b"\r\n")
        out.append(b"0\r\n\r\n")
        self.transport.write(b"".join(out))

    def fail(self, status: int, message: str) -> None:
        if self.transport is not None:
            err = {"error": {"message": message, "type": "invalid_request_error", "code": ERROR_CODES.get(status)}}
            self.send(status, dumps(err), False)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.buf = b""


async def serve(host: str, port: int, ready: str | None = None) -> None:
    upstream = Upstream()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(upstream), host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        print(ready, flush=True)
    async with server:
        await stop.wait()


# -- self-test: this server's own calls/s --------------------------------------------------------------


SELFTEST_BODY = dumps(
    {
        "model": "mock/echo",
        "messages": [{"role": "user", "content": "Hello tollway, please echo this short benchmark prompt back to me"}],
        "max_tokens": 16,
    }
)
SELFTEST_STREAM_BODY = dumps({**json.loads(SELFTEST_BODY), "stream": True, "stream_options": {"include_usage": True}})


class LoadProtocol(asyncio.Protocol):
    """A client connection that sends ``depth`` requests at a time (pipelined) and counts answers."""

    def __init__(self, request: bytes, depth: int, counter: list[int], stop_at: float) -> None:
        self.request, self.depth, self.counter, self.stop_at = request, depth, counter, stop_at
        self.buf = b""
        self.outstanding = 0
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.outstanding = self.depth
        self.transport.write(self.request * self.depth)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        answered = 0
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end]
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"selftest: unexpected answer {head[:200]!r}")
            if b"transfer-encoding: chunked" in head:
                stop = self.buf.find(b"\r\n0\r\n\r\n", end)
                if stop < 0:
                    break
                stop += 7
            else:
                i = head.find(b"content-length: ") + 16
                stop = end + 4 + int(head[i : head.find(b"\r\n", i)])
                if len(self.buf) < stop:
                    break
            self.buf = self.buf[stop:]
            answered += 1
        if not answered:
            return
        self.counter[0] += answered
        self.outstanding -= answered
        if time.perf_counter() < self.stop_at:
            self.outstanding += answered
            assert self.transport is not None
            self.transport.write(self.request * answered)
        elif self.outstanding == 0 and not self.done.done():
            assert self.transport is not None
            self.transport.close()


async def load(port: int, body: bytes, seconds: float, connections: int, depth: int) -> tuple[int, float]:
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    counter = [0]
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    conns = [
        await loop.create_connection(lambda: LoadProtocol(request, depth, counter, stop_at), "127.0.0.1", port)
        for _ in range(connections)
    ]
    await asyncio.gather(*(p.done for _, p in conns))
    return counter[0], time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def selftest(seconds: float, connections: int, depth: int) -> int:
    """Start this server pinned to one CPU, load it from another, print calls/s and its CPU per call."""
    cpus = os.cpu_count() or 1
    pin = cpus >= 2 and shutil.which("taskset") is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, __file__, "--port", str(port), "--ready"]
    if pin:
        argv = ["taskset", "-c", "1", *argv]
        os.sched_setaffinity(0, {0})
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready"
        where = "server on CPU 1, load on CPU 0" if pin else "not pinned"
        print(f"bench_upstream self-test ({where}; {connections} connections × {depth} pipelined; {seconds:g} s each)")
        for label, body in (("non-streaming", SELFTEST_BODY), ("streaming (SSE)", SELFTEST_STREAM_BODY)):
            asyncio.run(load(port, body, 0.5, connections, depth))  # warm-up
            cpu0 = cpu_seconds(proc.pid)
            n, wall = asyncio.run(load(port, body, seconds, connections, depth))
            cpu = cpu_seconds(proc.pid) - cpu0
            per = cpu / n * 1e6 if n else float("nan")
            print(
                f"  {label:<16} {n / wall:>9,.0f} calls/s   server CPU {100 * cpu / wall:5.1f}%   "
                f"{per:6.1f} µs CPU/call → {1e6 / per:>8,.0f} calls/s per core"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8403)
    p.add_argument("--ready", action="store_true", help="print 'ready' once listening")
    p.add_argument("--selftest", action="store_true", help="measure this server's calls/s and exit")
    p.add_argument("--seconds", type=float, default=5.0, help="self-test: seconds per measurement (5)")
    p.add_argument("--connections", type=int, default=32, help="self-test: client connections (32)")
    p.add_argument("--depth", type=int, default=4, help="self-test: requests pipelined per connection (4)")
    a = p.parse_args(argv)
    if a.selftest:
        return selftest(a.seconds, a.connections, a.depth)
    asyncio.run(serve(a.host, a.port, "ready" if a.ready else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
