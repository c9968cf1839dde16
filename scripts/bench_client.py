"""What one non-streamed upstream call costs the gateway's upstream client, in CPU, by layer:
tollway's ``Upstream.send`` (httpx's request and response types, handed straight to the transport),
that transport (``tollway.upstream.h1``: asyncio + httptools) alone under one prebuilt httpx
request, aiohttp's ``ClientSession`` alone (the transport it replaced was built on it), and raw
asyncio streams with httptools' C parser (the floor) — against ``scripts/bench_upstream.py``, all
in one process on uvloop, measured in turns (three rounds of 2,000 calls each).

    taskset -c 1 .venv/bin/python scripts/bench_client.py

Issue 9's question: how much of a paid call's CPU the upstream client takes, layer by layer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httptools
import httpx
import uvloop
from bench import free_port  # (scripts/bench.py)

from tollway.config import UpstreamSettings
from tollway.upstream.client import CookielessClient, Upstream, pool_limits
from tollway.upstream.h1 import h1_transport

PATH = "/v1/chat/completions"
BODY = json.dumps({"model": "mock/echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8})


class _Parsed:
    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


async def main() -> None:
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("bench_upstream.py")), "--port", str(port)]
    )
    await asyncio.sleep(1.0)
    body = BODY.encode()
    try:
        settings = UpstreamSettings(name="bench", url=f"http://127.0.0.1:{port}/v1")
        transport = h1_transport(pool_limits(settings.max_connections))
        http = CookielessClient(transport=transport)  # (what make_http_client makes)
        ours = Upstream(settings, http)
        prebuilt = http.build_request("POST", f"http://127.0.0.1:{port}{PATH}", content=body)
        session = aiohttp.ClientSession()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        request = f"{raw}Content-Length: {len(body)}\r\n\r\n".encode() + body

        async def tollway() -> None:
            assert (await ours.send(body, False, {})).first

        async def h1_alone() -> None:
            response = await transport.handle_async_request(prebuilt)
            assert isinstance(response.stream, httpx.AsyncByteStream)
            assert b"".join([part async for part in response.stream])
            await response.stream.aclose()

        async def aiohttp_alone() -> None:
            async with session.post(f"http://127.0.0.1:{port}{PATH}", data=body) as r:
                await r.read()

        async def httptools_raw() -> None:
            writer.write(request)
            parsed = _Parsed()
            parser = httptools.HttpResponseParser(parsed)
            while not parsed.done:
                parser.feed_data(await reader.read(65536))

        sides: dict[str, Callable[[], Awaitable[None]]] = {
            "tollway Upstream.send (httpx's types over h1)": tollway,
            "H1Transport alone": h1_alone,
            "aiohttp ClientSession alone": aiohttp_alone,
            "asyncio streams + httptools": httptools_raw,
        }
        for call in sides.values():  # (warm up: connections, caches)
            for _ in range(200):
                await call()
        for round_ in range(1, 4):
            figures = []
            for name, call in sides.items():
                started = time.process_time()
                for _ in range(2000):
                    await call()
                figures.append(f"{name} {(time.process_time() - started) / 2000 * 1e6:.0f} µs")
            print(f"round {round_}: " + "; ".join(figures))
        await session.close()
        await http.aclose()
        writer.close()
    finally:
        upstream.terminate()


if __name__ == "__main__":
    uvloop.run(main())
