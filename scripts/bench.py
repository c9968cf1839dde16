#!/usr/bin/env python3
"""tollway benchmark: direct calls to the mock upstream vs paid calls through the gateway, paid
with x402 ``exact`` and with ``upto``.

One run, everything interleaved so that machine noise hits every side alike (ARCHITECTURE.md §4):

* latency p50/p99, non-streaming, at concurrency 1 and 16 — direct vs exact vs upto, added ms and
  ratio against direct, and what upto adds over exact;
* streaming time to first body byte at concurrency 1 — the same three sides;
* calls per second at concurrency 16 through one gateway worker (direct calls/s of the mock as baseline);
* payment verification CPU (``ExactEvm.verify``, in-process, pre-signed proofs) and client signing cost;
* gateway RSS before/after N streamed paid calls (``--streams``), to show it stays flat.

Setup is the script's own: anvil on a free port, the test token deployed, the mock upstream and
the gateway started as separate processes (``tollway mock-upstream`` / ``tollway serve`` configured
through ``TOLLWAY_*`` variables and a temporary ``tollway.toml``). With two or more CPUs the load
generator, the mock and anvil are pinned to CPU 0 and the gateway to CPU 1.

Payments are signed before each timed block (signing is the client's cost, not the gateway's):
one 402 per distinct request body gives the quotes, and many EIP-3009 authorizations (exact) or
Permit2 witness transfers (upto) — distinct nonces, payers rotated over the devnet accounts,
which have approved Permit2 — are signed for them. "paid" below means exact where one side is
meant (the memory check, the profile).

Before each timed block the settlement backlog of the previous paid block is drained, so anvil
mining settlements does not steal CPU 0 from the next block; the drain rate is reported. anvil
mines a block per second (``--block-time``; 0 for automine, whose cost per block grows with the
chain's length and skews long runs).

Where the gateway's CPU goes: ``--profile PATH`` samples it with py-spy under paid load at the end
of the run and prints the hot spots (by pipeline stage, by library, by function).

Run it with ``scripts/bench`` (the repo's .venv); ``--help`` lists the flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
MODEL = "mock/echo"
PROMPT = "Hello tollway, please echo this short benchmark prompt back to me"
NON_STREAM_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}, separators=(",", ":")
).encode()
# include_usage is set by the client, so the gateway forwards these bytes unchanged and the mock
# does the same work for a direct and a paid stream.
STREAM_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    separators=(",", ":"),
).encode()
JSON_HEADERS = {"content-type": "application/json"}
ADMIN_TOKEN = "bench-admin-token-0123"  # the gateway's health document (payment counts) is the operator's
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BUDGET = {
    "added_p50_c1_ms": 1.0,
    "added_ttfb_ms": 1.0,
    "paid_calls_per_s": 500.0,
    "verify_us": 300.0,
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small helpers ---------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..1); NaN for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all threads)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # fields after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:,.{digits}f}"


def signed(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:+,.{digits}f}"


# -- processes -----------------------------------------------------------------------------------


@dataclass
class Cluster:
    """anvil + mock upstream + gateway, started and owned by this run."""

    pin: bool
    keep: bool
    block_time: float | None = None
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tollway-bench-")))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    devnet: Any = None
    mock_url: str = ""
    gw_url: str = ""

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], cpu: int | None) -> None:
        if cpu is not None and self.pin:
            argv = ["taskset", "-c", str(cpu), *argv]
        path = self.tmp / f"{name}.log"
        self.logs[name] = path
        with path.open("wb") as out:
            self.procs[name] = subprocess.Popen(
                argv, cwd=self.tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def start(self) -> None:
        from tollway.devnet.anvil import start_anvil
        from tollway.devnet.deploy import deploy_devnet

        anvil_port = free_port()
        log(f"starting anvil on :{anvil_port}")
        # Inherits this process's CPU affinity. Interval mining by default: with automine (a block per
        # settlement) anvil's CPU per block grows with the chain's length and skews long runs.
        self.procs["anvil"] = start_anvil(anvil_port, block_time=self.block_time or None)
        if self.pin:  # all of anvil's threads, whatever they inherited
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(self.pid("anvil"))], check=False, capture_output=True)
        self.devnet = deploy_devnet(f"http://127.0.0.1:{anvil_port}")
        log(f"token {self.devnet.token} deployed on chain {self.devnet.chain_id}")

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
        base_env["PYTHONUNBUFFERED"] = "1"
        tollway = str(VENV_BIN / "tollway")

        mock_port = free_port()
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        self._spawn("mock", [tollway, "mock-upstream", "--port", str(mock_port)], base_env, cpu=0)

        (self.tmp / "tollway.toml").write_text(
            f'[models."{MODEL}"]\nprompt = "0.000001"\ncompletion = "0.000002"\n', encoding="utf-8"
        )
        gw_port = free_port()
        self.gw_url = f"http://127.0.0.1:{gw_port}"
        d = self.devnet
        env = {
            **base_env,
            "TOLLWAY_CONFIG": str(self.tmp / "tollway.toml"),
            "TOLLWAY_DATABASE_URL": f"sqlite:///{self.tmp / 'ledger.sqlite3'}",
            "TOLLWAY_DEVNET_FILE": str(self.tmp / "devnet.json"),
            "TOLLWAY_CHAIN__RPC_URL": d.rpc_url,
            "TOLLWAY_CHAIN__TOKEN": d.token,
            "TOLLWAY_CHAIN__PAYEE": d.payee,
            "TOLLWAY_CHAIN__SETTLER_KEY": d.settler_key,
            "TOLLWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "TOLLWAY_UPSTREAM__URL": f"{self.mock_url}/v1",
        }
        # --mock-port is unused (an upstream is configured) but set to a free port all the same, so
        # that a CLI which started its built-in mock anyway could not collide with anything.
        argv = [tollway, "serve", "--port", str(gw_port), "--mock-port", str(free_port()), "--log-level", "warning"]
        self._spawn("gateway", argv, env, cpu=1)

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        checks = [("mock", f"{self.mock_url}/v1/models"), ("gateway", f"{self.gw_url}/healthz")]
        checks.append(("gateway", f"{self.gw_url}/v1/models"))
        for name, url in checks:
            while True:
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.tail(name)}")
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(url, timeout=2)
                    if r.status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready at {url} after {timeout:g} s:\n{self.tail(name)}")
                await asyncio.sleep(0.05)
        models = (await client.get(f"{self.gw_url}/v1/models")).json()
        ids = [m["id"] for m in models.get("data", [])]
        if ids != [MODEL]:
            raise RuntimeError(f"gateway serves models {ids}, expected only {MODEL!r} from the temp tollway.toml")
        health = (await client.get(f"{self.gw_url}/healthz", headers=ADMIN)).json()
        want = f"eip155:{self.devnet.chain_id}"
        if want not in (health.get("networks") or []):
            raise RuntimeError(f"gateway is on networks {health.get('networks')}, expected {want}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        for name in ("gateway", "mock", "anvil", "py-spy"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop; killing it")
                proc.kill()
                proc.wait(timeout=5)
        if self.keep:
            log(f"kept {self.tmp} (logs, ledger)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# -- payments ------------------------------------------------------------------------------------


PAID_SIDES = ("exact", "upto")  # the schemes benchmarked; "paid" (one side) means exact
SIDES = ("direct", *PAID_SIDES)


class Signer:
    """Pre-signs x402 v2 PAYMENT-SIGNATURE headers, one fresh 402 per distinct body and batch."""

    def __init__(self, devnet: Any, payers: int | None = None) -> None:
        from eth_account import Account

        self.accounts = [Account.from_key(k) for k in devnet.payer_keys[:payers]]
        self.allowed = (f"eip155:{devnet.chain_id}", devnet.token.lower())
        self.turn = 0

    async def quote(self, client: httpx.AsyncClient, url: str, body: bytes) -> dict[str, Any]:
        from tollway.payments.x402 import PAYMENT_REQUIRED, unb64json

        r = await client.post(url, content=body, headers=JSON_HEADERS)
        if r.status_code != 402 or PAYMENT_REQUIRED not in r.headers:
            raise RuntimeError(f"expected a 402 with {PAYMENT_REQUIRED}, got {r.status_code}: {r.text[:300]}")
        return unb64json(r.headers[PAYMENT_REQUIRED])  # type: ignore[no-any-return]

    def offer(self, required: dict[str, Any], scheme: str = "exact") -> dict[str, Any]:
        for o in required.get("accepts") or []:
            if o.get("scheme") == scheme and (o.get("network"), str(o.get("asset", "")).lower()) == self.allowed:
                return o  # type: ignore[no-any-return]
        raise RuntimeError(f"no {scheme} offer for {self.allowed} in {required.get('accepts')}")

    def headers(self, required: dict[str, Any], n: int, scheme: str = "exact") -> list[dict[str, str]]:
        """``n`` request headers, each with its own authorization (distinct nonce), as Payer.prepare builds them."""
        from tollway.client.payer import sign_exact, sign_upto
        from tollway.payments.x402 import PAYMENT_SIGNATURE, b64json

        sign = sign_upto if scheme == "upto" else sign_exact
        offer = self.offer(required, scheme)
        now = int(time.time())
        out = []
        for _ in range(n):
            account = self.accounts[self.turn % len(self.accounts)]
            self.turn += 1
            payload = {
                "x402Version": 2,
                "resource": required.get("resource"),
                "accepted": offer,
                "payload": sign(account, offer, now),
                "extensions": {},
            }
            out.append({**JSON_HEADERS, PAYMENT_SIGNATURE: b64json(payload)})
        return out

    async def presign(
        self, client: httpx.AsyncClient, url: str, body: bytes, n: int, scheme: str = "exact"
    ) -> list[dict[str, str]]:
        return self.headers(await self.quote(client, url, body), n, scheme)


# -- load generation -----------------------------------------------------------------------------


@dataclass
class Block:
    """One timed block of calls on one side."""

    side: str
    n: int
    concurrency: int
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, successful calls only
    ttfb: list[float] = field(default_factory=list)  # seconds to the first body byte (streams)
    errors: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)  # process → CPU seconds spent during the block

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        out: dict[str, Any] = {
            "calls": self.n,
            "ok": self.ok,
            "errors": dict(self.errors),
            "concurrency": self.concurrency,
            "wall_s": round(self.wall, 4),
            "calls_per_s": self.ok / self.wall if self.wall else math.nan,
            "p50_ms": percentile(ms, 0.50),
            "p90_ms": percentile(ms, 0.90),
            "p99_ms": percentile(ms, 0.99),
            "mean_ms": statistics.fmean(ms) if ms else math.nan,
        }
        if self.ttfb:
            t = [x * 1000 for x in self.ttfb]
            out.update(ttfb_p50_ms=percentile(t, 0.50), ttfb_p99_ms=percentile(t, 0.99))
        out["cpu_ms_per_call"] = {k: v * 1000 / max(self.ok, 1) for k, v in self.cpu.items()}
        out["cpu_busy_pct"] = {k: 100 * v / self.wall if self.wall else math.nan for k, v in self.cpu.items()}
        return out


async def call_once(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], stream: bool, paid: bool
) -> tuple[float, float | None, str | None]:
    """(latency, ttfb, error) of one call; latency covers the whole body."""
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(url, content=body, headers=headers)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            return dt, None, f"{r.status_code}: {r.text[:120]}"
        if paid and "payment-response" not in r.headers:
            return dt, None, "200 without PAYMENT-RESPONSE"
        return dt, None, None
    first: float | None = None
    tail = b""
    async with client.stream("POST", url, content=body, headers=headers) as r:
        async for chunk in r.aiter_raw():
            if first is None and chunk:
                first = time.perf_counter() - t0
            tail = (tail + chunk)[-400:]
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            return dt, first, f"{r.status_code}: {tail[:120].decode(errors='replace')}"
        if paid and ("payment-response" not in r.headers or b": tollway " not in tail):
            return dt, first, "paid stream without PAYMENT-RESPONSE or final tollway summary"
        if b"data: [DONE]" not in tail:
            return dt, first, "stream ended without [DONE]"
    return dt, first, None


async def run_block(
    client: httpx.AsyncClient,
    side: str,
    url: str,
    body: bytes,
    headers: list[dict[str, str]] | dict[str, str],
    n: int,
    concurrency: int,
    stream: bool,
    pids: dict[str, int],
    deadline: float | None = None,
) -> Block:
    """``n`` calls by ``concurrency`` workers (or fewer, if ``deadline``, a perf_counter time, comes first)."""
    block = Block(side, n, concurrency)
    paid = isinstance(headers, list)
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:  # one shared iterator: the workers pull the next call index
            if deadline is not None and time.perf_counter() > deadline:
                break
            h = headers[i] if isinstance(headers, list) else headers
            try:
                dt, first, err = await call_once(client, url, body, h, stream, paid)
            except httpx.HTTPError as exc:
                block.errors[type(exc).__name__] += 1
                continue
            if err is not None:
                block.errors[err] += 1
                continue
            block.latencies.append(dt)
            if first is not None:
                block.ttfb.append(first)

    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    block.wall = time.perf_counter() - t0
    block.cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    if block.errors:
        log(f"  {side}: {sum(block.errors.values())} errors: {dict(block.errors.most_common(3))}")
    return block


# -- the benchmark ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: Cluster, client: httpx.AsyncClient) -> None:
        self.args = args
        self.cluster = cluster
        self.client = client
        self.signer = Signer(cluster.devnet, args.payers)
        self.direct_url = f"{cluster.mock_url}/v1/chat/completions"
        self.paid_url = f"{cluster.gw_url}/v1/chat/completions"
        self.pids = {name: cluster.pid(name) for name in ("gateway", "mock", "anvil")}
        self.pids["loadgen"] = os.getpid()
        self.drains: list[dict[str, float]] = []

    async def payments(self) -> dict[str, int]:
        r = await self.client.get(f"{self.cluster.gw_url}/healthz", headers=ADMIN)
        return dict(r.json().get("payments") or {})

    async def drain(self, timeout: float = 120.0) -> dict[str, float]:
        """Wait until every paid call so far is settled (or failed) on chain."""
        t0 = time.perf_counter()
        backlog = None
        while True:
            states = await self.payments()
            left = states.get("reserved", 0) + states.get("settling", 0)
            if backlog is None:
                backlog = left
            if left == 0 or time.perf_counter() - t0 > timeout:
                break
            await asyncio.sleep(0.02)
        waited = time.perf_counter() - t0
        d = {"backlog": float(backlog), "seconds": waited, "left": float(left)}
        if backlog and backlog >= 50:
            d["settled_per_s"] = backlog / waited if waited else math.nan
        self.drains.append(d)
        if left:
            log(f"  settlement backlog not drained after {timeout:g} s: {left} left ({states})")
        return d

    async def side(self, side: str, n: int, concurrency: int, stream: bool) -> Block:
        body = STREAM_BODY if stream else NON_STREAM_BODY
        await self.drain()
        headers: list[dict[str, str]] | dict[str, str] = JSON_HEADERS
        if side in PAID_SIDES:
            headers = await self.signer.presign(self.client, self.paid_url, body, n, side)
        url = self.paid_url if side in PAID_SIDES else self.direct_url
        return await run_block(self.client, side, url, body, headers, n, concurrency, stream, self.pids)

    async def interleaved(self, label: str, n: int, concurrency: int, stream: bool) -> dict[str, Any]:
        rounds: list[dict[str, Any]] = []
        for r in range(self.args.rounds):
            order = SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]  # each side leads in turn
            got = {s: await self.side(s, n, concurrency, stream) for s in order}
            rounds.append({s: got[s].summary() for s in SIDES})
            key = "ttfb_p50_ms" if stream else "p50_ms"
            p50 = ", ".join(f"{s} {fmt(rounds[-1][s][key])}" for s in SIDES)
            rate = ", ".join(f"{s} {fmt(rounds[-1][s]['calls_per_s'], 0)}" for s in SIDES)
            log(f"  {label} round {r + 1}/{self.args.rounds}: p50 ms {p50}; calls/s {rate}")
        return summarise(rounds, stream)

    async def warmup(self) -> None:
        n = self.args.warmup
        for stream in (False, True):
            for side in SIDES:
                b = await self.side(side, n, 4, stream)
                if b.errors:
                    raise RuntimeError(f"warm-up {side} {'stream' if stream else 'call'} failed: {dict(b.errors)}")

    async def sanity(self) -> None:
        """One paid call per scheme answers what the mock answers directly."""
        direct = (await self.client.post(self.direct_url, content=NON_STREAM_BODY, headers=JSON_HEADERS)).json()
        for scheme in PAID_SIDES:
            h = await self.signer.presign(self.client, self.paid_url, NON_STREAM_BODY, 1, scheme)
            r = await self.client.post(self.paid_url, content=NON_STREAM_BODY, headers=h[0])
            if r.status_code != 200:
                raise RuntimeError(f"{scheme} sanity call failed: {r.status_code} {r.text[:300]}")
            paid = r.json()
            if paid["choices"] != direct["choices"]:
                raise RuntimeError(f"{scheme} answer differs from the direct one: {paid['choices']}")

    async def memory(self) -> dict[str, Any]:
        """Gateway RSS before/after ``--streams`` streamed paid calls."""
        n, conc = self.args.streams, self.args.stream_concurrency
        chunk = max(100, min(1000, math.ceil(n / 10)))  # about ten RSS samples
        gw = self.pids["gateway"]
        await self.drain()
        await asyncio.sleep(0.5)
        before = rss_mib(gw)
        fds_before = open_fds(gw)
        samples = [(0, before)]
        errors: Counter[str] = Counter()
        done = 0
        t0 = time.perf_counter()
        busy = 0.0
        while done < n:
            k = min(chunk, n - done)
            headers = await self.signer.presign(self.client, self.paid_url, STREAM_BODY, k)
            b = await run_block(self.client, "paid", self.paid_url, STREAM_BODY, headers, k, conc, True, {})
            busy += b.wall
            errors.update(b.errors)
            done += k
            samples.append((done, rss_mib(gw)))
            log(f"  streams {done}/{n}: gateway RSS {samples[-1][1]:.1f} MiB ({b.ok / b.wall:.0f} streams/s)")
        elapsed = time.perf_counter() - t0
        drained = await self.drain(timeout=300)
        await asyncio.sleep(1.0)
        after = rss_mib(gw)
        samples.append((done, after))
        half = [s for s in samples[1:] if s[0] >= n / 2]
        slope = math.nan
        if len(half) >= 2 and half[-1][0] > half[0][0]:
            slope = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]) * 1000
        return {
            "streams": n,
            "concurrency": conc,
            "errors": dict(errors),
            "rss_before_mib": before,
            "rss_after_mib": after,
            "rss_delta_mib": after - before,
            "rss_peak_sample_mib": max(s[1] for s in samples),
            "rss_slope_second_half_mib_per_1000": slope,
            "open_fds_before": fds_before,
            "open_fds_after": open_fds(gw),
            "samples": [{"after_streams": c, "rss_mib": round(m, 2)} for c, m in samples],
            "streams_per_s": (n - sum(errors.values())) / busy if busy else math.nan,
            "elapsed_s": elapsed,
            "settlement_drain": drained,
        }

    async def profile(self, path: Path, rate: float) -> dict[str, Any]:
        """py-spy the gateway under paid load at concurrency 16 (non-streaming)."""
        spy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
        if not Path(spy).exists():
            return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
        seconds = self.args.profile_seconds
        n = max(200, int(1.5 * rate * seconds))  # enough for the whole window; the deadline ends it
        headers = await self.signer.presign(self.client, self.paid_url, NON_STREAM_BODY, n)
        await self.drain()
        # Blocking sampling (py-spy pauses the gateway ~200 times/s) gives whole stacks; by function.
        argv = [spy, "record", "--pid", str(self.pids["gateway"]), "--rate", "200", "--format", "raw"]
        argv += ["--function", "--full-filenames", "--output", str(path)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.cluster.procs["py-spy"] = proc
        await asyncio.sleep(1.0)  # let py-spy attach
        gw = {"gateway": self.pids["gateway"]}
        end = time.perf_counter() + seconds
        b = await run_block(self.client, "paid", self.paid_url, NON_STREAM_BODY, headers, n, 16, False, gw, end)
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not path.exists():
            return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"}
        cpu = b.cpu["gateway"] * 1000 / max(b.ok, 1)
        out = {"output": str(path), "calls": b.ok, "calls_per_s": b.ok / b.wall, "gateway_cpu_ms_per_call": cpu}
        return {**out, **hot_spots(path)}


def summarise(rounds: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
    """Medians across rounds; added/ratio computed per round (paired), then the median: each paid
    side against direct (``vs_direct``), and upto against exact (``upto_vs_exact``). ``paid``
    is the exact side (with its figures against direct at the top level, as before)."""
    keys = ["p50_ms", "p99_ms", "calls_per_s"] + (["ttfb_p50_ms", "ttfb_p99_ms"] if stream else [])
    out: dict[str, Any] = {"rounds": rounds}
    for s in SIDES:
        out[s] = {k: median([r[s][k] for r in rounds]) for k in keys}
        for what in ("cpu_ms_per_call", "cpu_busy_pct"):
            names = rounds[0][s][what].keys()
            out[s][what] = {c: median([r[s][what][c] for r in rounds]) for c in names}
        out[s]["errors"] = sum(sum(r[s]["errors"].values()) for r in rounds)

    def paired(side: str, base: str) -> dict[str, float]:
        d: dict[str, float] = {}
        for k in keys:
            d[f"ratio_{k}"] = median([r[side][k] / r[base][k] for r in rounds])
            if k != "calls_per_s":
                d[f"added_{k}"] = median([r[side][k] - r[base][k] for r in rounds])
        return d

    out["vs_direct"] = {s: paired(s, "direct") for s in PAID_SIDES}
    out["upto_vs_exact"] = paired("upto", "exact")
    out["paid"] = out["exact"]
    out.update(out["vs_direct"]["exact"])
    return out


def short_frame(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` → ``func (pkg/mod.py:12)``."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3":
                where = where.split("/", 1)[-1]
            break
    return f"{name} ({where}"


def is_tollway(frame: str) -> bool:
    return "/tollway/" in frame and "/tollway/cli.py" not in frame and not frame.startswith("<module>")


def library_called(frames: list[str], last_tollway: int) -> str:
    """The package of the first frame below the innermost tollway frame (what tollway called)."""
    if last_tollway < 0:
        return "(no tollway frame: server, event loop)"
    for f in frames[last_tollway + 1 :]:
        where = f.rpartition(" (")[2]
        if "/site-packages/" in where:
            return where.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
        if "/lib/python3" in where:
            module = where.split("/lib/python3", 1)[1].split("/", 2)[1].split(".py", 1)[0]
            if module in ("contextlib", "functools"):  # pass-through wrappers: look at what they call
                continue
            return "stdlib " + module
    return "(tollway's own code)"


def hot_spots(path: Path, top: int = 15) -> dict[str, Any]:
    """Shares of py-spy samples (raw collapsed stacks, full filenames, by function).

    ``self``: the innermost frame. ``inclusive``: every frame on the stack. ``tollway``: each sample
    charged to its innermost tollway frame, i.e. the time of a tollway function and the libraries it
    calls, minus deeper tollway functions; samples with none are the server (uvicorn/h11, starlette,
    the event loop) or other threads.
    """
    self_n: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    owner: Counter[str] = Counter()
    roots: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += c
        self_n[short_frame(frames[-1])] += c
        for f in {short_frame(f) for f in frames}:
            incl[f] += c
        if any(f.startswith("Settler._run ") for f in frames):
            roots["settlement worker (the Settler._run task)"] += c
        elif any(f.split(" (", 1)[0].endswith(".confirm") and "/tollway/" in f for f in frames):
            roots["payment confirmation (scheme.confirm, its own task: chain reads)"] += c
        elif any("/tollway/pipeline.py" in f for f in frames):
            roots["request pipeline (tollway/pipeline.py)"] += c
        elif any("/uvicorn/" in f or "/starlette/" in f or "/h11/" in f for f in frames):
            roots["server outside the pipeline (uvicorn/h11/starlette)"] += c
        else:
            roots["other (event loop, other tasks and threads)"] += c
        mine = [i for i, f in enumerate(frames) if is_tollway(f)]
        libs[library_called(frames, mine[-1] if mine else -1)] += c
        mine = [frames[i] for i in mine]
        if mine:
            owner[short_frame(mine[-1])] += c
        elif any("/uvicorn/" in f or "/starlette/" in f or "/h11/" in f for f in frames):
            owner["(server: uvicorn/h11/starlette outside tollway code)"] += c
        elif any("/asyncio/" in f for f in frames):
            owner["(event loop, no tollway frame)"] += c
        else:
            owner["(other)"] += c
    if not total:
        return {"samples": 0}

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "pct": round(100 * c / total, 1)} for f, c in counter.most_common(top)]

    return {
        "samples": total,
        "by_root": share(roots),
        "self": share(self_n),
        "inclusive": share(incl),
        "tollway": share(owner),
        "libraries": share(libs),
    }


# -- in-process CPU: verify and sign ---------------------------------------------------------------


async def timeit(fn: Callable[[int], Any], n: int, repeat: int) -> dict[str, float]:
    """µs per call of fn(i) for i in range(n) (awaited if it returns an awaitable), ``repeat`` times."""
    per = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(n):
            r = fn(i)
            if inspect.isawaitable(r):
                await r
        per.append((time.perf_counter() - t0) / n * 1e6)
    return {"median_us": statistics.median(per), "best_us": min(per), "n": n, "repeat": repeat}


def make_quote(amount: int, body: bytes) -> Any:
    """A ``Quote`` for ``body`` at ``amount``, for schemes whose verify() asks for one."""
    import dataclasses

    from tollway.payments.base import Quote
    from tollway.quotes import request_digest

    known = {
        "model": MODEL,
        "amount": amount,
        "request_digest": request_digest(json.loads(body)),
        "expires": int(time.time()) + 3600,
        "prompt_bound": len(body),
        "max_tokens": 16,
    }
    return Quote(**{f.name: known[f.name] for f in dataclasses.fields(Quote) if f.name in known})


async def cpu_bench(devnet: Any, offers: dict[str, dict[str, Any]], n: int, repeat: int) -> dict[str, Any]:
    """In-process CPU of payment verification and signing, on pre-signed proofs, per scheme.

    ``offers`` are the gateway's own offers for the non-streaming body (from a 402), by scheme.
    """
    from eth_account import Account

    from tollway.client.payer import sign_exact, sign_upto
    from tollway.payments import x402
    from tollway.payments.base import Proof
    from tollway.payments.exact import ExactEvm
    from tollway.payments.upto import UptoEvm
    from tollway.settlement import Settler, Signing

    common = {
        "chain": None,  # verify() does no I/O
        "chain_id": devnet.chain_id,
        "token": devnet.token,
        "token_name": devnet.token_name,
        "token_version": devnet.token_version,
        "payee": devnet.payee,
        "settler": Account.from_key(devnet.settler_key).address,
        "timeout": 390,
        "min_validity": 360,
    }
    settler = Settler(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        key=devnet.settler_key,
        chain_id=devnet.chain_id,
        gas_limit=250_000,
        max_fee_gwei=None,
        priority_fee_gwei=Decimal("0.001"),
    )
    accounts = [Account.from_key(k) for k in devnet.payer_keys]
    now = int(time.time())
    out: dict[str, Any] = {}
    for name, scheme_cls, sign in (("exact", ExactEvm, sign_exact), ("upto", UptoEvm, sign_upto)):
        scheme = scheme_cls(**common)  # type: ignore[arg-type]
        wire_offer = offers[name]
        amount = int(wire_offer["amount"])
        offer, quote = scheme.offer(amount), make_quote(amount, NON_STREAM_BODY)
        payloads = [sign(accounts[i % len(accounts)], wire_offer, now) for i in range(n)]
        proofs = [Proof(2, name, scheme.network, p, wire_offer) for p in payloads]
        doc = {"x402Version": 2, "resource": None, "accepted": wire_offer, "extensions": {}}
        headers = [{x402.PAYMENT_SIGNATURE: x402.b64json({**doc, "payload": p})} for p in payloads]

        async def verify(proof: Any, scheme: Any = scheme, offer: Any = offer, quote: Any = quote) -> Any:
            return await scheme.verify(proof, offer, quote, now)

        verified = [await verify(p) for p in proofs[: min(n, 500)]]  # fails loudly if the proofs are wrong
        m = len(verified)
        out[f"{name}_verify"] = await timeit(lambda i, v=verify, ps=proofs: v(ps[i]), n, repeat)
        out[f"{name}_decode_and_verify"] = await timeit(
            lambda i, v=verify, hs=headers: v(x402.decode_proof(hs[i], {})), n, repeat
        )
        out[f"{name}_sign"] = await timeit(
            lambda i, s=sign, o=wire_offer: s(accounts[i % len(accounts)], o, now), n, repeat
        )

        def settle_sign(i: int, scheme: Any = scheme, verified: list[Any] = verified, m: int = m) -> Any:
            payment = verified[i % m]
            to, data = scheme.settlement_call(payment.proof, payment.amount)
            return Signing(settler, to, data)(i)  # the settlement transaction, signed on the request path

        out[f"{name}_settlement_sign"] = await timeit(settle_sign, m, repeat)
    out["verify"] = out["exact_verify"]  # (the budget's figure)
    return out


def metering_bench(chunks: int = 1000, repeat: int = 7) -> dict[str, Any]:
    """What metering adds to relaying one stream: the gateway feeds every chunk to a ``StreamTail``
    (a bounded byte tail and a ``data:`` count) and parses JSON once, at the end, for the usage.
    Compared with a bare relay loop, and with the naive alternative of parsing every chunk."""
    from tollway.usage import StreamTail

    def event(doc: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    stream = [
        event({**head, "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}]})
        for i in range(chunks)
    ]
    stream.append(
        event(
            {
                **head,
                "choices": [],
                "usage": {
                    "prompt_tokens": 900,
                    "completion_tokens": chunks,
                    "prompt_tokens_details": {"cached_tokens": 512},
                },
            }
        )
    )
    stream.append(b"data: [DONE]\n\n")

    def relay() -> None:
        sink = []
        for chunk in stream:
            sink.append(chunk)

    def metered() -> None:
        sink, tail = [], StreamTail()
        for chunk in stream:
            tail.feed(chunk)
            sink.append(chunk)
        assert tail.usage() is not None

    def parse_all() -> None:
        sink, usage = [], None
        for chunk in stream:
            doc = json.loads(chunk[6:]) if chunk.startswith(b"data: {") else {}
            usage = doc.get("usage") or usage
            sink.append(chunk)
        assert usage is not None

    def per_stream(fn: Callable[[], None]) -> float:
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            runs.append((time.perf_counter() - t0) / 20 * 1e6)
        return statistics.median(runs)

    bare, tail, naive = per_stream(relay), per_stream(metered), per_stream(parse_all)
    return {
        "chunks": chunks,
        "relay_us": bare,
        "metered_us": tail,
        "parse_every_chunk_us": naive,
        "metering_added_us": tail - bare,
        "per_chunk_ns": (tail - bare) / chunks * 1000,
        "parse_every_chunk_added_us": naive - bare,
    }


# -- report ----------------------------------------------------------------------------------------


def upto_table(res: dict[str, Any]) -> list[str]:
    """upto next to exact and direct: each measure's medians, and what upto adds over exact."""
    w = "{:<34}{:>10}{:>10}{:>10}{:>12}{:>12}"
    lines = ["", "upto next to exact (same rounds, interleaved)"]
    lines.append(w.format("", "direct", "exact", "upto", "upto/direct", "upto−exact"))
    rows = [
        ("latency c=1   p50 (ms)", res["latency"]["c1"], "p50_ms"),
        ("latency c=1   p99 (ms)", res["latency"]["c1"], "p99_ms"),
        ("latency c=16  p50 (ms)", res["latency"]["c16"], "p50_ms"),
        ("latency c=16  p99 (ms)", res["latency"]["c16"], "p99_ms"),
        ("stream c=1 TTFB p50 (ms)", res["stream"], "ttfb_p50_ms"),
        ("stream c=1 TTFB p99 (ms)", res["stream"], "ttfb_p99_ms"),
        ("calls/s c=16", res["latency"]["c16"], "calls_per_s"),
    ]
    for label, sec, key in rows:
        over = sec["upto_vs_exact"]
        diff = fmt(over["ratio_calls_per_s"]) + "x" if key == "calls_per_s" else signed(over[f"added_{key}"])
        lines.append(
            w.format(
                label,
                fmt(sec["direct"][key]),
                fmt(sec["exact"][key]),
                fmt(sec["upto"][key]),
                fmt(sec["vs_direct"]["upto"][f"ratio_{key}"]) + "x",
                diff,
            )
        )
    cpu = res["latency"]["c16"]
    lines.append(
        w.format(
            "gateway CPU ms/call c=16",
            "",
            fmt(cpu["exact"]["cpu_ms_per_call"].get("gateway"), 3),
            fmt(cpu["upto"]["cpu_ms_per_call"].get("gateway"), 3),
            "",
            "",
        )
    )
    return lines


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("ok" if ok else "OVER")


def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    m = res["machine"]
    lines.append("")
    bt = res["config"]["block_time"]
    mining = f"block time {bt:g} s" if bt else "automine"
    lines.append(
        f"tollway bench — {m['cpus']} CPUs, {m['pinning']}; anvil {mining}; "
        f"rounds={res['config']['rounds']} "
        f"(medians across rounds; added/ratio paired per round)"
    )
    w = "{:<34}{:>10}{:>10}{:>10}{:>9}   {}"
    src = res["source"]
    lines.append(
        f"source: commit {src['commit']} + {src['uncommitted_src_files']} uncommitted files under src/; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}"
    )
    lines.append("paid = exact; upto's own figures follow in the next table")
    lines.append(w.format("", "direct", "paid", "added", "ratio", "budget"))

    def row(label: str, sec: dict[str, Any], key: str, budget: str = "") -> None:
        lines.append(
            w.format(
                label,
                fmt(sec["direct"][key]),
                fmt(sec["paid"][key]),
                signed(sec.get(f"added_{key}")),
                fmt(sec.get(f"ratio_{key}")) + "x",
                budget,
            )
        )

    lat = res["latency"]
    c1 = lat["c1"]
    ok = c1["added_p50_ms"] <= BUDGET["added_p50_c1_ms"]
    row("latency c=1   p50 (ms)", c1, "p50_ms", f"added ≤ +{BUDGET['added_p50_c1_ms']:g} ms: {verdict(ok)}")
    row("latency c=1   p99 (ms)", c1, "p99_ms")
    row("latency c=16  p50 (ms)", lat["c16"], "p50_ms")
    row("latency c=16  p99 (ms)", lat["c16"], "p99_ms")
    st = res["stream"]
    ok = st["added_ttfb_p50_ms"] <= BUDGET["added_ttfb_ms"]
    row("stream c=1 TTFB p50 (ms)", st, "ttfb_p50_ms", f"added ≤ +{BUDGET['added_ttfb_ms']:g} ms: {verdict(ok)}")
    row("stream c=1 TTFB p99 (ms)", st, "ttfb_p99_ms")
    row("stream c=1 full stream p50 (ms)", st, "p50_ms")
    c16 = lat["c16"]
    ok = c16["paid"]["calls_per_s"] >= BUDGET["paid_calls_per_s"]
    lines.append(
        w.format(
            "calls/s c=16 (one gateway worker)",
            fmt(c16["direct"]["calls_per_s"], 0),
            fmt(c16["paid"]["calls_per_s"], 0),
            "",
            fmt(c16["ratio_calls_per_s"]) + "x",
            f"paid ≥ {BUDGET['paid_calls_per_s']:g}/s: {verdict(ok)}",
        )
    )
    cpu_d, cpu_p = c16["direct"]["cpu_ms_per_call"], c16["paid"]["cpu_ms_per_call"]
    lines.append(
        w.format("CPU ms/call c=16: gateway", "", fmt(cpu_p.get("gateway"), 3), "", "", "(process CPU / calls)")
    )
    for name in ("mock", "anvil", "loadgen"):
        label = f"{'':18}{name}"
        lines.append(w.format(label, fmt(cpu_d.get(name), 3), fmt(cpu_p.get(name), 3), "", "", ""))
    busy_d, busy_p = c16["direct"]["cpu_busy_pct"], c16["paid"]["cpu_busy_pct"]
    cpu0_d = sum(busy_d.get(k, 0.0) for k in ("mock", "anvil", "loadgen"))
    cpu0_p = sum(busy_p.get(k, 0.0) for k in ("mock", "anvil", "loadgen"))
    lines.append(w.format("CPU busy % c=16: CPU 0", fmt(cpu0_d, 0), fmt(cpu0_p, 0), "", "", "(loadgen+mock+anvil)"))
    lines.append(w.format(f"{'':17}CPU 1", "", fmt(busy_p.get("gateway"), 0), "", "", "(gateway)"))
    if cpu0_d >= 85:
        lines.append("  note: the direct baseline saturates CPU 0, so it measures the load generator (httpx) as much")
        lines.append("        as the mock: a floor for the mock's capacity, not its ceiling")
    lines += upto_table(res)

    lines.append("")
    cpu = res["cpu"]
    v = cpu.get("verify") or {"median_us": math.nan, "best_us": math.nan, "repeat": 0, "n": 0}
    ok = None if math.isnan(v["median_us"]) else v["median_us"] <= BUDGET["verify_us"]
    lines.append(f"payment CPU, in-process (µs per call, median of {v['repeat']} × {v['n']}; best in brackets)")
    if "error" in cpu:
        lines.append(f"  n/a: {cpu['error']}")
    lines.append(
        f"  ExactEvm.verify                  {fmt(v['median_us'], 1):>9}  ({fmt(v['best_us'], 1)})"
        f"   budget ≤ {BUDGET['verify_us']:g} µs: {verdict(ok)}"
    )
    for key, label in (
        ("exact_decode_and_verify", "exact: decode header + verify"),
        ("exact_sign", "exact: client signing"),
        ("exact_settlement_sign", "exact: settlement tx signing"),
        ("upto_verify", "UptoEvm.verify"),
        ("upto_decode_and_verify", "upto: decode header + verify"),
        ("upto_sign", "upto: client signing"),
        ("upto_settlement_sign", "upto: settlement tx signing"),
    ):
        d = cpu.get(key) or {"error": "not measured"}
        if "error" in d:
            lines.append(f"  {label:<32} n/a ({d['error']})")
        else:
            lines.append(f"  {label:<32} {fmt(d['median_us'], 1):>9}  ({fmt(d['best_us'], 1)})")

    m = res.get("metering")
    if m:
        lines.append("")
        lines.append(f"metering one stream of {m['chunks']} chunks + usage (µs per stream, in-process, median)")
        lines.append(f"  relay only                       {fmt(m['relay_us'], 1):>9}")
        lines.append(
            f"  relay + StreamTail + usage       {fmt(m['metered_us'], 1):>9}   "
            f"+{fmt(m['metering_added_us'], 1)} µs ({fmt(m['per_chunk_ns'], 0)} ns per chunk)"
        )
        lines.append(
            f"  (parsing every chunk instead     {fmt(m['parse_every_chunk_us'], 1):>9}   "
            f"+{fmt(m['parse_every_chunk_added_us'], 1)} µs)"
        )

    mem = res["memory"]
    lines.append("")
    lines.append(
        f"gateway memory over {mem['streams']:,} streamed paid calls (c={mem['concurrency']}, "
        f"{fmt(mem['streams_per_s'], 0)} streams/s, {sum(mem['errors'].values())} errors)"
    )
    lines.append(
        f"  RSS before {fmt(mem['rss_before_mib'], 1)} MiB → after {fmt(mem['rss_after_mib'], 1)} MiB "
        f"(delta {signed(mem['rss_delta_mib'], 1)} MiB; peak sample {fmt(mem['rss_peak_sample_mib'], 1)} MiB; "
        f"2nd-half slope {signed(mem['rss_slope_second_half_mib_per_1000'], 2)} MiB/1000 calls); "
        f"open fds {mem['open_fds_before']} → {mem['open_fds_after']}"
    )
    lines.append("  samples: " + ", ".join(f"{s['after_streams']}:{s['rss_mib']:.1f}" for s in mem["samples"]))
    dr = mem["settlement_drain"]
    lines.append(
        f"  settlement backlog left by these streams: {int(dr['backlog'])} payments, "
        f"drained in {fmt(dr['seconds'], 1)} s ({fmt(dr['backlog'] / dr['seconds'] if dr['seconds'] else math.nan)}/s)"
    )

    drains = [d for d in res["settlement"]["drains"] if d.get("settled_per_s")]
    if drains:
        rates = [d["settled_per_s"] for d in drains]
        lines.append("")
        lines.append(
            f"settlement: backlog after paid blocks drained at median {fmt(median(rates), 0)} settlements/s "
            f"(max backlog {max(int(d['backlog']) for d in drains)}); final states {res['settlement']['final']}"
        )
    errs = {k: v for k, v in res["errors"].items() if v}
    lines.append("")
    lines.append(f"errors: {errs or 'none'}")
    prof = res.get("profile")
    if prof:
        lines.append("")
        if "error" in prof:
            lines.append(f"profile: {prof['error']}")
        else:
            lines.append(
                f"profile (py-spy, gateway, paid c=16, {prof['calls']} calls at {fmt(prof['calls_per_s'], 0)}/s, "
                f"{fmt(prof['gateway_cpu_ms_per_call'], 2)} gateway CPU ms/call, {prof['samples']} samples)"
                f" → {prof['output']}"
            )
            lines.append("  where the gateway's CPU goes:")
            lines += [f"    {e['pct']:5.1f}%  {e['frame']}" for e in prof["by_root"]]
            lines.append("  by library that tollway code called (the first frame below the innermost tollway frame):")
            lines += [f"    {e['pct']:5.1f}%  {e['frame']}" for e in prof["libraries"][:10]]
            lines.append("  top self time:")
            lines += [f"    {e['pct']:5.1f}%  {e['frame']}" for e in prof["self"][:12]]
            lines.append("  charged to the innermost tollway function (its own code + the libraries it calls):")
            lines += [f"    {e['pct']:5.1f}%  {e['frame']}" for e in prof["tollway"][:15]]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------


def jsonable(v: Any) -> Any:
    """NaN → null (strict JSON), everything else as is or as a string."""
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if v is None or isinstance(v, str | int | bool):
        return v
    return str(v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small counts, a sanity check (< 60 s)")
    p.add_argument("--json", metavar="PATH", help="also write all numbers as JSON to PATH")
    p.add_argument("--rounds", type=int, help="interleaved rounds per measurement (default 5; quick 3)")
    p.add_argument("--calls", type=int, help="calls per side per round at concurrency 1 (default 200; quick 40)")
    p.add_argument("--calls16", type=int, help="calls per side per round at concurrency 16 (default 1000; quick 200)")
    p.add_argument("--stream-calls", type=int, help="streams per side per round for TTFB (default 200; quick 40)")
    p.add_argument("--streams", type=int, help="streamed paid calls for the memory check (default 2000; quick 300)")
    p.add_argument("--stream-concurrency", type=int, default=16, help="concurrency of the memory check (16)")
    p.add_argument("--verify-n", type=int, help="pre-signed proofs for the in-process CPU timing (default 2000)")
    p.add_argument("--warmup", type=int, help="warm-up calls per side and kind (default 100; quick 20)")
    p.add_argument(
        "--block-time",
        type=float,
        default=1.0,
        help="anvil mines a block every S seconds (default 1); 0: automine, a block per transaction, whose cost\n"
        "grows with the chain's length (≈1 ms → 15 ms of anvil CPU per settlement over 7,500 blocks)",
    )
    p.add_argument("--payers", type=int, help="devnet payer wallets to rotate over (default: all 8)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--profile", metavar="PATH", help="py-spy the gateway under paid c=16 load; raw stacks to PATH")
    p.add_argument("--profile-seconds", type=float, default=15.0, help="length of the profiled load (15)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, ledger) after the run")
    a = p.parse_args(argv)
    quick = {"rounds": 3, "calls": 40, "calls16": 200, "stream_calls": 40, "streams": 300, "verify_n": 300}
    full = {"rounds": 5, "calls": 200, "calls16": 1000, "stream_calls": 200, "streams": 2000, "verify_n": 2000}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.warmup is None:
        a.warmup = 20 if a.quick else 100
    return a


def source_state() -> dict[str, Any]:
    """The commit and the uncommitted changes under src/ that this run measured."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False)
        return r.stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_src_files": len(changed)}


def pin_self() -> tuple[bool, str]:
    cpus = os.cpu_count() or 1
    if cpus < 2 or not shutil.which("taskset") or not hasattr(os, "sched_setaffinity"):
        return False, "not pinned (needs 2+ CPUs and taskset)"
    os.sched_setaffinity(0, {0})  # before any thread or child exists: they inherit it
    return True, "pinned: loadgen+mock+anvil → CPU 0, gateway → CPU 1"


async def run(args: argparse.Namespace, cluster: Cluster, res: dict[str, Any]) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
        await cluster.wait_ready(client)
        bench = Bench(args, cluster, client)
        log(f"gateway {cluster.gw_url} (pid {bench.pids['gateway']}), mock {cluster.mock_url}; sanity + warm-up")
        await bench.sanity()
        await bench.warmup()
        res["memory_after_warmup_mib"] = rss_mib(bench.pids["gateway"])

        log(f"latency, concurrency 1: {args.rounds} rounds × {args.calls} calls per side")
        c1 = await bench.interleaved("c=1", args.calls, 1, False)
        log(f"latency and throughput, concurrency 16: {args.rounds} rounds × {args.calls16} calls per side")
        c16 = await bench.interleaved("c=16", args.calls16, 16, False)
        res["latency"] = {"c1": c1, "c16": c16}
        res["throughput"] = {
            "paid_calls_per_s": c16["paid"]["calls_per_s"],
            "direct_calls_per_s": c16["direct"]["calls_per_s"],
            "ratio": c16["ratio_calls_per_s"],
        }
        log(f"streaming TTFB, concurrency 1: {args.rounds} rounds × {args.stream_calls} streams per side")
        res["stream"] = await bench.interleaved("stream", args.stream_calls, 1, True)

        await bench.drain()
        log(f"payment CPU in-process: {args.verify_n} pre-signed proofs")
        try:
            required = await bench.signer.quote(client, bench.paid_url, NON_STREAM_BODY)
            offers = {scheme: bench.signer.offer(required, scheme) for scheme in PAID_SIDES}
            res["cpu"] = await cpu_bench(cluster.devnet, offers, args.verify_n, 5)
            res["metering"] = metering_bench()
        except Exception as exc:  # the scheme API moves; report it rather than lose the run
            log(f"payment CPU benchmark failed: {type(exc).__name__}: {exc}")
            res["cpu"] = {"error": f"{type(exc).__name__}: {exc}"}

        log(f"memory: {args.streams} streamed paid calls at concurrency {args.stream_concurrency}")
        res["memory"] = await bench.memory()
        if args.profile:
            log(f"profiling the gateway with py-spy for ~{args.profile_seconds:g} s of paid c=16 load")
            rate = res["throughput"]["paid_calls_per_s"]
            res["profile"] = await bench.profile(Path(args.profile).resolve(), rate if rate > 0 else 100.0)
        await bench.drain()
        res["settlement"] = {"drains": bench.drains, "final": await bench.payments()}

    def errors_of(sec: dict[str, Any]) -> int:
        return int(sum(sec[s]["errors"] for s in SIDES))

    res["errors"] = {
        "latency_c1": errors_of(res["latency"]["c1"]),
        "latency_c16": errors_of(res["latency"]["c16"]),
        "stream": errors_of(res["stream"]),
        "memory_streams": sum(res["memory"]["errors"].values()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinned, pinning = (False, "not pinned (--no-pin)") if args.no_pin else pin_self()
    res: dict[str, Any] = {
        "command": " ".join(["scripts/bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "pinning": pinning,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg(),
        },
        "source": source_state(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "budget": BUDGET,
    }

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (e.g. a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster = Cluster(pin=pinned, keep=args.keep, block_time=args.block_time)
    t0 = time.perf_counter()
    try:
        cluster.start()
        asyncio.run(run(args, cluster, res))
    except KeyboardInterrupt:
        log("interrupted; stopping the processes")
        return 130
    except Exception:
        for name in ("gateway", "mock"):
            if name in cluster.logs:
                log(f"{name} log tail:\n{cluster.tail(name)}")
        raise
    finally:
        cluster.stop()
    res["elapsed_s"] = time.perf_counter() - t0
    print(report(res), flush=True)
    print(f"\n(elapsed {res['elapsed_s']:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(jsonable(res), indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
