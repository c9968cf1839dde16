"""The `tollway` CLI as a user runs it: `tollway serve` with nothing configured (its own anvil,
test token and mock upstream), then `tollway chat` and an external x402 client paying over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
from eth_account import Account
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import ExactEvmScheme

from support import TOLLWAY


def test_serve_prints_how_to_pay(served):
    log = served.log
    text = log.read_text()
    assert "tollway chat" in text and "eip155:31337" in text


def test_tollway_chat_pays_and_prints_the_settlement(served):
    url, cwd = served.url, served.cwd
    for stream in ([], ["--stream"]):
        out = subprocess.run(
            [TOLLWAY, "chat", "--url", url, "Hello from the CLI", *stream],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "echo: Hello from the CLI" in out.stdout
        assert "cost 0.0000" in out.stderr and "settlement 0x" in out.stderr, out.stderr
        # upto, preferred: the maximum it authorised, and what moved — the cost, not the maximum
        paid = next(line for line in out.stderr.splitlines() if line.startswith("paid with upto"))
        authorised, settled = (Decimal(part.split()[1]) for part in paid.split(": ", 1)[1].split(", "))
        cost = Decimal(out.stderr.split("cost ", 1)[1].split()[0])
        assert settled == cost < authorised, out.stderr


async def test_an_official_x402_client_pays_the_served_gateway(served):
    url, cwd = served.url, served.cwd
    devnet = json.loads((cwd / "var" / "devnet.json").read_text())
    account = Account.from_key(devnet["payer_keys"][-1])
    client = x402Client()
    client.register("eip155:31337", ExactEvmScheme(account))
    client.set_spend_controls(
        {"allowed_assets": [{"network": "eip155:31337", "asset": devnet["token"], "max_amount_per_payment": "1000000"}]}
    )
    async with x402HttpxClient(client) as http:
        r = await http.post(
            f"{url}/v1/chat/completions", json={"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
        )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: hi"
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"mock/echo", "mock/echo-large"}


def test_tollway_chat_explains_instead_of_a_traceback(served, tmp_path):
    url, cwd = served.url, served.cwd

    def chat(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TOLLWAY, "chat", *args], cwd=cwd, capture_output=True, text=True, timeout=60)

    with_v1 = chat("--url", f"{url}/v1", "a base URL with v1", "--max-tokens", "16")
    assert with_v1.returncode == 0 and "echo: a base URL with v1" in with_v1.stdout
    bad_key = chat("--url", url, "--key", "0xnot-a-key", "hello")
    assert bad_key.returncode == 2 and "--key must be a 32-byte hex private key" in bad_key.stderr
    down = chat("--url", "http://127.0.0.1:9", "hello")
    assert down.returncode == 1 and "cannot reach the gateway" in down.stderr
    unknown = chat("--no-such-flag", "hello")
    assert unknown.returncode == 2 and "unrecognized arguments" in unknown.stderr
    for out in (bad_key, down, unknown):
        assert "Traceback" not in out.stderr


def test_the_readmes_pay_from_an_agent_runs_as_written(served):
    """Each Python snippet of the README's "Pay from an agent" section, run as a user would (in
    the directory `./scripts/serve` runs in), against the served gateway (on its own port here)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Pay from an agent", 1)[1].split("\n## ", 1)[0]
    snippets = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(snippets) == 2
    for code in snippets:
        code = code.replace("http://127.0.0.1:8402", served.url)
        out = subprocess.run([sys.executable, "-c", code], cwd=served.cwd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "echo: Hello" in out.stdout
