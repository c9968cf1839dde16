"""The operator's path, as an operator runs it: `tollway serve` and `tollway doctor` started as
commands, with configuration files and variables, reading what they print.

A configuration never silently turns into something else: unknown keys, placeholders, missing
settings, a chain id the RPC contradicts, the devnet's public keys on a real chain — each stops
the gateway with one clear line. The devnet runs only when asked or when nothing is configured,
and never mixes two chains' money. The real-chain path is rehearsed on an anvil started as an
outside chain (Base Sepolia's chain id, a token at Base Sepolia's USDC address, keys from files).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from web3 import Web3

from support import TOLLWAY, clean_env, credit, free_port, serve_process, stop_process
from tollway.devnet.deploy import deploy_devnet, token_contract

BASE_SEPOLIA_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
ANVIL_ACCOUNT_1 = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"  # its key is public


def tollway(args: list[str], cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOLLWAY, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout
    )


def serve_refused(cwd: Path, *args: str, **env: str) -> str:
    """`tollway serve` must stop at once with status 2; returns what it printed."""
    devnet_port = free_port()
    out = tollway(["serve", "--port", str(free_port()), "--devnet-port", str(devnet_port), *args], cwd, **env)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    with pytest.raises(httpx.HTTPError):  # and it started no devnet on the way
        httpx.post(f"http://127.0.0.1:{devnet_port}", json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"})
    return out.stderr


def write(cwd: Path, text: str) -> Path:
    path = cwd / "tollway.toml"
    path.write_text(text)
    return path


def test_a_typo_in_a_nested_key_is_an_error_not_a_devnet(tmp_path):
    write(tmp_path, '[chain]\nrpc-url = "https://mainnet.base.org"\n')
    assert "chain.rpc-url: unknown setting" in serve_refused(tmp_path)


def test_a_half_written_configuration_is_an_error(tmp_path):
    write(tmp_path, '[upstream]\nurl = "https://openrouter.ai/api/v1"\n')
    printed = serve_refused(tmp_path)
    for missing in ("chain.rpc_url", "chain.token", "chain.payee", "chain.settler_key", "models"):
        assert f"{missing}: not set" in printed or f"{missing}: no model" in printed, printed


def test_the_example_left_as_it_is_does_not_serve(tmp_path):
    example = (Path(__file__).parents[2] / "tollway.example.toml").read_text()
    write(tmp_path, example)
    printed = serve_refused(tmp_path)
    assert "chain.payee: not set" in printed and "chain.settler_key: not set" in printed


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('payee = "0xYourPayeeAddress"', "chain.payee: chain.payee still holds the example's placeholder"),
        ('settler_key = "0x..."', "chain.settler_key: chain.settler_key still holds the example's placeholder"),
        ('token = "0x1234"', "chain.token: chain.token must be a 0x-prefixed 20-byte hex address"),
    ],
)
def test_placeholders_and_malformed_values_are_refused(tmp_path, line, says):
    write(tmp_path, f'[chain]\nrpc_url = "http://127.0.0.1:1"\n{line}\n')
    assert says in serve_refused(tmp_path)


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ('schemes = ["exact", "credits"]\n', "schemes: unknown payment schemes ['credits']"),
        (
            '[[upstreams]]\nname = "r"\nurl = "http://127.0.0.1:1/v1"\n[[upstreams]]\nname = "r"\nurl = "http://127.0.0.1:2/v1"\n',
            "upstream names must be unique: ['r', 'r']",
        ),
        (
            f'[upstream]\nurl = "http://127.0.0.1:1/v1"\npayer_key = "0x{"2" * 64}"\n',
            "upstream default: payer_key needs pay_assets",
        ),
    ],
)
def test_what_the_gateway_could_not_be_built_with_is_refused_in_a_line(tmp_path, toml, says):
    """A misspelt scheme, two upstreams of one name, a paying upstream with nothing to pay in:
    `tollway serve` (and `tollway doctor`) stopped with a traceback. (Review.)"""
    write(tmp_path, toml)
    printed = serve_refused(tmp_path)
    assert says in printed and "Traceback" not in printed, printed


def test_an_example_secret_is_refused(tmp_path):
    write(tmp_path, 'quote_secret = "change-me: a long random string shared by all replicas"\n')
    assert "quote_secret still holds the example's placeholder" in serve_refused(tmp_path)


def test_devnet_with_a_chain_setting_is_an_error(tmp_path):
    write(tmp_path, '[chain]\nrpc_url = "https://mainnet.base.org"\n')
    assert "--devnet runs its own chain and token: remove chain.rpc_url" in serve_refused(tmp_path, "--devnet")


def test_a_secret_file_that_cannot_be_read_is_one_line(tmp_path):
    printed = serve_refused(tmp_path, TOLLWAY_CHAIN__SETTLER_KEY_FILE=str(tmp_path / "missing"))
    assert "TOLLWAY_CHAIN__SETTLER_KEY_FILE: cannot read" in printed


# -- a devnet restart never carries the old chain's money -------------------------------------------------


def credit_of(url: str, key: str, devnet: dict[str, Any]) -> int:
    from tollway.client import AllowedAsset, Payer

    return credit(url, Payer.from_key(key, [AllowedAsset(f"eip155:{devnet['chain_id']}", devnet["token"])]))


def test_a_restarted_devnet_starts_a_ledger_of_its_own(tmp_path):
    args = ["--devnet", "--devnet-port", str(free_port()), "--mock-port", str(free_port())]
    proc, url = serve_process(tmp_path, args)
    try:
        chat = tollway(["chat", "--url", url, "fund some credit", "--max-tokens", "8", "--scheme", "exact"], tmp_path)
        assert chat.returncode == 0, chat.stderr
        devnet = json.loads((tmp_path / "var" / "devnet.json").read_text())
        key = devnet["payer_keys"][0]
        time.sleep(1)
        assert credit_of(url, key, devnet) > 0
    finally:
        stop_process(proc)  # and its anvil with it
    proc, url = serve_process(tmp_path, args)  # a new anvil: a new chain
    try:
        assert credit_of(url, key, json.loads((tmp_path / "var" / "devnet.json").read_text())) == 0
    finally:
        stop_process(proc)
    assert len(list((tmp_path / "var").glob("devnet-31337-*.sqlite3"))) == 2


# -- the real-chain path, rehearsed on an outside anvil ---------------------------------------------------


@pytest.fixture(scope="module")
def outside_chain(xprocess, upstream) -> Iterator[dict[str, Any]]:
    """An anvil started as someone else's chain would be: Base Sepolia's chain id and a USDC at
    Base Sepolia's address; a payee, a settlement key with gas, and a funded payer."""
    from conftest import anvil_process

    with anvil_process(xprocess, "outside", chain_id=84532) as rpc:
        yield outside_accounts(rpc, upstream)


def outside_accounts(rpc: str, upstream) -> dict[str, Any]:
    w3 = Web3(Web3.HTTPProvider(rpc))
    deployed = deploy_devnet(rpc)  # TestUSDC somewhere; its code is then placed at USDC's address
    w3.provider.make_request("anvil_setCode", [BASE_SEPOLIA_USDC, w3.eth.get_code(deployed.token).hex()])
    owner = Account.from_key(deployed.deployer_key)
    token = token_contract(w3, BASE_SEPOLIA_USDC)
    payee, settler, payer = Account.create(), Account.create(), Account.create()
    w3.provider.make_request("anvil_setBalance", [settler.address, hex(10**18)])
    for who in (payer.address, payee.address):
        tx = token.functions.mint(who, 50_000_000).build_transaction(
            {"from": owner.address, "nonce": w3.eth.get_transaction_count(owner.address, "pending"), "gas": 100_000}
        )
        w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(owner.sign_transaction(tx).raw_transaction))
    return {"rpc": rpc, "payee": payee, "settler": settler, "payer": payer, "mock": upstream.url + "/v1"}


def real_config(cwd: Path, chain: dict[str, Any], port: int, **changes: str) -> dict[str, str]:
    """A configuration for the outside chain, its settlement key in a file; returns the env."""
    key_file = cwd / "settler.key"
    key_file.write_text("0x" + bytes(chain["settler"].key).hex() + "\n")
    values = {
        "public_url": f'"http://127.0.0.1:{port}"',
        "rpc_url": f'"{chain["rpc"]}"',
        "chain_id": "84532",
        "payee": f'"{chain["payee"].address}"',
        **changes,
    }
    write(
        cwd,
        f"""public_url = {values["public_url"]}
database_url = "sqlite:///{cwd / "ledger.sqlite3"}"
admin_token = "a-real-operator-token"

[chain]
rpc_url = {values["rpc_url"]}
chain_id = {values["chain_id"]}
token = "{BASE_SEPOLIA_USDC}"
token_name = "USD Coin"
payee = {values["payee"]}

[upstream]
url = "{chain["mock"]}"

[models."mock/echo"]
prompt = "0.000001"
completion = "0.000002"
""",
    )
    return {"TOLLWAY_CHAIN__SETTLER_KEY_FILE": str(key_file)}


def test_doctor_passes_a_good_configuration(tmp_path, outside_chain):
    env = real_config(tmp_path, outside_chain, free_port())
    out = tollway(["doctor"], tmp_path, **env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok    chain: eip155:84532" in out.stdout and "ready to serve" in out.stdout
    assert "ok    upstream default: serves 1 models" in out.stdout
    assert "ok    chain.rpc_url: simulates payments that arrive together in one eth_simulateV1" in out.stdout


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"chain_id": "8453"}, "chain.chain_id: set to 8453 but the RPC serves chain 84532"),
        ({"payee": f'"{ANVIL_ACCOUNT_1}"'}, "chain.payee: is a devnet account whose private key is public"),
    ],
)
def test_doctor_and_serve_refuse_a_contradicted_configuration(tmp_path, outside_chain, change, says):
    env = real_config(tmp_path, outside_chain, free_port(), **change)
    out = tollway(["doctor"], tmp_path, **env)
    assert out.returncode == 1 and says in out.stdout, out.stdout
    assert says in serve_refused(tmp_path, **env)


def test_public_url_is_required_on_a_real_chain(tmp_path, outside_chain):
    env = real_config(tmp_path, outside_chain, free_port())
    text = (tmp_path / "tollway.toml").read_text().replace("public_url =", "# public_url =", 1)
    write(tmp_path, text)
    assert "public_url: required on a real chain" in serve_refused(tmp_path, **env)


async def test_serve_takes_real_payments_without_a_devnet(tmp_path, outside_chain):
    """`tollway serve` with the configuration (no --devnet): the official x402 client pays it."""
    from x402 import x402Client
    from x402.http.clients import x402HttpxClient
    from x402.mechanisms.evm.exact import ExactEvmScheme

    port = free_port()
    env = real_config(tmp_path, outside_chain, port)
    proc, url = serve_process(tmp_path, [], env, port=port)
    try:
        client = x402Client()
        client.register("eip155:84532", ExactEvmScheme(outside_chain["payer"]))
        async with x402HttpxClient(client) as http:
            r = await http.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "mock/echo",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "on the outside chain"}],
                },
            )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: on the outside chain"
    finally:
        printed = stop_process(proc)
    assert "devnet" not in printed and "eip155:84532" in printed  # the configured chain, no anvil of its own


def test_a_ledger_database_that_cannot_be_reached_stops_serve_with_one_line(tmp_path, outside_chain):
    """Not a traceback of the database driver's (and never the URL's password)."""
    env = real_config(tmp_path, outside_chain, free_port())
    env["TOLLWAY_DATABASE_URL"] = f"postgresql+psycopg://tollway:S3cretPw@127.0.0.1:{free_port()}/tollway"
    out = tollway(["serve", "--port", str(free_port())], tmp_path, **env)
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)
    assert "tollway cannot start: the ledger database cannot be used" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "S3cretPw" not in out.stderr, out.stderr


def test_a_terminated_gateway_finishes_and_closes_before_it_exits(tmp_path):
    """`docker stop` and systemd send SIGTERM: uvicorn finishes the calls it serves, then the
    gateway closes (its settlement worker, its ledger) and the process exits 0 — it is not killed by
    the signal uvicorn raises again once it has served."""
    args = ["--devnet", "--devnet-port", str(free_port()), "--mock-port", str(free_port())]
    proc, _ = serve_process(tmp_path, args)
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert "tollway stopped" in proc.log.read_text()  # type: ignore[attr-defined]
