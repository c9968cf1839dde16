"""``Gateway.recent``: a public document read from the ledger at most every so often, however
many ask for it at once."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from tollway.gateway import Gateway


@dataclass
class Reports:
    """What ``Gateway.recent`` uses of a gateway: its reports thread and what it remembers."""

    _reports: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))
    _recent: dict[str, Any] = field(default_factory=dict)
    _reading: dict[str, Any] = field(default_factory=dict)
    report = Gateway.report
    recent = Gateway.recent


class Scan:
    """A slow scan of the ledger that counts its runs."""

    def __init__(self, seconds: float = 0.2, fail: bool = False) -> None:
        self.runs, self.seconds, self.fail = 0, seconds, fail

    def __call__(self) -> dict[str, int]:
        self.runs += 1
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("the ledger is gone")
        return {"run": self.runs}


async def test_a_herd_asking_at_once_gets_one_scan():
    gw, scan = Reports(), Scan()
    docs = await asyncio.gather(*(gw.recent("rankings", 60, scan) for _ in range(50)))
    assert scan.runs == 1 and all(d == {"run": 1} for d in docs)


async def test_a_stale_document_is_answered_while_one_scan_replaces_it():
    gw, scan = Reports(), Scan()
    assert await gw.recent("rankings", 0.05, scan) == {"run": 1}
    await asyncio.sleep(0.1)  # (stale now)
    started = time.monotonic()
    docs = await asyncio.gather(*(gw.recent("rankings", 0.05, scan) for _ in range(50)))
    assert time.monotonic() - started < 0.15  # (nobody waited for the scan)
    assert all(d == {"run": 1} for d in docs)
    await asyncio.sleep(0.3)
    assert scan.runs == 2 and await gw.recent("rankings", 60, scan) == {"run": 2}


async def test_a_caller_gone_cancels_no_ones_scan_and_a_failed_scan_is_tried_again():
    gw, scan = Reports(), Scan(fail=True)
    first = asyncio.ensure_future(gw.recent("stats", 60, scan))
    second = asyncio.ensure_future(gw.recent("stats", 60, scan))
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(RuntimeError, match="gone"):
        await second
    scan.fail = False
    assert await gw.recent("stats", 60, scan) == {"run": 2}
