"""A request's own cost before it is sent, by body size: what the gateway does with every chat body
— parse and price it (``parse_chat``: strict JSON, the digest its quote binds to, the prompt's
byte bound), hash its prompt's prefixes (cache routing), the conversation key (stickiness) and the
body the upstream gets — for agent-sized bodies of ~1, 10, 40 and 160 KB (a system prompt and a
conversation of 2 KB turns), next to ``json.loads`` of the same bytes (the floor: reading them at
all), measured in turns; and the same work for the request's paid retry, whose parse is the one its
402 made, kept (``priced.py``: the same bytes arrive again, as a new object).

    taskset -c 1 .venv/bin/python scripts/bench_parse.py

The load bench (``scripts/bench``) sends a ~200-byte body, where this is a few tens of µs; an
agent's call carries its whole conversation, and this grows with it.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial

from tollway.chat import parse_chat
from tollway.config import ModelPrice, Settings
from tollway.priced import PricedRequests, Pricing
from tollway.pricing import Prices
from tollway.upstream.router import conversation_key

MODEL = "mock/echo"
SETTINGS = Settings(models={MODEL: ModelPrice(prompt="0.000001", completion="0.000002")})
PRICES = {m: Prices.of(p, 6) for m, p in SETTINGS.models.items()}
ORIGIN = "http://127.0.0.1:8402"
TURN = "The quick brown fox jumps over the lazy dog, and the agent writes it down — naïvely. " * 23


def body(turns: int) -> bytes:
    messages = [{"role": "system", "content": "You are a careful agent with tools. " * 30}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": TURN} for i in range(turns)]
    return json.dumps({"model": MODEL, "messages": messages, "temperature": 0.2, "user": "agent-1"}).encode()


def request(raw: bytes, kept: PricedRequests | None = None) -> None:
    if kept is None:
        call = parse_chat(raw, SETTINGS, PRICES, origin=ORIGIN)
    else:  # (a copy of the bytes: a body read from the network is a new object, its hash not known yet)
        call = kept.parse(Pricing(parse_chat, bytes(bytearray(raw)), SETTINGS, PRICES, ORIGIN, False))
    call.prefixes()
    conversation_key("0xpayer", call.model, call.body, call.prompt, {})
    call.forward("max_tokens", call.cap(metered=True))


def per_call_us(f, raw: bytes, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        f(raw)
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    for turns in (0, 5, 20, 80):
        raw = body(turns)
        n = max(50, 20000 // (turns + 1))
        request(raw)  # (warm up)
        kept, asked = PricedRequests(), Pricing(parse_chat, raw, SETTINGS, PRICES, ORIGIN, False)
        kept.keep(asked, kept.parse(asked))  # (its 402's parse, kept)
        ours, retries, floor = [], [], []
        for _ in range(5):
            ours.append(per_call_us(request, raw, n))
            retries.append(per_call_us(partial(request, kept=kept), raw, n))
            floor.append(per_call_us(json.loads, raw, n))
        o, r, f = (statistics.median(x) for x in (ours, retries, floor))
        print(
            f"{len(raw) / 1024:6.1f} KB: the request {o:8.1f} µs, its paid retry {r:7.1f} µs, "
            f"json.loads {f:7.1f} µs ({o / f:4.1f}× the floor)"
        )


if __name__ == "__main__":
    main()
