"""`pip install .` alone gives the production hot path: the gateway, run from a venv holding only
the runtime dependencies, serves 100 paid calls without a single failed import (httpcore, for
one, tries `import sniffio` on every request: without it installed, Python's import machinery
searched the path each time — 13% of the gateway's CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx
from eth_account import Account

from support import CHAT, chat_body, free_port
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.devnet.anvil import find_anvil

ROOT = Path(__file__).resolve().parents[2]

# Run `tollway serve` counting every import no finder could satisfy, from the moment SIGUSR1
# says the warm-up is over; SIGUSR2 writes them to the file named by MISSES.
COUNTING_SERVE = """
import json, os, signal, sys
misses, counting = [], [False]

class Miss:
    def find_spec(self, name, path=None, target=None):
        if counting[0]:
            misses.append(name)
        return None

sys.meta_path.append(Miss())
signal.signal(signal.SIGUSR1, lambda *_: counting.__setitem__(0, True))
def dump(*_):  # (whole or not at all: the test reads it as soon as it is there)
    with open(os.environ["MISSES"] + ".part", "w") as f:
        json.dump(misses, f)
    os.replace(os.environ["MISSES"] + ".part", os.environ["MISSES"])
signal.signal(signal.SIGUSR2, dump)
from tollway.cli import main
sys.exit(main(sys.argv[1:]))
"""


def runtime_venv(tmp: Path) -> Path:
    """A venv with `pip install .` of this checkout and nothing else (pip's cache is reused; the
    project is built from a copy, so that no build directory lands in the checkout)."""
    project = tmp / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = tmp / "runtime"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    run = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile", str(project)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return python


def test_a_runtime_only_install_serves_without_failed_imports(tmp_path):
    python = runtime_venv(tmp_path)
    port, mock_port, devnet_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLWAY_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(TOLLWAY_ANVIL=find_anvil(), MISSES=str(tmp_path / "misses.json"))
    args = ["serve", "--devnet", "--port", str(port), "--mock-port", str(mock_port), "--devnet-port", str(devnet_port)]
    log = (tmp_path / "serve.log").open("w")  # (a file: a pipe nobody reads would fill and stall it)
    proc = subprocess.Popen(
        [str(python), "-c", COUNTING_SERVE, *args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        devnet = json.loads((tmp_path / "var" / "devnet.json").read_text())
        asset = AllowedAsset(f"eip155:{devnet['chain_id']}", devnet["token"])
        payer = Payer(Account.from_key(devnet["payer_keys"][3]), [asset])
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=url, timeout=60) as http:
            for i in range(5):  # warm-up: first imports happen here
                assert http.post(CHAT, json=chat_body(f"warm {i}", stream=i % 2 == 0)).status_code == 200
            proc.send_signal(signal.SIGUSR1)
            for i in range(100):
                r = http.post(CHAT, json=chat_body(f"call {i}", max_tokens=8, stream=i % 2 == 0))
                assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not (tmp_path / "misses.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        misses = json.loads((tmp_path / "misses.json").read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert misses == [], f"{len(misses)} failed imports during 100 paid calls: {sorted(set(misses))}"
