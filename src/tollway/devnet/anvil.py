"""Locate and run a local anvil (Foundry) node for development and tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_MNEMONIC = "test test test test test test test test test test test junk"
"""Foundry's default dev mnemonic; anvil derives m/44'/60'/0'/0/{i} from it."""

CHAIN_ID = 31337
NUM_ACCOUNTS = 10

DEV_KEYS: list[str] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
]
"""Private keys of the first 10 accounts of :data:`DEFAULT_MNEMONIC` (verified in the tests)."""

_ANVIL_IN_TOOLS = Path(".tools", "node_modules", "@foundry-rs", "anvil-linux-amd64", "bin", "anvil")


def repo_root() -> Path | None:
    """The tollway source checkout containing this file (nearest ancestor with pyproject.toml).

    Returns ``None`` when tollway is installed as a regular (non-editable) package.
    """
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def find_anvil() -> str:
    """Path of an anvil binary.

    Looked up in order: ``$TOLLWAY_ANVIL``, ``anvil`` on ``PATH``, then
    ``.tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil`` under the repo root and
    under the current working directory.
    """
    env = os.environ.get("TOLLWAY_ANVIL")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"TOLLWAY_ANVIL={env!r} does not point to a file")
        return env
    on_path = shutil.which("anvil")
    if on_path:
        return on_path
    bases = [b for b in (repo_root(), Path.cwd()) if b is not None]
    for base in bases:
        candidate = base / _ANVIL_IN_TOOLS
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(
        "anvil not found (looked at $TOLLWAY_ANVIL, PATH and "
        + ", ".join(str(b / _ANVIL_IN_TOOLS) for b in bases)
        + "). Install it with: npm install --prefix .tools @foundry-rs/anvil"
    )


def anvil_command(port: int, block_time: float | None = None) -> list[str]:
    """argv that starts anvil on 127.0.0.1:``port`` (chain id 31337, default mnemonic, 10 accounts).

    With ``block_time`` (seconds) anvil mines on an interval instead of automining.
    """
    argv = [
        find_anvil(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--chain-id",
        str(CHAIN_ID),
        "--mnemonic",
        DEFAULT_MNEMONIC,
        "--accounts",
        str(NUM_ACCOUNTS),
        "--quiet",
    ]
    if block_time is not None:
        argv += ["--block-time", f"{block_time:g}"]
    return argv


def rpc_alive(url: str, timeout: float = 1.0) -> bool:
    """True if ``url`` answers a JSON-RPC ``eth_chainId`` request."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return "result" in json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False


def genesis_hash(url: str) -> str:
    """The hash of the chain's first block: it tells one devnet from a restarted one."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockByNumber", "params": ["0x0", False]})
    req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.loads(resp.read())["result"]["hash"])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _die_with_parent() -> None:
    """In the child, on Linux: be killed when the process that started this devnet dies, however
    it dies (a signal can end `tollway serve` before its cleanup runs). Linux ties this to the
    starting *thread*: start the devnet from a thread that lives as long as it should."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_anvil(port: int = 8545, *, block_time: float | None = None, timeout: float = 15.0) -> subprocess.Popen:
    """Start anvil on 127.0.0.1:``port`` and wait (≤ ``timeout`` s) until it answers RPC.

    The caller owns the returned process (``proc.terminate(); proc.wait()``). Raises
    ``RuntimeError`` if the port is already taken, anvil exits early or never becomes ready.
    """
    if _port_in_use(port):
        raise RuntimeError(f"cannot start anvil: 127.0.0.1:{port} is already in use")
    url = f"http://127.0.0.1:{port}"
    # stderr goes to a temp file (not a pipe) so a chatty node can never block on a full pipe;
    # the child keeps its own descriptor after we close ours.
    with tempfile.TemporaryFile() as errlog:
        proc = subprocess.Popen(
            anvil_command(port, block_time),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errlog,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if proc.poll() is not None:
                    errlog.seek(0)
                    err = errlog.read().decode(errors="replace").strip()
                    raise RuntimeError(f"anvil exited with code {proc.returncode}: {err or '(no output)'}")
                if rpc_alive(url, timeout=0.5):
                    return proc
                if time.monotonic() > deadline:
                    raise RuntimeError(f"anvil did not answer on {url} within {timeout:g} s")
                time.sleep(0.02)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
