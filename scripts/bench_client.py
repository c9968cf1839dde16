"""What one non-streamed upstream call costs the gateway's upstream client, in CPU, by layer:
tollway's ``Upstream.send`` (httpx over the aiohttp transport), aiohttp's ``ClientSession`` alone,
and raw asyncio streams with httptools' C parser — against ``scripts/bench_upstream.py``, all in
one process on uvloop, measured in turns (three rounds of 2,000 calls each).

    taskset -c 1 .venv/bin/python scripts/bench_client.py

Issue 9's question: how much of a paid call's CPU a leaner upstream client would save.
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
import uvloop
from bench import free_port  # (scripts/bench.py)

from tollway.config import UpstreamSettings
from tollway.upstream.client import Upstream, make_http_client

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
        http = make_http_client([settings])
        ours = Upstream(settings, http)
        session = aiohttp.ClientSession()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        request = f"{raw}Content-Length: {len(body)}\r\n\r\n".encode() + body

        async def tollway() -> None:
            assert (await ours.send(body, False, {})).first

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
            "tollway Upstream.send (httpx over aiohttp)": tollway,
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
