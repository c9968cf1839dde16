"""``deploy/nginx.conf``, the file docker-compose.yml mounts, run by a real nginx in front of two real
gateway replicas sharing one PostgreSQL ledger: the config parses (``nginx -t``), a 402's headers
pass intact, a paid call is served, a stream arrives chunk by chunk, and nginx refuses no body the
gateway would take.

The shipped file is rendered for loopback with two substitutions only: its ``server gateway:8402
resolve;`` line (Docker's DNS) becomes the two replicas' ports, its ``listen 8402;`` a free port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from conftest import gateway_settings
from support import ADMIN, CHAT, ServerThread, chat_body, free_port, wait_receipt
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.payments.x402 import b64json, unb64json

NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
UPSTREAM_LINE = "server gateway:8402 resolve;"
LISTEN_LINE = "listen 8402;"


def render(upstream_ports: list[int], port: int, temp: Path) -> str:
    """The shipped config, for nginx on loopback in front of ``upstream_ports`` (temp files in ``temp``)."""
    conf = NGINX_CONF.read_text()
    for line in (UPSTREAM_LINE, LISTEN_LINE):
        assert conf.count(line) == 1, f"deploy/nginx.conf should hold `{line}` once (this test renders it)"
    conf = conf.replace(UPSTREAM_LINE, " ".join(f"server 127.0.0.1:{p};" for p in upstream_ports))
    conf = conf.replace(LISTEN_LINE, f"listen 127.0.0.1:{port};")
    # nginx's compiled-in temporary directories (/var/lib/nginx) are not ours to write
    temps = "".join(
        f"    {kind}_temp_path {temp / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    assert conf.count("http {\n") == 1
    return conf.replace("http {\n", "http {\n" + temps, 1)


@dataclass
class Recorder:
    """ASGI middleware keeping the response headers the gateway sent, and the request headers it
    got, by the request's X-Test-Id."""

    app: Any
    sent: dict[str, list[tuple[bytes, bytes]]] = field(default_factory=dict)
    got: dict[str, dict[bytes, bytes]] = field(default_factory=dict)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        tag = dict(scope.get("headers") or []).get(b"x-test-id")
        if tag:
            self.got[tag.decode()] = dict(scope.get("headers") or [])

        async def record(message: Any) -> None:
            if tag and message["type"] == "http.response.start":
                self.sent[tag.decode()] = list(message["headers"])
            await send(message)

        await self.app(scope, receive, record if tag else send)


@dataclass
class Deployment:
    url: str  # nginx
    replicas: list[str]  # the gateways, directly
    recorders: list[Recorder]
    settings: Any
    log: Path


def nginx_command(prefix: Path, conf: Path, *more: str) -> list[str]:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # not on a user's PATH
    if not nginx:
        raise RuntimeError("nginx is needed on PATH (Debian: apt-get install nginx; ./scripts/test installs it)")
    return [nginx, "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf), *more]


@pytest.fixture(scope="module")
def fresh_pg(postgres_url: str) -> Iterator[str]:
    name = f"nginx_{uuid.uuid4().hex[:12]}"
    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def nginx_prefix() -> Iterator[Path]:
    """nginx's own directory: world-traversable, as its workers run unprivileged when the tests run as root."""
    prefix = Path(tempfile.mkdtemp(prefix="tollway-nginx-"))
    prefix.chmod(0o755)
    yield prefix
    shutil.rmtree(prefix, ignore_errors=True)


@contextmanager
def running_nginx(conf_text: str, prefix: Path) -> Iterator[str]:
    """nginx on ``conf_text`` (already rendered), in the foreground as a subprocess; yields its URL."""
    prefix.mkdir(exist_ok=True)
    prefix.chmod(0o755)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    port = int(re.search(r"listen 127\.0\.0\.1:(\d+);", conf_text).group(1))  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    with (prefix / "nginx.out").open("wb") as out:
        proc = subprocess.Popen(
            nginx_command(prefix, conf, "-g", f"daemon off; pid {prefix / 'nginx.pid'};"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/nginx-healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(prefix / 'error.log').read_text(errors='replace')}")
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def deployment(devnet, upstream, fresh_pg, nginx_prefix, tmp_path_factory) -> Iterator[Deployment]:
    # Two replicas, one ledger, one settlement account of their own (shared through that ledger).
    settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path_factory.mktemp("unused") / "x.sqlite3")
    settings = settings.model_copy(update={"database_url": fresh_pg})
    recorders = [Recorder(create_app(settings)), Recorder(create_app(settings))]
    with ServerThread(recorders[0]) as a, ServerThread(recorders[1]) as b:
        prefix = nginx_prefix / "deployment"
        with running_nginx(render([a.port, b.port], free_port(), prefix), prefix) as url:
            yield Deployment(url, [a.url, b.url], recorders, settings, prefix / "nginx.out")


@pytest.fixture
def payer(chain, devnet) -> Payer:
    return Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])


def test_the_shipped_config_passes_nginx_t(nginx_prefix):
    prefix = nginx_prefix / "check"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(render([free_port(), free_port()], free_port(), prefix))
    check = subprocess.run(
        nginx_command(prefix, conf, "-t", "-g", f"pid {prefix / 'nginx.pid'};"), capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "syntax is ok" in check.stderr and "test is successful" in check.stderr, check.stderr


def test_an_unpaid_call_gets_the_402_with_its_headers_intact(deployment):
    served_by: list[int] = []
    for i in range(4):  # round robin: both replicas answer
        tag = f"unpaid-{i}-{uuid.uuid4().hex}"
        r = httpx.post(deployment.url + CHAT, json=chat_body("what does this cost?"), headers={"X-Test-Id": tag})
        assert r.status_code == 402, r.text
        replica = next(n for n, rec in enumerate(deployment.recorders) if tag in rec.sent)
        served_by.append(replica)
        sent = [v for k, v in deployment.recorders[replica].sent[tag] if k.lower() == b"payment-required"]
        got = [v for k, v in r.headers.raw if k.lower() == b"payment-required"]
        assert got == sent and len(got) == 1  # byte for byte what the gateway sent
        assert unb64json(got[0].decode())["accepts"], "a 402 without offers"
    assert set(served_by) == {0, 1}, served_by

    # ... and it is byte for byte what a replica answers directly (asked with the same Host; the
    # quote's expiry is in whole seconds: asked again if a second ticked between the two)
    host = {"Host": deployment.url.removeprefix("http://")}
    for _ in range(3):
        via = httpx.post(deployment.url + CHAT, json=chat_body("what does this cost?"))
        direct = httpx.post(deployment.replicas[0] + CHAT, json=chat_body("what does this cost?"), headers=host)
        if via.headers["payment-required"] == direct.headers["payment-required"]:
            break
    assert direct.status_code == via.status_code == 402
    assert via.headers.get_list("payment-required") == direct.headers.get_list("payment-required")
    assert via.content == direct.content


def stub_402(header: bytes) -> Any:
    """An ASGI app answering every request with a 402 carrying ``header`` as PAYMENT-REQUIRED."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b'{"error": {"message": "payment required", "type": "payment_required", "code": "payment_required"}}'
        await send(
            {
                "type": "http.response.start",
                "status": 402,
                "headers": [
                    (b"payment-required", header),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def test_a_402_of_8_kb_passes_where_stock_nginx_fails(deployment, nginx_prefix):
    """The gateway's 402 grows with every offer (schemes x assets, their extras); the shipped buffers
    hold one of about 8 KB, where nginx's stock 4 KB buffer answers 502 "upstream sent too big header"."""
    real = unb64json(httpx.post(deployment.replicas[0] + CHAT, json=chat_body("price")).headers["payment-required"])
    offers = real["accepts"]
    while len(b64json(real)) < 7_000:  # what a gateway with more schemes and assets offers
        real["accepts"] = real["accepts"] + offers[: 1 + len(real["accepts"]) % len(offers)]
    header = b64json(real).encode()
    assert 7_000 < len(header) < 9_000, len(header)
    with ServerThread(stub_402(header)) as stub:
        shipped = render([stub.port], free_port(), nginx_prefix / "big-402")
        with running_nginx(shipped, nginx_prefix / "big-402") as url:
            r = httpx.post(url + CHAT, json=chat_body("price"))
            assert r.status_code == 402 and r.headers.raw.count((b"payment-required", header)) == 1

        stock = re.sub(r"\n\s*proxy_buffer(?:_size|s) [^;]*;[^\n]*", "", shipped)  # nginx's defaults: one 4 KB page
        assert "proxy_buffer_size" not in stock and "proxy_buffering off" in stock
        with running_nginx(stock, nginx_prefix / "big-402-stock") as url:
            assert httpx.post(url + CHAT, json=chat_body("price")).status_code == 502


def test_a_paid_call_is_served_through_nginx(deployment, payer):
    with httpx.Client(transport=SyncPayingTransport(payer), base_url=deployment.url, timeout=30) as http:
        r = http.post(CHAT, json=chat_body("paid through nginx"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("echo:")
    assert r.headers["payment-response"]
    receipt = wait_receipt(deployment.url, r.headers["x-tollway-receipt"])  # read back through nginx
    assert receipt["payment"]["transaction"] == payer.history[-1].transaction


def test_a_paid_stream_arrives_chunk_by_chunk(deployment, payer):
    body = chat_body("one two three four five six seven eight", max_tokens=8, stream=True, mock={"chunk_delay": 0.2})
    arrivals: list[float] = []
    pending = b""
    with (
        httpx.Client(transport=SyncPayingTransport(payer), base_url=deployment.url, timeout=30) as http,
        http.stream("POST", CHAT, json=body) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for raw in r.iter_raw():
            pending += raw
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: {"):
                    delta = json.loads(event[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        arrivals.append(time.monotonic())
    assert len(arrivals) >= 6, arrivals
    # The mock produces a chunk every 0.2 s: the first must reach us long before the last is produced.
    assert arrivals[-1] - arrivals[0] >= 0.2 * (len(arrivals) - 1) * 0.7, [round(t - arrivals[0], 2) for t in arrivals]


def test_nginx_refuses_no_body_the_gateway_takes(deployment):
    limit = deployment.settings.max_body_bytes
    envelope = len(json.dumps(chat_body("")).encode())

    def body_of(size: int) -> bytes:
        raw = json.dumps(chat_body("x" * (size - envelope))).encode()
        assert len(raw) == size
        return raw

    headers = {"Content-Type": "application/json"}
    under = httpx.post(deployment.url + CHAT, content=body_of(limit - 1024), headers=headers, timeout=60)
    assert under.status_code == 402, under.text[:300]  # priced by the gateway, not refused by nginx

    # Beyond the gateway's limit, the refusal is the gateway's own (JSON, a stable code), passed through.
    over = body_of(limit + 1024)
    direct = httpx.post(deployment.replicas[0] + CHAT, content=over, headers=headers, timeout=60)
    via = httpx.post(deployment.url + CHAT, content=over, headers=headers, timeout=60)
    assert direct.status_code in (400, 413), direct.text[:300]
    assert via.status_code == direct.status_code and via.json() == direct.json()
    assert via.json()["error"]["code"] == "body_too_large"


def test_admin_views_pass_and_nginx_identifies_nothing(deployment):
    r = httpx.get(f"{deployment.url}/healthz", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert "nginx/" not in r.headers.get("server", "")  # server_tokens off
    assert os.path.getsize(deployment.log) > 0  # the access log goes to nginx's stdout (docker logs)


def test_a_client_cannot_name_its_own_address_through_nginx(deployment):
    """nginx is the edge: X-Forwarded-For reaches the gateway as the address nginx saw, whatever
    the client wrote in its own (the free tier counts clients by it)."""
    tag = uuid.uuid4().hex
    headers = {"X-Test-Id": tag, "X-Forwarded-For": "203.0.113.9"}
    assert httpx.post(deployment.url + CHAT, json=chat_body("who am I"), headers=headers).status_code == 402
    (got,) = [r.got[tag] for r in deployment.recorders if tag in r.got]
    assert got[b"x-forwarded-for"] == b"127.0.0.1", got
