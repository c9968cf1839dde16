"""The upstream: one pooled ``httpx.AsyncClient`` per process, errors translated where they enter.

``send`` returns once the call is *committed*: the upstream answered 200 and produced its first
bytes (the whole body when not streaming). Anything that fails before that raises an
``UpstreamError`` and the payer is not charged; after it, the rest of the stream is relayed by
``Opened.rest`` which turns transport failures into an end of stream plus an ``error`` note.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, cast
from urllib.parse import unquote, unquote_plus, urlsplit

import httpx

from .. import __version__
from ..client.payer import PaymentRefused
from ..client.transport import MAX_USD
from ..config import UpstreamSettings
from ..errors import (
    BadRequest,
    UpstreamDown,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnavailable,
    UpstreamUnreachable,
    truncate,
)
from ..jsonbytes import loads
from ..usage import Usage, answer_doc, parse_usage, stream_error
from .h1 import h1_transport

log = logging.getLogger("tollway.upstream")

MAX_BODY = 32 * 1024 * 1024
MAX_PREAMBLE = 1024 * 1024  # bytes a stream may send (comments, opening events) before its first answer
MAX_ERROR_BODY = 64 * 1024  # of an upstream's error answer, what is read (the rest is dropped)
PASS_HEADERS = ("x-session-id", "http-referer", "x-title")
USER_AGENT = f"tollway/{__version__}"
ANTHROPIC_VERSION = "2023-06-01"  # sent with a Messages call whose client names none (Anthropic requires one)
PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings", "messages": "/messages", "responses": "/responses"}


class NoCookies(httpx.Cookies):
    """A cookie jar that stays empty."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class CookielessClient(httpx.AsyncClient):
    """An httpx client that keeps no cookies: a cookie an upstream sets in one payer's call must
    not go out with every other payer's calls (and parsing ``Set-Cookie`` into a jar was ~4% of a
    paid call's CPU). Its ``transport`` is what a paid call's request is handed to directly
    (``Upstream.send``): the client's own layers — auth, redirects, hooks, default headers — do
    nothing for it and cost ~0.1 ms a call."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        super().__init__(transport=transport)
        self.transport = transport

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        return None


NO_COOKIES = NoCookies()


# An idle pooled connection is dropped before the server's keep-alive would close it: servers commonly
# keep an idle connection 5 s (uvicorn) or more, and a request sent on one the server is closing at
# that moment fails with a reset before any answer (a 503 the payer did nothing to earn).
KEEPALIVE_SECONDS = 4.0


def pool_limits(size: int) -> httpx.Limits:
    return httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=KEEPALIVE_SECONDS)


def make_http_client(upstream: UpstreamSettings) -> CookielessClient:
    """An upstream's own pooled client, of its ``max_connections`` (timeouts are set per request):
    one upstream that hangs holds its own connections, never another's."""
    return CookielessClient(transport=h1_transport(pool_limits(upstream.max_connections)))


def make_paying_client(s: UpstreamSettings) -> CookielessClient:
    """A client that pays an upstream tollway's 402s from ``s.payer_key`` (see tollway.client):
    never more per call than ``pay_max_usd_per_call`` or this gateway's own quote for the call
    (the ``MAX_USD`` request extension), nor more than ``pay_max_usd_total`` in all."""
    from ..client import AllowedAsset, Payer, PayingTransport

    allowed = [AllowedAsset(*a.rsplit(":", 1)) for a in s.pay_assets]
    if not allowed:
        raise ValueError(f"upstream {s.name}: payer_key needs pay_assets ('eip155:<chain>:<token>')")
    payer = Payer.from_key(
        s.payer_key,  # type: ignore[arg-type]
        allowed,
        max_per_call_usd=s.pay_max_usd_per_call,
        max_total_usd=s.pay_max_usd_total,
    )
    limits = pool_limits(s.max_connections)
    return CookielessClient(transport=PayingTransport(payer, h1_transport(limits)))


GENERATION = "openrouter-generation"  # the dialect of usage read from a generation record


def generation_usage(body: bytes) -> Usage | None:
    """Usage from OpenRouter's generation record (native token counts, what it bills). It names no
    cache writes, which bill above the prompt price: what it billed (``total_cost``) is kept, and
    the call is charged no less (``metering.meter``)."""
    try:
        data = loads(body).get("data")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    usage = {
        "prompt_tokens": data.get("native_tokens_prompt"),
        "completion_tokens": data.get("native_tokens_completion"),
        "prompt_tokens_details": {"cached_tokens": data.get("native_tokens_cached")},
        "cost": data.get("total_cost"),
    }
    found = parse_usage(usage)
    return None if found is None else replace(found, dialect=GENERATION)


def _retry_after(resp: httpx.Response) -> int | None:
    """The upstream's ``Retry-After`` in seconds (1 to 3600), if it sent one in seconds."""
    value = resp.headers.get("retry-after", "")
    return max(1, min(int(value), 3600)) if value.isascii() and value.isdigit() else None


def _upstream_message(body: bytes, keys: dict[str, str]) -> str:
    """The message of an upstream's error body, ``scrubbed`` of ``keys`` (it may quote the key it was
    sent) and short: it is shown to the client."""
    try:
        err = loads(body).get("error")
        text = str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError, RecursionError):
        text = body.decode(errors="replace")
    return scrubbed(text, keys)


FLAGGED = re.compile(r"flagged|moderat", re.IGNORECASE)


def _moderation(body: bytes, message: str) -> bool:
    """Whether an upstream's 403 is its moderation refusing the request (OpenRouter's names the
    ``flagged_input`` and ``reasons``), not a refusal of our key or region."""
    try:
        err = loads(body).get("error")
        meta = err.get("metadata") if isinstance(err, dict) else None
    except (ValueError, AttributeError, RecursionError):
        meta = None
    return (isinstance(meta, dict) and ("flagged_input" in meta or "reasons" in meta)) or bool(FLAGGED.search(message))


def scrubbed(text: str, keys: dict[str, str]) -> str:
    """An upstream's ``text``, shortened to be shown, with every key in ``keys`` (key → what stands
    for it) taken out first (a key cut in two by the shortening would no longer be found)."""
    for key, name in sorted(keys.items(), key=lambda k: -len(k[0])):  # (a key inside another: the longer first)
        text = text.replace(key, name)
    return truncate(text, 300)


SECRET_SEGMENT = 16  # characters: a path segment this long is taken for a token (an API's words are shorter)
SECRET_VALUE = 6  # characters: a shorter user or query value would take harmless words out of messages


def url_secrets(url: str) -> dict[str, str]:
    """What an upstream's URL may hold that is a secret — its user and password, its query's values,
    a path segment long enough to be a token (some hosts take the key in the path) — as written
    and decoded, and what stands for each: an upstream's 404 often quotes the path it was asked."""
    parts = urlsplit(url)
    raw = [parts.username, parts.password, *(p.partition("=")[2] for p in parts.query.split("&"))]
    values = [v for s in raw if s for v in (s, unquote(s), unquote_plus(s)) if len(v) >= SECRET_VALUE]
    segments = [s for s in parts.path.split("/") if len(s) >= SECRET_SEGMENT]
    return {s: "[the upstream's URL]" for s in values + segments}


ANSWERS = ("choices", "output", "content", "data")  # chat, Responses, Messages, embeddings


def no_answer(doc: dict[str, Any] | None) -> bool:
    """Whether a 200's body (parsed: ``usage.answer_doc``) is no answer: not a JSON object (an HTML
    page, whitespace), an error object (vLLM's ``"object": "error"``, Anthropic's ``"type":
    "error"``), an ``error`` beside no answer (OpenRouter answers so an error that came once the
    model started), or none of an API's answer fields. Served, it would be charged with nothing to
    show for it."""
    if doc is None or doc.get("object") == "error" or doc.get("type") == "error":
        return True
    if any(doc.get(k) for k in ANSWERS):
        return False
    return doc.get("error") is not None or not any(k in doc for k in (*ANSWERS, "usage"))


MAX_GENERATION = 1 << 16  # bytes of a generation record read (OpenRouter's are ~2 KB): the rest is not


async def _read_bounded(resp: httpx.Response, limit: int) -> bytes:
    body = bytearray()  # (bytes += bytes copies the whole body each time)
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


# Events that open a stream before any answer (Messages: message_start, ping, a content block's
# empty start; Responses: created, in_progress, an output item or content part added empty): an
# error right after them is still a failure before the answer — nothing was served.
PREAMBLE = frozenset(
    {
        "message_start",
        "ping",
        "content_block_start",
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    }
)


def _says_something(delta: Any) -> bool:
    """Whether a chat chunk's ``delta`` carries more than the role: content, reasoning, a tool call."""
    return isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role")


def _contentless(doc: dict[str, Any]) -> bool:
    """A chat chunk that answers nothing yet: its choices' deltas name the role and nothing more
    (OpenAI, vLLM and llama.cpp open a stream with one), or it has no choices (nor a list of them)
    and no usage."""
    choices = doc.get("choices")
    if doc.get("usage"):
        return False
    if not isinstance(choices, list):
        return True
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or choice.get("finish_reason") is not None or _says_something(delta):
            return False
    return True


def _stream_failure(doc: dict[str, Any]) -> str | None:
    """A chat chunk that is a failure with no ``error`` field: vLLM's error object, or a choice
    ended with ``finish_reason: "error"`` before any content (the error chunk OpenRouter and tollway
    end a broken stream with, its ``error`` field left out)."""
    if doc.get("object") == "error":
        return str(doc.get("message") or "the upstream answered an error")
    choices = doc.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if (
            isinstance(choice, dict)
            and choice.get("finish_reason") == "error"
            and not _says_something(choice.get("delta"))
        ):
            return "the upstream ended the answer with an error"
    return None


def _answered(buf: bytes | bytearray, start: int = 0, keys: dict[str, str] | None = None) -> tuple[bool, int]:
    """Whether ``buf``'s lines from ``start`` hold a complete SSE ``data:`` event that answers —
    not a preamble — and where its lines read end (the next call's ``start``: each line is read
    once); raises ``UpstreamError`` if an error event comes first (its message ``scrubbed`` of
    ``keys``)."""
    end = buf.rfind(b"\n") + 1  # (only lines already terminated)
    for line in bytes(buf[start:end]).split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = bytes(line[5:].strip())
        if data == b"[DONE]":  # (the end, not an answer: a stream of nothing else is a failure)
            continue
        doc = answer_doc(data) or {}  # (not a JSON object: no answer)
        err = doc.get("error") or stream_error(doc) or _stream_failure(doc)
        if err:
            text = str(err.get("message", err)) if isinstance(err, dict) else str(err)
            raise UpstreamError(f"upstream failed before answering: {scrubbed(text, keys or {})}")
        kind = doc.get("type")  # (none: a chat chunk, "type" was a nested key's)
        if kind is not None and not isinstance(kind, str):
            raise UpstreamError("upstream sent an event whose type is not a string")
        if doc and kind not in PREAMBLE and not (kind is None and _contentless(doc)):
            return True, end
    return False, max(end, start)


@dataclass
class Opened:
    response: httpx.Response
    first: bytes
    latency_ms: float
    upstream: str = ""  # the name of the upstream that answered
    chunks: AsyncIterator[bytes] | None = None  # the rest of a stream
    error: str | None = field(default=None)
    attempts: list[Any] = field(default_factory=list)  # every upstream tried, this one last (attempts.Attempt)
    model: str = ""  # the model it served (of a ``models`` fallback list)
    doc: dict[str, Any] | None = None  # a non-streamed answer, parsed (``usage.answer_doc``)

    async def rest(self) -> AsyncIterator[bytes]:
        """The remaining body; a transport failure ends it and is noted in ``error`` (the owner
        closes the response)."""
        if self.chunks is None:
            return
        try:
            async for chunk in self.chunks:
                if chunk:
                    yield chunk
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self.error is None:
                self.error = f"upstream stream broke: {type(exc).__name__}"


class Upstream:
    def __init__(self, settings: UpstreamSettings, http: CookielessClient) -> None:
        self.name = settings.name
        self.lower_name = settings.name.lower()  # (what routing preferences name it by)
        self.models = set(settings.models)
        self.imported: frozenset[str] = frozenset()  # from its catalogue (model_import.py)
        # its own prices (per token) of the models it prices itself (upstream_prices.py)
        self.prices = {m: p.per_token() for m, p in settings.prices.items()}
        self.cap_field = settings.max_tokens_field
        base = str(settings.url).rstrip("/")
        # Where each API is (parsed once: a string is parsed on every request), and which it speaks
        self.urls = {surface: httpx.URL(base + path) for surface, path in PATHS.items()}
        self.surfaces = frozenset(settings.surfaces)
        host = urlsplit(base).hostname
        openrouter = host == "openrouter.ai"
        lookup = settings.usage_lookup or ("openrouter" if openrouter else "none")
        self.routes_providers = openrouter if settings.provider_routing is None else settings.provider_routing
        self.byok = settings.byok
        self.generation_url = base + "/generation" if lookup == "openrouter" else None
        self.models_url = base + "/models"
        self.timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
        self.timeouts = self.timeout.as_dict()  # (the ``timeout`` extension a request carries to the transport)
        self.http = http
        self.key_header = settings.key_header or ("x-api-key" if host == "api.anthropic.com" else "authorization")
        # Uncompressed answers: the gateway reads every byte to meter and relay it (httpx asks for gzip).
        self.headers = {"content-type": "application/json", "accept-encoding": "identity", "user-agent": USER_AGENT}
        self.api_key = settings.api_key  # (never echoed: see ``_status_error``)
        self.url_secrets = url_secrets(base)
        if settings.api_key:
            self.headers.update(self.key(settings.api_key))

    def key(self, api_key: str) -> dict[str, str]:
        """The header that carries ``api_key`` to this upstream."""
        return {"x-api-key": api_key} if self.key_header == "x-api-key" else {"authorization": f"Bearer {api_key}"}

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models or model in self.imported

    async def probe(self) -> bool:
        """Whether the upstream answers at all (``GET /models``: any status will do — it is up)."""
        timeout = httpx.Timeout(self.timeout.connect, connect=self.timeout.connect)
        try:
            async with self.http.stream("GET", self.models_url, headers=self.headers, timeout=timeout):
                return True  # (its body is not read: a hostile one may never end)
        except (httpx.HTTPError, PaymentRefused):
            return False

    async def usage_after(self, generation_id: str, attempts: int = 6, first_wait: float = 0.5) -> Usage | None:
        """A finished generation's usage, read after the fact (OpenRouter's ``/generation?id=``,
        which has it a moment after the stream ends); None if this upstream cannot tell."""
        if self.generation_url is None or not generation_id:
            return None
        wait = first_wait
        for _ in range(attempts):
            await asyncio.sleep(wait)
            wait *= 2
            url = self.generation_url
            try:
                async with self.http.stream(
                    "GET", url, params={"id": generation_id}, headers=self.headers, timeout=self.timeout
                ) as resp:
                    if resp.status_code == 200:
                        return generation_usage(await _read_bounded(resp, MAX_GENERATION))
            except httpx.HTTPError:
                continue
        return None

    async def send(
        self,
        body: bytes,
        stream: bool,
        client_headers: Mapping[str, str],
        max_usd: Fraction | None = None,
        api_key: str | None = None,
        surface: str = "chat",
    ) -> Opened:
        """``api_key``: a payer's own key, sent in place of the upstream's (never logged nor echoed)."""
        headers = dict(self.headers)
        if api_key is not None:
            headers.update(self.key(api_key))
        headers.update({h: client_headers[h][:200] for h in PASS_HEADERS if h in client_headers})
        if surface == "messages":  # (its beta features were checked as it was priced: dialects.refuse_betas)
            headers["anthropic-version"] = client_headers.get("anthropic-version", ANTHROPIC_VERSION)[:40]
            if "anthropic-beta" in client_headers:
                headers["anthropic-beta"] = client_headers["anthropic-beta"][:1000]
        if stream:
            headers["accept"] = "text/event-stream"
        started = time.perf_counter()
        url = self.urls[surface]
        extensions: dict[str, Any] = {"timeout": self.timeouts}
        if max_usd is not None:
            extensions[MAX_USD] = max_usd
        request = httpx.Request("POST", url, content=body, headers=headers, extensions=extensions)
        try:
            resp = await self.http.transport.handle_async_request(request)  # (streamed: read below)
        except httpx.PoolTimeout as exc:  # (our own bound: the upstream never had the request)
            raise UpstreamUnavailable("every connection to the upstream is busy") from exc
        except httpx.HTTPError as exc:
            down = UpstreamUnreachable if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) else UpstreamDown
            if isinstance(exc, httpx.TimeoutException):
                raise down("upstream timed out", code="upstream_timeout") from exc
            raise down(f"upstream unreachable: {type(exc).__name__}") from exc
        except PaymentRefused as exc:  # an upstream tollway asks more than we may pay it
            raise UpstreamError(f"cannot pay the upstream: {exc}", code="upstream_payment_refused") from exc
        try:
            if resp.status_code != 200:
                raise self._status_error(resp, await _read_bounded(resp, MAX_ERROR_BODY), api_key)
            # The transport's own stream: it decodes a body compressed anyway (h1.H1Body), so httpx's
            # decoding layers, which would find nothing to do, are skipped (~50 µs a call).
            chunks = cast(httpx.AsyncByteStream, resp.stream).__aiter__()
            patience = started + self.timeout.read if stream else math.inf  # type: ignore[operator]
            first = await self._first_bytes(chunks, stream, self.secrets(api_key), patience)
        except BaseException:
            await resp.aclose()
            raise
        latency = (time.perf_counter() - started) * 1000
        if not stream:
            await resp.aclose()
            doc = answer_doc(first)
            if no_answer(doc):
                message = _upstream_message(first, self.secrets(api_key))
                log.warning("upstream %s answered 200 with no answer: %s", self.name, message)
                raise UpstreamError("upstream answered 200 with no answer")
            return Opened(resp, first, latency, self.name, doc=doc)
        return Opened(resp, first, latency, self.name, chunks)

    async def _first_bytes(
        self, chunks: AsyncIterator[bytes], stream: bool, keys: dict[str, str] | None = None, patience: float = math.inf
    ) -> bytes:
        """The whole body (not streaming), or a stream's bytes up to its first complete ``data:``
        event that answers: keep-alive comments and an API's opening events (``PREAMBLE``) alone
        do not commit a call, nor keep it waiting past ``patience`` (``time.perf_counter``: the
        upstream's ``read_timeout`` after it was asked), and an error before the answer is a
        failure (the payer is not charged; the next upstream may be tried)."""
        body = bytearray()  # (bytes += bytes copies the whole body each time)
        read = 0  # (how far a stream's lines have been read)
        try:
            async for chunk in chunks:
                body += chunk
                if len(body) > MAX_BODY:
                    raise UpstreamError("upstream response too large")
                if stream:
                    answered, read = _answered(body, read, keys)
                    if answered:
                        return bytes(body)
                    if len(body) > MAX_PREAMBLE:
                        raise UpstreamError(f"upstream sent {MAX_PREAMBLE} bytes of a stream without answering")
                    if time.perf_counter() > patience:  # (keep-alive comments alone, for its read_timeout)
                        raise UpstreamUnavailable("upstream timed out before answering", code="upstream_timeout")
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable("upstream timed out", code="upstream_timeout") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream failed before answering: {type(exc).__name__}") from exc
        if stream or not body:
            raise UpstreamError("upstream closed the stream without answering")
        return bytes(body)

    def secrets(self, api_key: str | None) -> dict[str, str]:
        """The keys an upstream's message must not carry on (this upstream's own, a payer's, what
        its URL holds), and what stands for each."""
        keys = {k: n for k, n in ((self.api_key, "[the upstream's key]"), (api_key, "[X-Provider-Key]")) if k}
        return {**self.url_secrets, **keys}

    def _status_error(self, resp: httpx.Response, body: bytes, api_key: str | None = None) -> Exception:
        """The client learns why the upstream refused its request (4xx: the request's own fault);
        of an upstream's own failure, only its status (the details go to the log). A payer's own
        key the provider refuses (401, 403) is the payer's to fix, not the upstream's failure; no
        message that could quote that key is logged or passed on."""
        status = resp.status_code
        message = _upstream_message(body, self.secrets(api_key))
        if api_key is not None and status in (401, 403):
            err = BadRequest(
                f"the provider refused the key in X-Provider-Key (it answered {status})", code="provider_key_refused"
            )
            err.status = 401
            return err
        if status in (400, 404, 413, 422):
            err = BadRequest(f"upstream answered {status}: {message}", code="upstream_rejected_request")
            err.status = status
            return err
        if status == 403 and _moderation(body, message):
            return UpstreamRefused(f"upstream answered 403: {message}")
        logged = message if api_key is None else "(withheld: the call carried a payer's key)"
        log.warning("upstream %s answered %d: %s", self.name, status, logged)
        if status in (429, 503, 529):
            asked = _retry_after(resp)
            err = UpstreamUnavailable(f"upstream answered {status}", retry_after=asked or 1)
            err.asked_to_wait = asked
            return err
        return UpstreamError(f"upstream answered {status}")
