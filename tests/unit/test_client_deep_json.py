"""JSON nested deeper than the C stack holds, from a hostile gateway, must not kill the paying
client's process. Importing eth_account (py_ecc) raises Python's recursion limit to 100,000, where
the standard library's parser overflows the C stack (a segfault) before it raises RecursionError.
Each client runs in a process of its own, against a gateway on 127.0.0.1: a crash is its exit code."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tollway.payments.x402 import b64json

KEY = "0x" + "4c" * 32
NETWORK = "eip155:8453"
USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
DEEP = b"[" * 300_000
# An error message orjson reads (1,000 deep) that a process at Python's default recursion limit cannot print
DEEP_MESSAGE = b'{"error":{"message":' + b"[" * 1000 + b"]" * 1000 + b"}}"


def mpp_challenge() -> str:
    """An MPP 402 whose ``request`` is ~96 kB of nesting (within httpx's limit on a response's head)."""
    request = base64.urlsafe_b64encode(b"[" * 72_000).decode().rstrip("=")
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
    params = {"id": "a", "realm": "gw", "method": "evm", "intent": "charge", "expires": expires, "request": request}
    return "Payment " + ", ".join(f'{k}="{v}"' for k, v in params.items())


class Hostile(BaseHTTPRequestHandler):
    """402 (MPP, or x402 exact), then a paid answer nested 300,000 deep (a 200, or an error)."""

    mpp, paid_status = False, 200

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = b"{}"
        if self.mpp:
            self.send_response(402)
            self.send_header("WWW-Authenticate", mpp_challenge())
        elif not self.headers.get("PAYMENT-SIGNATURE"):
            self.send_response(402)
            offer = {"scheme": "exact", "network": NETWORK, "asset": USDC, "amount": "1000", "maxTimeoutSeconds": 300}
            offer |= {"payTo": "0x" + "de" * 20, "extra": {"name": "USD Coin", "version": "2"}}
            self.send_header("PAYMENT-REQUIRED", b64json({"x402Version": 2, "accepts": [offer]}))
        else:
            self.send_response(self.paid_status)
            body = DEEP_MESSAGE if self.paid_status == 503 else DEEP
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(
    params=[(False, 200), (False, 502), (False, 503), (True, 0)], ids=["x402", "x402 error", "x402 message", "mpp"]
)
def hostile(request: pytest.FixtureRequest) -> Iterator[str]:
    mpp, paid_status = request.param
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Hostile,), {"mpp": mpp, "paid_status": paid_status}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)


def test_the_readme_openai_client_survives_it(hostile: str) -> None:
    """The SDK parses the answer itself: the client package leaves the recursion limit as it found it."""
    code = f"""
        import sys
        from tollway.client import AllowedAsset, Payer, PaymentRefused, openai_client
        assert sys.getrecursionlimit() == 1000, sys.getrecursionlimit()
        payer = Payer.from_key("{KEY}", [AllowedAsset("{NETWORK}", "{USDC}")], schemes=("exact",))
        client = openai_client("{hostile}/v1", payer, max_retries=0)
        try:
            client.chat.completions.create(model="m", messages=[{{"role": "user", "content": "hi"}}])
        except (PaymentRefused, Exception) as e:
            print("refused:", type(e).__name__)
    """
    done = run("-c", textwrap.dedent(code))
    assert done.returncode == 0, (done.returncode, done.stderr[-800:])
    assert "refused:" in done.stdout


@pytest.mark.parametrize("stream", [False, True])
def test_tollway_chat_survives_it(hostile: str, stream: bool) -> None:
    wallet = ["--url", hostile, "--key", KEY, "--allow", f"{NETWORK}:{USDC}"]
    done = run("-m", "tollway.cli", "chat", "hi", *wallet, *(["--stream"] if stream else []))
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, (done.returncode, done.stderr[-800:])
