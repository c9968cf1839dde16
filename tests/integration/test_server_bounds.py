"""The gateway's server (``tollway serve``'s uvicorn configuration, ``tollway.serving``) bounds a
request's head and a client that stops sending: one hostile client does not hold the event loop,
nor a connection and its task for ever."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import gateway_settings
from support import CHAT, ServerThread, chat_body
from tollway import serving
from tollway.app import create_app
from tollway.cli import server_config


@pytest.fixture()
def served(devnet, upstream, tmp_path, monkeypatch) -> Iterator[ServerThread]:
    monkeypatch.setattr(serving, "IDLE_SECONDS", 0.5)
    settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path / "ledger.sqlite3")
    config = server_config(create_app(settings), settings, "warning")
    with ServerThread(config.app, http=config.http) as server:
        yield server


def connect(server: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_a_request_head_past_its_bound_is_refused_at_once_and_the_others_are_served(served):
    slowest = []

    def others() -> None:
        with httpx.Client(base_url=served.url, timeout=10) as http:
            for _ in range(20):
                t = time.monotonic()
                assert http.get("/healthz").status_code == 200
                slowest.append(time.monotonic() - t)

    with connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: ")
        watcher = threading.Thread(target=others)
        watcher.start()
        sent = 0
        try:
            while sent < 64 * 2**20:  # (64 MiB: an unbounded head held the loop for seconds)
                sock.sendall(b"a" * 2**16)
                sent += 2**16
        except (BrokenPipeError, ConnectionResetError):
            pass
        watcher.join()
        got = answer(sock) if sent < 64 * 2**20 else b""
    assert sent < 16 * 2**20, sent  # refused long before the end (what is sent is in socket buffers)
    assert got.startswith(b"HTTP/1.1 431 ") or got == b"", got[:200]
    assert max(slowest) < 1.0


def test_a_large_body_sent_in_one_piece_is_no_large_head(served):
    body = chat_body("x" * 300_000, max_tokens=4)
    with httpx.Client(base_url=served.url, timeout=10) as http:
        assert http.post(CHAT, json=body).status_code == 402  # (unpaid: a quote, not a 431)


@pytest.mark.parametrize(
    "unfinished",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 100\r\n\r\n{"model":',
        b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{"mod\r\n',
        b"POST /v1/credit/withdrawals HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{",
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ",  # (a head that stops)
        b"",  # (a connection that sends nothing)
    ],
)
def test_a_client_that_stops_sending_mid_request_is_answered_408_and_let_go(served, unfinished):
    with connect(served) as sock:
        sock.sendall(unfinished)
        t = time.monotonic()
        got = answer(sock)
    assert time.monotonic() - t < 5
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]


def test_a_client_that_stops_sending_a_body_already_answered_is_let_go_without_a_second_answer(served):
    with connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{")  # (never read)
        got = answer(sock)
    assert got.startswith(b"HTTP/1.1 200 ") and b" 408 " not in got, got


def test_a_slow_client_that_keeps_sending_is_not_cut(served):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    body = b'{"model": "mock/echo", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 4}'
    with connect(served) as sock:
        sock.sendall(head + b"content-length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), len(body) // 4 + 1):  # (over 1 s in all, each piece within 0.5 s)
            time.sleep(0.3)
            sock.sendall(body[i : i + len(body) // 4 + 1])
        sock.shutdown(socket.SHUT_WR)
        got = answer(sock)
    assert got.startswith(b"HTTP/1.1 402 "), got[:200]
