"""The upstream client's asyncio network backend: plain HTTP, TLS, errors, and that httpx really
routes through it (the hook is httpx's private `_pool`: an httpx upgrade that moves it fails here)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess

import httpcore
import httpx
import pytest
import uvicorn

from support import free_port
from tollway.mock_upstream import create_app
from tollway.upstream.network import AsyncioBackend, asyncio_transport

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "over asyncio"}], "max_tokens": 4}


async def serve(**ssl_options):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), port=port, log_level="warning", **ssl_options))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, port


async def test_plain_http_goes_through_the_asyncio_backend():
    server, task, port = await serve()
    transport = asyncio_transport(httpx.Limits(max_connections=4, max_keepalive_connections=4))
    assert isinstance(transport._pool._network_backend, AsyncioBackend)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):  # the connection is kept alive and reused
            r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY)
            assert r.json()["choices"][0]["message"]["content"] == "echo: over asyncio"
        assert len(transport._pool.connections) == 1
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
    async with httpx.AsyncClient(transport=asyncio_transport(httpx.Limits(), verify=trusted)) as client:
        r = await client.post(f"https://localhost:{port}/v1/chat/completions", json=BODY)
        assert r.status_code == 200
    async with httpx.AsyncClient(transport=asyncio_transport(httpx.Limits())) as client:
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
            await client.post(f"https://localhost:{port}/v1/chat/completions", json=BODY)
    server.should_exit = True
    await task


async def test_errors_are_httpcore_errors():
    backend = AsyncioBackend()
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("127.0.0.1", free_port(), timeout=2)
    async with httpx.AsyncClient(transport=asyncio_transport(httpx.Limits())) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")
