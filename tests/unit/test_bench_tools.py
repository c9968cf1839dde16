"""The benchmark's in-process tools still run against the code they measure (a renamed argument
broke ``bench_parse.py`` once, unnoticed until it was next run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tollway.ledger.store import Store

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_parse_prices_an_agents_request_and_its_paid_retry() -> None:
    bench = script("bench_parse")
    raw = bench.body(2)
    bench.request(raw)
    kept = bench.PricedRequests()
    asked = bench.Pricing(bench.parse_chat, raw, bench.SETTINGS, bench.PRICES, bench.ORIGIN, False)
    kept.keep(asked, kept.parse(asked))
    bench.request(raw, kept=kept)
    assert len(kept) == 1


def test_bench_ledger_runs_a_credit_calls_two_transactions(tmp_path: Path) -> None:
    bench = script("bench_ledger")
    store = Store(f"sqlite:///{tmp_path}/ledger.sqlite3")
    try:
        with store._sql() as c:
            store._post(c, bench.ACCOUNT, [("deposit", 10**9)])
        for _ in range(3):
            bench.credit_call(store)
        assert store.credit_balance(bench.ACCOUNT) == 10**9 - 3 * bench.COST
    finally:
        store.close()


def test_the_load_bench_parses_its_arguments() -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--stages" in done.stdout
