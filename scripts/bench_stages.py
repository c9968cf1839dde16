"""The gateway, timed stage by stage: ``scripts/bench --stages`` starts it with this instead of
``tollway`` (from the same runtime-only venv).

    python scripts/bench_stages.py OUT.json serve --port ... (tollway's own arguments)

Each stage of the paid pipeline (the functions in ``STAGES``) is wrapped to add up, per call, its
wall time and this thread's CPU time (``time.thread_time``: for an ``async`` stage that includes
whatever else the event loop ran while it waited, which at concurrency 1 is little). SIGUSR1 sets
the sums to zero; SIGUSR2 writes them to OUT.json as ``{stage: {calls, wall_us, cpu_us}}`` (µs per
call). Sampling profilers pause the process and attribute the pause to whatever they interrupt;
this measures wall time where latency is spent. Each wrapper costs ~1-2 µs a call, so every other
figure of an instrumented run is that much slower. The cyclic garbage collector's runs are added up
too, by generation, spread over the requests (a run lands on whichever call allocates past a threshold).
So is each request's time from its arrival (its ASGI task's start) to the server's writing its
answer's head and its first body byte: for a stream, its first byte as the gateway sees it (its CPU
figure, like an ``async`` stage's, counts whatever else ran meanwhile: at concurrency 1, little).
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import signal
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# (module, attribute path, label): the pipeline's stages, outermost first
STAGES = [
    ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle.run_asgi", "server: the request's ASGI task"),
    ("tollway.app", "ChatFastPath.__call__", "app: the chat fast path"),
    ("tollway.pipeline", "paid_api", "pipeline.paid_api"),
    ("tollway.pipeline", "read_body", "  read_body"),
    ("tollway.pipeline", "parse_chat", "  parse_chat (price)"),
    ("tollway.pipeline", "paid_call", "  paid_call"),
    ("tollway.signin", "identify", "    signin.identify"),
    ("tollway.pipeline", "verify", "    verify (a payment's proof)"),
    ("tollway.pipeline", "from_credit", "    from_credit"),
    ("tollway.pipeline", "lock", "    lock"),
    ("tollway.ledger.store", "Store.lock", "      Store.lock (1st transaction)"),
    ("tollway.pipeline", "confirm", "    confirm (chain)"),
    ("tollway.payments.chain", "Chain.simulate", "      Chain.simulate (asked → answered, with its group)"),
    ("tollway.pipeline", "forward", "    forward"),
    ("tollway.upstream.client", "Upstream.send", "      Upstream.send"),
    ("tollway.upstream.h1", "H1Transport.handle_async_request", "        H1Transport (to the answer's head)"),
    ("tollway.pipeline", "respond", "    respond (non-streamed)"),
    ("tollway.ledger.store", "Store.finish_call", "      Store.finish_call (2nd transaction)"),
    ("tollway.pipeline", "relay_stream", "    relay_stream (until the stream starts)"),
    ("tollway.ledger.store", "Store.insert_call", "      Store.insert_call (a stream's row)"),
    ("tollway.settlement", "Settler.run_once", "settlement worker pass"),
    ("tollway.payments.chain", "Chain._post", "chain JSON-RPC exchanges (request path and worker)"),
]

totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
walls: dict[str, list[float]] = defaultdict(list)  # each stage's wall times, for its median (means hide a skew)
WALLS_KEPT = 200_000  # per stage


def add_up(label: str, wall: float, cpu: float) -> None:
    t = totals[label]
    t[0] += 1
    t[1] += wall
    t[2] += cpu
    if len(kept := walls[label]) < WALLS_KEPT:
        kept.append(wall)


def timed(f: Any, label: str) -> Any:
    def add(wall0: float, cpu0: float) -> None:
        add_up(label, time.perf_counter() - wall0, time.thread_time() - cpu0)

    if inspect.iscoroutinefunction(f):

        @functools.wraps(f)
        async def wrapper(*a: Any, **k: Any) -> Any:
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                return await f(*a, **k)
            finally:
                add(wall0, cpu0)
    else:

        @functools.wraps(f)
        def wrapper(*a: Any, **k: Any) -> Any:
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                return f(*a, **k)
            finally:
                add(wall0, cpu0)

    return wrapper


HEAD = "server: the request's arrival → its answer's head sent"
FIRST_BYTE = "server: the request's arrival → its first body byte sent"
GC = [f"gc, generation {g} (µs per request; calls: runs)" for g in range(3)]
REQUESTS = STAGES[0][2]  # what the collector's time is spread over


def time_collections() -> None:
    """Add up the cyclic garbage collector's runs, by generation (they land on whichever call
    allocates past a threshold)."""
    began = [0.0, 0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[:] = time.perf_counter(), time.thread_time()
        else:
            t = totals[GC[info["generation"]]]
            t[0] += 1
            t[1] += time.perf_counter() - began[0]
            t[2] += time.thread_time() - began[1]

    gc.callbacks.append(callback)


def time_first_bytes() -> None:
    """Time each request from its ASGI task's start to the server's writing its answer's head, and
    its first body byte: a stream's time to first byte, as far as the gateway sees it."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as Cycle

    run, send = Cycle.run_asgi, Cycle.send

    async def run_asgi(self: Any, app: Any) -> None:
        self.bench_began, self.bench_seen = (time.perf_counter(), time.thread_time()), set()
        await run(self, app)

    async def sends(self: Any, message: Any) -> None:
        await send(self, message)  # (written to the socket, or buffered by the transport: sent)
        kind = message["type"]
        label = HEAD if kind == "http.response.start" else FIRST_BYTE if message.get("body") else None
        if label is not None and label not in self.bench_seen:
            self.bench_seen.add(label)
            add_up(label, time.perf_counter() - self.bench_began[0], time.thread_time() - self.bench_began[1])

    Cycle.run_asgi, Cycle.send = run_asgi, sends


def instrument() -> None:
    import importlib

    for module, path, label in STAGES:
        owner: Any = importlib.import_module(module)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        setattr(owner, name, timed(getattr(owner, name), label))


def write(out: Path) -> None:
    doc = {}
    for label in (*(label for _, _, label in STAGES[:1]), HEAD, FIRST_BYTE, *(label for _, _, label in STAGES[1:])):
        n, wall, cpu = totals.get(label, (0, 0.0, 0.0))
        if n:
            median = 1e6 * statistics.median(walls[label])
            doc[label] = {"calls": int(n), "wall_us": 1e6 * wall / n, "wall_p50_us": median, "cpu_us": 1e6 * cpu / n}
    requests = totals.get(REQUESTS, (0,))[0]
    for label in GC:
        runs, wall, cpu = totals.get(label, (0, 0.0, 0.0))
        if runs and requests:
            doc[label] = {"calls": int(runs), "wall_us": 1e6 * wall / requests, "cpu_us": 1e6 * cpu / requests}
    out.write_text(json.dumps(doc))


def main() -> int:
    out = Path(sys.argv[1])
    time_first_bytes()
    instrument()
    time_collections()
    signal.signal(signal.SIGUSR1, lambda *_: (totals.clear(), walls.clear()))
    signal.signal(signal.SIGUSR2, lambda *_: write(out))
    from tollway.cli import main as tollway

    return tollway(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
