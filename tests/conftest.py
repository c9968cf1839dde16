"""Session fixtures: a real anvil (pytest-xprocess), the deployed test token, the mock upstream
and a gateway, each on a real port; PostgreSQL and llama-server for the tests that need them; and
`tollway serve` as a user starts it, for the end-to-end tests."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from xprocess import ProcessStarter

from support import ADMIN_TOKEN, TOLLWAY, Chain, ServerThread, free_port, with_own_settler
from tollway.app import create_app
from tollway.config import Settings, apply_devnet
from tollway.devnet.anvil import anvil_command, rpc_alive
from tollway.devnet.deploy import Devnet, deploy_devnet
from tollway.ledger import Store
from tollway.mock_upstream import create_app as create_mock


@contextmanager
def anvil_process(xprocess, name: str, chain_id: int = 31337) -> Iterator[str]:
    """anvil under xprocess as ``name`` (made unique per test session: runs may overlap), for the
    ``with`` block; its RPC URL."""
    name = f"{name}-{os.getpid()}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = anvil_command(port)
    if chain_id != 31337:
        args[args.index("--chain-id") + 1] = str(chain_id)

    class Starter(ProcessStarter):
        timeout = 30
        terminate_on_interrupt = True

        @property
        def args(self) -> list[str]:
            return args

        def startup_check(self) -> bool:
            return rpc_alive(url)

    xprocess.ensure(name, Starter, restart=True)
    try:
        yield url
    finally:
        xprocess.getinfo(name).terminate()


@pytest.fixture(scope="session")
def anvil(xprocess) -> Iterator[str]:
    with anvil_process(xprocess, "anvil") as url:
        yield url


@pytest.fixture(scope="session")
def devnet(anvil: str) -> Devnet:
    return deploy_devnet(anvil)


@pytest.fixture(scope="session")
def chain(devnet: Devnet) -> Chain:
    return Chain(devnet)


@pytest.fixture(scope="session")
def upstream() -> Iterator[ServerThread]:
    with ServerThread(create_mock()) as server:
        yield server


@dataclass
class GatewayHandle:
    url: str
    settings: Settings
    store: Store  # a second connection to the gateway's ledger, as another replica would have


def gateway_settings(devnet: Devnet, upstream_url: str, db: Path, *, own_settler: bool = True, **overrides) -> Settings:
    """Settings for a gateway on the devnet. Unless it shares a ledger with another gateway, it
    gets a settlement account of its own: gateways with separate ledgers must not share one (each
    would count that account's nonces on its own). Withdrawals of any size are allowed (the tests
    move small amounts; the minimum has a test of its own)."""
    overrides = {"min_withdrawal_usd": Decimal(0), **overrides}
    base = Settings(
        database_url=f"sqlite:///{db}", quote_secret="test-quote-secret-0123", admin_token=ADMIN_TOKEN, **overrides
    )
    settings = apply_devnet(base, devnet, upstream_url)
    return with_own_settler(settings) if own_settler else settings


@pytest.fixture(scope="session")
def gateway(devnet: Devnet, upstream: ServerThread, tmp_path_factory) -> Iterator[GatewayHandle]:
    db = tmp_path_factory.mktemp("ledger") / "tollway.sqlite3"
    settings = gateway_settings(devnet, upstream.url + "/v1", db, own_settler=False)  # pays withdrawals too
    with ServerThread(create_app(settings)) as server:
        store = Store(settings.database_url)
        yield GatewayHandle(server.url, settings, store)
        store.close()


PG_USER = "tollway-pg"


def _as_pg_user(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as an unprivileged user (created if needed)."""
    import pwd
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return args
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
    return [shutil.which("runuser") or "runuser", "-u", PG_USER, "--", *args]


@pytest.fixture(scope="session")
def postgres_url(xprocess, tmp_path_factory) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb + postgres from PATH), as the replicas' shared ledger."""
    import shutil
    import subprocess

    import psycopg

    if not shutil.which("initdb"):
        raise RuntimeError("PostgreSQL binaries (initdb, postgres) are needed on PATH for the replica tests")
    root = tmp_path_factory.mktemp("pg")
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        _as_pg_user(["true"])
        shutil.chown(root, PG_USER)
        shutil.chown(sock, PG_USER)
        for up in (root.parent, root.parent.parent):  # (the cluster's user must reach its folder: add, never take away)
            up.chmod(stat.S_IMODE(up.stat().st_mode) | 0o055)  # (a --basetemp in /tmp: 1777 stays 1777)
    subprocess.run(
        _as_pg_user(["initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def ready() -> bool:
        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    class Starter(ProcessStarter):
        timeout = 30
        terminate_on_interrupt = True

        @property
        def args(self) -> list[str]:
            return _as_pg_user(
                [
                    "postgres",
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-k",
                    str(sock),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                ]
            )

        def startup_check(self) -> bool:
            return ready()

    xprocess.ensure(f"postgres-{os.getpid()}", Starter, restart=True)
    yield url
    xprocess.getinfo(f"postgres-{os.getpid()}").terminate()


@pytest.fixture(scope="session")
def llama_upstream(xprocess) -> Iterator[str]:
    """A real llama.cpp llama-server serving a tiny random-weight model; yields its base URL (…/v1)."""
    yield from _llama_server(xprocess, "llama-server")


@pytest.fixture(scope="session")
def llama_embeddings_upstream(xprocess) -> Iterator[str]:
    """A second llama-server, serving embeddings (``--embeddings``, mean pooling: OpenAI's shape)."""
    yield from _llama_server(xprocess, "llama-embeddings", "--embeddings", "--pooling", "mean")


def _llama_server(xprocess, name: str, *extra: str) -> Iterator[str]:
    import httpx

    from llama import llama_server_binary, llama_server_command, tiny_model

    binary = llama_server_binary()  # builds it the first time (minutes), then instant
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [*llama_server_command(binary, tiny_model(binary), port), *extra]

    class Starter(ProcessStarter):
        timeout = 60
        terminate_on_interrupt = True

        @property
        def args(self) -> list[str]:
            return args

        def startup_check(self) -> bool:
            try:  # 503 while the model loads, 200 once it serves
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

    name = f"{name}-{os.getpid()}"
    xprocess.ensure(name, Starter, restart=True)
    yield f"{url}/v1"
    xprocess.getinfo(name).terminate()


# -- `tollway serve` as a user starts it (end-to-end tests) ----------------------------------


@dataclass
class Served:
    url: str  # the gateway
    mock_url: str  # its built-in mock upstream
    cwd: Path  # where it runs (var/devnet.json is there)
    log: Path  # what it printed


@pytest.fixture(scope="session")
def served(xprocess, tmp_path_factory) -> Iterator[Served]:
    """`tollway serve` in an empty directory, on free ports."""
    cwd = tmp_path_factory.mktemp("serve")
    port, mock_port, devnet_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    class Starter(ProcessStarter):
        timeout = 60
        env = clean_env
        terminate_on_interrupt = True
        popen_kwargs: ClassVar[dict[str, str]] = {"cwd": str(cwd)}

        @property
        def args(self) -> list[str]:
            ports = ["--port", str(port), "--mock-port", str(mock_port), "--devnet-port", str(devnet_port)]
            return [TOLLWAY, "serve", *ports]

        def startup_check(self) -> bool:
            return up()

    name = f"tollway-serve-{os.getpid()}"
    _, log = xprocess.ensure(name, Starter, restart=True)
    yield Served(url, f"http://127.0.0.1:{mock_port}", cwd, Path(log))
    xprocess.getinfo(name).terminate()
