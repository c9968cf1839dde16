#!/usr/bin/env python3
"""The floor for ``scripts/bench``: what any Python proxy of the gateway's make adds, doing nothing
but forward.

uvicorn as ``tollway serve`` runs it (one worker, uvloop, httptools, no access log) in front of a
raw ASGI app that sends each ``POST`` to the upstream through tollway's own HTTP transport
(``tollway.upstream.h1``, as a paid call's request goes) and relays the answer as it arrives —
no parsing, pricing, payment or ledger. The bench measures it as the unpaid side ``floor``: the
gateway's added latency less the floor's is what a paid call's own work costs, and 1 ms less the
floor's is what the budget leaves for that work.

    python scripts/bench_floor.py --port 8404 --upstream http://127.0.0.1:8403
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx
import uvicorn

from tollway.upstream.h1 import H1Transport

HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}


def make_app(upstream: str) -> Any:
    transport = H1Transport(httpx.Limits(max_connections=256, max_keepalive_connections=256))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":  # (readiness)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP and k != b"host"]
        request = httpx.Request("POST", upstream + scope["path"], headers=headers, content=body)
        response = await transport.handle_async_request(request)
        try:
            relayed = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": relayed})
            async for chunk in response.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the upstream's base URL (no trailing slash)")
    args = p.parse_args()
    app = make_app(args.upstream.rstrip("/"))
    # as ``tollway serve`` configures it (tollway.cli.server_config, with no trusted proxy)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, proxy_headers=False)


if __name__ == "__main__":
    main()
