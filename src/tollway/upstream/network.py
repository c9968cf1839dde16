"""The upstream's httpx transport, on aiohttp (a C HTTP parser and connection pool).

httpx stays the API the gateway calls the upstream with; below it, httpcore + h11 parse HTTP in
pure Python, and under load that cost a fifth to a third of the gateway's CPU. ``AiohttpTransport``
hands each request to one ``aiohttp.ClientSession`` instead and gives httpx back a response whose
body streams from aiohttp chunk by chunk, as the bytes arrive (never the whole body at once).

What it keeps of httpx's own transport:
- timeouts per request, from httpx's ``timeout`` extension: ``connect`` bounds the TCP and TLS
  handshake, ``read`` each wait for bytes (the headers' and every chunk's), ``pool`` the wait for
  a free connection plus the connect; there is no ``write`` timeout (aiohttp has none);
- one pool of at most ``limits.max_connections`` connections, idle ones kept for
  ``limits.keepalive_expiry`` seconds; TCP_NODELAY (aiohttp sets it); TLS verified against httpx's
  certificates (certifi, or ``SSL_CERT_FILE``) unless an ``ssl.SSLContext`` is given;
- httpx's error types, where the request is sent and inside the body's iteration (``_ERRORS``):
  a refused, unresolvable or untrusted connection is a ``ConnectError``; a connect or pool wait
  that timed out a ``ConnectTimeout``, a read that did a ``ReadTimeout``; a peer that closed
  before answering or cut a body short (or answered garbage) a ``RemoteProtocolError``, as with
  h11; a reset connection a ``ReadError``. (PyPI's ``httpx-aiohttp`` 0.2.0, which the first
  choice was, maps a refused connection and a server disconnect to ``ConnectTimeout``: the router
  and the payer would be told "timed out" of an upstream that is down.)
- content-encoding: the gateway asks for none; a body compressed anyway (gzip, deflate) is decoded
  here in steps of at most 64 KiB, so the body cap stops a gzip bomb; any other encoding fails;
- closing: a response closed before its body ended closes its connection (a half-read body never
  goes back to the pool); one read to the end returns it to the pool; ``aclose`` closes the session.

Like the httpcore transport it replaces, it speaks HTTP/1.1 and uses no proxy (httpx ignores the
environment's proxies when it is given a transport); cookies stay the httpx client's business.
"""

from __future__ import annotations

import contextlib
import ssl
import zlib
from collections.abc import AsyncIterator, Iterator
from functools import lru_cache

import aiohttp
import httpx
from yarl import URL

# Most specific first: the first class the aiohttp error is an instance of decides.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (TimeoutError, httpx.ReadTimeout),  # ServerTimeoutError and any other timeout
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, DNS, TLS (certificate) failures
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.ReadError),  # ClientOSError (reset), other connection errors
    (OSError, httpx.ReadError),
)

MAX_HEADER_LINE = 16 * 1024  # h11's bound on a whole header block; aiohttp's own default is 8 KiB a line


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        for theirs, ours in _ERRORS:
            if isinstance(exc, theirs):
                raise ours(str(exc) or type(exc).__name__) from exc
        raise


@lru_cache(maxsize=64)  # a few distinct timeouts in a process (one per upstream)
@lru_cache(maxsize=64)  # (an upstream's timeouts are the same on every request)
def _client_timeout(connect: float | None, read: float | None, pool: float | None) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=pool, sock_connect=connect, sock_read=read)


@lru_cache(maxsize=256)  # (the upstreams' few URLs, parsed once)
def _yarl(url: str) -> URL:
    """The URL exactly as httpx encoded it."""
    return URL(url, encoded=True)


DECODE_STEP = 64 * 1024  # the most one step of decoding a compressed body may produce


class AiohttpBody(httpx.AsyncByteStream):
    """An aiohttp response's body as httpx's stream: each chunk as it arrives — decoded, if the
    upstream compressed it although it was asked not to, a bounded step at a time (httpx's own
    decoder inflates a whole network chunk at once: a gzip bomb's 64 KiB became 64 MiB)."""

    def __init__(self, response: aiohttp.ClientResponse, encoding: str) -> None:
        self.response = response
        self.ended = False
        self.encoding = encoding

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            raise httpx.DecodingError(f"unsupported content-encoding {self.encoding[:40]!r}")
        decoder = None if self.encoding in ("", "identity") else zlib.decompressobj(wbits=47)  # gzip or zlib
        content = self.response.content
        with _httpx_errors():
            while chunk := await content.readany():
                while decoder is not None and chunk:
                    try:
                        part = decoder.decompress(chunk, DECODE_STEP)
                    except zlib.error as exc:
                        raise httpx.DecodingError(f"bad {self.encoding} body: {exc}") from exc
                    chunk = decoder.unconsumed_tail
                    if part:
                        yield part
                if decoder is None:
                    yield chunk
        self.ended = True

    async def aclose(self) -> None:
        if self.ended:
            self.response.release()  # read to the end: aiohttp has already put the connection back
        else:
            self.response.close()  # abandoned midway: the connection is closed, never reused


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> None:
        self.limits = limits
        self.ssl: ssl.SSLContext | bool = verify if isinstance(verify, ssl.SSLContext) else False
        if verify is True:
            self.ssl = httpx.create_ssl_context(verify=True)
        self.session: aiohttp.ClientSession | None = None  # made on the first request, inside the event loop

    def _session(self) -> aiohttp.ClientSession:
        limits = self.limits
        keepalive = {} if limits.keepalive_expiry is None else {"keepalive_timeout": limits.keepalive_expiry}
        connector = aiohttp.TCPConnector(limit=limits.max_connections or 0, ssl=self.ssl, **keepalive)
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # AiohttpBody decodes, in bounded steps
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.session is None:
            self.session = self._session()
        timeout = request.extensions.get("timeout", {})
        headers = request.headers.multi_items()
        try:
            data: bytes | httpx.AsyncByteStream | None = request.content or None
        except httpx.RequestNotRead:  # a streamed request body: aiohttp sends it chunked itself
            data = request.stream  # type: ignore[assignment]
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        with _httpx_errors():
            response = await self.session.request(
                request.method,
                _yarl(str(request.url)),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=_client_timeout(timeout.get("connect"), timeout.get("read"), timeout.get("pool")),
            )
        encoding = response.headers.get("content-encoding", "").strip().lower()
        decoded = [(k, v) for k, v in response.raw_headers if k.lower() not in (b"content-encoding", b"content-length")]
        return httpx.Response(
            status_code=response.status,
            headers=decoded if encoding else response.raw_headers,  # (what reaches httpx is decoded)
            stream=AiohttpBody(response, encoding),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()


def aiohttp_transport(limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> AiohttpTransport:
    """The upstream client's transport: ``httpx.AsyncClient(transport=aiohttp_transport(limits))``."""
    return AiohttpTransport(limits, verify)
