"""Deterministic, fast OpenAI-compatible mock upstream.

Used by the test-suite, the benchmarks and the out-of-the-box demo (``tollway mock-upstream``).

Behaviour in one paragraph: ``POST /v1/chat/completions`` answers ``"echo: " + <last user message,
whitespace-collapsed>`` (or the ``mock.reply`` directive), truncated to ``max_completion_tokens`` /
``max_tokens`` (default 16) with ``finish_reason`` ``"length"`` when truncated, ``"stop"`` otherwise.
Usage is reported in one of several provider "dialects", including simulated prefix-cache hits.
``POST /v1/messages`` (Anthropic: ``system`` + ``messages``, ``max_tokens``) and ``POST /v1/responses``
(OpenAI: ``instructions`` + ``input``, ``max_output_tokens``) answer the same reply in their own shapes,
events and usage fields, streamed or not.

Token rule (documented contract): text is split with ``_TOKEN_RE`` = ``\\s*\\w+ | \\s*[^\\w\\s] | \\s+``,
i.e. a word with its leading whitespace, a single symbol/emoji with its leading whitespace, or a trailing
whitespace run.  Pieces concatenate back to the text and each one is >= 1 character, so a text never has
more tokens than characters.  Prompt tokens = tokens of every message content (a string, or each
``{"type": "text"}`` part of a list) + 3 per message.  A message serialises to >= 2 bytes (``{}``) plus
a separator, and the content's characters appear in it, so prompt tokens are ALWAYS <= the UTF-8 byte
length of ``json.dumps(messages)`` (compact or not, ascii-escaped or not).

Per-request test switches ride in an extra top-level body field ``"mock": {...}`` (see ``_directives``):
latency, chunk_delay, pause (seconds without an event after the first), fail (a status; with
fail_as_200, its error body under status 200, as OpenRouter answers an error once a model started),
fail_after_chunks + fail_mode (error, disconnect, or done: a bare ``[DONE]``), hang, dialect, reply,
cost_prices, usage_factor (over-report usage), omit_usage, error_bytes (pad an injected error), nest
(deep JSON).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import re
import time
from collections import OrderedDict
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

__all__ = ["DIALECTS", "MockDisconnect", "MockOptions", "count_tokens", "create_app", "run", "tokenize"]

DIALECTS = frozenset({"openai", "openrouter", "deepseek", "anthropic", "llamacpp", "none"})
_TOKEN_RE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
_MSG_OVERHEAD = 3  # tokens added per message (role marker + 2 separators in the cache sequence)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def tokenize(text: str) -> list[str]:
    """Split ``text`` into token pieces; ``"".join(tokenize(t)) == t``."""
    return _TOKEN_RE.findall(text)


def count_tokens(messages: list[Any]) -> int:
    """Prompt token count of an OpenAI ``messages`` array (<= its JSON UTF-8 byte length)."""
    return len(_prompt_sequence(messages))


class MockOptions(BaseModel):
    """Runtime options; all can be changed live via ``POST /mock/options`` (partial JSON)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["mock/echo", "mock/echo-large"])
    latency: float = Field(0.0, ge=0)  # seconds before the response starts
    chunk_delay: float = Field(0.0, ge=0)  # seconds between streamed content chunks
    dialect: str = "openai"  # usage dialect, see DIALECTS
    cache: bool = True  # simulate prefix caching
    cache_ttl: float = Field(300.0, gt=0)  # seconds a cached block lives (refreshed on reuse)
    cache_block: int = Field(4, ge=1)  # cached tokens are a multiple of this
    cache_entries: int = Field(65536, ge=1)  # LRU bound, counted in cached blocks
    default_max_tokens: int = Field(16, ge=0)  # completion cap when the request gives none

    @field_validator("dialect")
    @classmethod
    def _check_dialect(cls, v: str) -> str:
        if v not in DIALECTS:
            raise ValueError(f"dialect must be one of {sorted(DIALECTS)}")
        return v


class MockDisconnect(httpx.RemoteProtocolError):
    """Raised inside a stream for ``fail_mode: "disconnect"``.

    Behind a real server (uvicorn) this aborts the connection mid-body, so clients see an incomplete
    chunked read (``httpx.RemoteProtocolError``).  Under ``httpx.ASGITransport`` the exception itself
    reaches the client - it subclasses ``httpx.RemoteProtocolError`` so client code handles it the same.
    """

    def __init__(self, message: str = "mock upstream: connection dropped mid-stream") -> None:
        super().__init__(message)


class _QuietDisconnect(logging.Filter):
    """Keep uvicorn from logging a traceback for our deliberate disconnects."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], MockDisconnect))


_QUIET = _QuietDisconnect()


class _PrefixCache:
    """Prefix-cache simulation keyed by chained block hashes.

    Block ``i`` of a prompt is keyed by ``hash((key of block i-1, *tokens of block i))``, so a hit on
    block ``i`` implies the whole prefix up to it matched.  One call is O(prompt tokens).  Python's
    ``hash`` is stable within a process, which is all a mock needs.
    """

    def __init__(self) -> None:
        self._blocks: OrderedDict[int, float] = OrderedDict()  # key -> expiry (monotonic)

    def clear(self) -> None:
        self._blocks.clear()

    def lookup_and_store(self, seed: str, tokens: list[str], opts: MockOptions) -> int:
        """Return cached tokens for ``tokens`` and remember its full blocks."""
        b, blocks, now = opts.cache_block, self._blocks, time.monotonic()
        expiry, key, cached, matching = now + opts.cache_ttl, hash(seed), 0, True
        for start in range(0, len(tokens) - b + 1, b):
            key = hash((key, *tokens[start : start + b]))
            if matching:
                exp = blocks.get(key)
                if exp is not None and exp > now:
                    cached += b
                else:
                    matching = False
            blocks[key] = expiry
            blocks.move_to_end(key)
        while len(blocks) > opts.cache_entries:
            blocks.popitem(last=False)
        return cached


class _State:
    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.cache = _PrefixCache()
        self.ids = itertools.count(1)
        self.generations: OrderedDict[str, dict[str, Any]] = OrderedDict()  # OpenRouter-style records
        self.stats: dict[str, int] = {}
        self.last_request: dict[str, Any] | None = None  # the last chat request's body, for tests
        self.last_headers: dict[str, str] = {}  # ... and its headers
        self.reset()

    def reset(self) -> None:
        self.cache.clear()
        self.stats = dict.fromkeys(
            ("requests", "streams", "failures", "prompt_tokens", "completion_tokens", "cached_tokens"), 0
        )


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    402: "insufficient_quota",
    403: "forbidden",
    404: "not_found",
    408: "timeout",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def _error(status: int, message: str, code: str | None = None) -> Response:
    etype = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": etype, "code": code or _ERROR_CODES.get(status, str(status))}}
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return Response(_dumps(body), status_code=status, media_type="application/json", headers=headers)


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):  # multimodal parts: only text parts count
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _prompt_sequence(messages: list[Any]) -> list[str]:
    """Token sequence of the prompt (used for counting AND for the prefix cache)."""
    seq: list[str] = []
    for m in messages:
        seq.append(f"<|{m.get('role')}|>")
        for text in _content_texts(m.get("content")):
            seq += _TOKEN_RE.findall(text)
        seq += ("<|end|>", "\n")
    return seq


def _directives(raw: Any) -> dict[str, Any]:
    """Validate the ``mock`` field; raises _BadRequest on nonsense so test mistakes are loud."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _BadRequest(400, "`mock` must be an object", "invalid_mock_directive")
    d = dict(raw)
    try:
        if "fail" in d and not (isinstance(d["fail"], int) and 400 <= d["fail"] <= 599):
            raise ValueError("fail must be an HTTP status 400..599")
        for k in ("latency", "chunk_delay", "pause"):
            if k in d and (isinstance(d[k], bool) or not isinstance(d[k], int | float) or d[k] < 0):
                raise ValueError(f"{k} must be a number >= 0")
        fac = d.get("fail_after_chunks")
        if fac is not None and (isinstance(fac, bool) or not isinstance(fac, int) or fac < 0):
            raise ValueError("fail_after_chunks must be an int >= 0")
        if d.get("fail_mode", "error") not in ("error", "disconnect", "done"):
            raise ValueError("fail_mode must be 'error', 'disconnect' or 'done'")
        if "dialect" in d and d["dialect"] not in DIALECTS:
            raise ValueError(f"dialect must be one of {sorted(DIALECTS)}")
        if "reply" in d and not isinstance(d["reply"], str):
            raise ValueError("reply must be a string")
        for k in ("usage_factor", "error_bytes", "nest"):
            if k in d and (isinstance(d[k], bool) or not isinstance(d[k], int) or d[k] < 0):
                raise ValueError(f"{k} must be an int >= 0")
        for k in ("omit_usage", "fail_as_200"):
            if k in d and not isinstance(d[k], bool):
                raise ValueError(f"{k} must be a boolean")
        prices = d.get("cost_prices")
        if prices is not None and not (
            isinstance(prices, dict) and all(isinstance(v, int | float) for v in prices.values())
        ):
            raise ValueError("cost_prices must map names to numbers")
    except ValueError as exc:
        raise _BadRequest(400, f"invalid mock directive: {exc}", "invalid_mock_directive") from None
    return d


def _usage(
    dialect: str, prompt: int, completion: int, cached: int, written: int, prices: dict | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (usage object, extra top-level fields) for a dialect."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    extra: dict[str, Any] = {}
    if dialect in ("openai", "openrouter", "llamacpp"):
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if dialect == "openrouter":
        usage["prompt_tokens_details"]["cache_write_tokens"] = written
        if prices:
            p = float(prices.get("prompt", 0.0))
            cost = (
                cached * float(prices.get("cache_read", p))
                + written * float(prices.get("cache_write", p))
                + (prompt - cached - written) * p
                + completion * float(prices.get("completion", 0.0))
            )
            usage["cost"] = round(cost, 12)
    elif dialect == "deepseek":
        usage["prompt_cache_hit_tokens"] = cached
        usage["prompt_cache_miss_tokens"] = prompt - cached
    elif dialect == "anthropic":
        # Anthropic semantics: input + cache_read + cache_creation == prompt_tokens.
        usage["input_tokens"] = prompt - cached - written
        usage["output_tokens"] = completion
        usage["cache_read_input_tokens"] = cached
        usage["cache_creation_input_tokens"] = written
    elif dialect == "llamacpp":
        extra["timings"] = {"cache_n": cached, "prompt_n": prompt - cached, "predicted_n": completion}
    return usage, extra


class _Generation:
    """What one generation request produced (counts already multiplied by ``usage_factor``)."""

    def __init__(
        self,
        body: dict[str, Any],
        mock: dict[str, Any],
        model: str,
        pieces: list[str],
        finish: str,
        prompt: int,
        completion: int,
        cached: int,
        written: int,
    ) -> None:
        self.body, self.mock, self.model, self.pieces, self.finish = body, mock, model, pieces, finish
        self.prompt, self.completion, self.cached, self.written = prompt, completion, cached, written
        self.id = ""


def _anthropic_prompt(body: dict[str, Any]) -> Any:
    """A Messages request's prompt as OpenAI messages: ``system`` first."""
    messages, system = body.get("messages"), body.get("system")
    if system is None or not isinstance(messages, list):
        return messages
    return [{"role": "system", "content": system}, *messages]


def _responses_prompt(body: dict[str, Any]) -> Any:
    """A Responses request's prompt as OpenAI messages: ``instructions`` first, the input's
    messages (an input string is one user message)."""
    given, instructions = body.get("input"), body.get("instructions")
    items = [{"role": "user", "content": given}] if isinstance(given, str) else given
    if not isinstance(items, list):
        return None
    items = [i for i in items if isinstance(i, dict) and "role" in i] or items
    return items if instructions is None else [{"role": "system", "content": instructions}, *items]


def create_app(options: MockOptions | None = None) -> Starlette:
    """Build the mock upstream.  ``app.state.mock`` exposes options, cache and stats to tests."""
    state = _State(options.model_copy() if options else MockOptions())
    uvlog = logging.getLogger("uvicorn.error")
    if _QUIET not in uvlog.filters:
        uvlog.addFilter(_QUIET)

    async def models(_: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tollway-mock"} for m in state.options.models]
        return Response(_dumps({"object": "list", "data": data}), media_type="application/json")

    async def embeddings(request: Request) -> Response:
        """OpenAI's embeddings: a deterministic 8-dimensional vector per input (from the sha-256 of
        its text or token ids), usage by the token rule (token ids count one each)."""
        state.stats["requests"] += 1
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return _error(400, "request body must be a JSON object", "invalid_request")
        state.last_request, state.last_headers = body, dict(request.headers)
        mock = _directives(body.get("mock"))
        if "fail" in mock:
            state.stats["failures"] += 1
            return _error(mock["fail"], f"mock upstream: injected failure {mock['fail']}")
        model, given = body.get("model"), body.get("input")
        if model not in state.options.models:
            return _error(404, f"The model `{model}` does not exist", "model_not_found")
        inputs = (
            [given]
            if isinstance(given, str) or (isinstance(given, list) and given and isinstance(given[0], int))
            else given
        )
        if not isinstance(inputs, list) or not inputs:
            return _error(400, "`input` must be a string or a non-empty array", "invalid_input")
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            tokens += len(item) if isinstance(item, list) else len(tokenize(str(item)))
            digest = hashlib.sha256(_dumps(item)).digest()
            vector = [round(b / 255 - 0.5, 4) for b in digest[:8]]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        state.stats["prompt_tokens"] += tokens
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return Response(
            _dumps({"object": "list", "data": data, "model": model, "usage": usage}), media_type="application/json"
        )

    async def generate(request: Request, prompt_of: Any, limit_field: str) -> _Generation | Response:
        """What a generation request (of any API) produces: its prompt is ``prompt_of(body)`` (OpenAI
        messages), its output cap ``limit_field`` (or max_completion_tokens). A Response: it failed."""
        opts = state.options
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise _BadRequest(400, "request body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "request body must be a JSON object", "invalid_request")
        state.last_request, state.last_headers = body, dict(request.headers)
        mock = _directives(body.get("mock"))

        if mock.get("hang"):  # never answer; return only once the client has gone away
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return _error(499, "client went away", "client_closed")
        latency = mock.get("latency", opts.latency)
        if latency:
            await asyncio.sleep(latency)
        if "fail" in mock:
            state.stats["failures"] += 1
            padding = " " * mock.get("error_bytes", 0)  # an oversized error body
            failed = _error(mock["fail"], f"mock upstream: injected failure {mock['fail']}{padding}")
            if mock.get("fail_as_200"):
                failed.status_code = 200
            return failed

        messages, model = prompt_of(body), body.get("model")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _BadRequest(400, "`messages` must be a non-empty array of objects", "invalid_messages")
        if not isinstance(model, str):
            raise _BadRequest(400, "you must provide a `model` string", "missing_model")
        if model not in opts.models:
            raise _BadRequest(404, f"The model `{model}` does not exist", "model_not_found")
        limit = body.get("max_completion_tokens", body.get(limit_field))
        if limit is None:
            limit = opts.default_max_tokens
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise _BadRequest(400, f"{limit_field} must be a non-negative integer", "invalid_max_tokens")

        # Prompt accounting + prefix cache.
        seq = _prompt_sequence(messages)
        prompt = len(seq)
        cached = state.cache.lookup_and_store(model, seq, opts) if opts.cache else 0
        written = prompt - cached if opts.cache else 0

        # Deterministic reply.
        if "reply" in mock:
            text = mock["reply"]
        else:
            last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
            words = " ".join(" ".join(_content_texts(last.get("content") if last else None)).split())
            text = f"echo: {words}" if words else "echo:"
        pieces = _TOKEN_RE.findall(text)
        finish = "stop"
        if len(pieces) > limit:
            pieces, finish = pieces[:limit], "length"
        completion = len(pieces)

        stats = state.stats
        stats["prompt_tokens"] += prompt
        stats["completion_tokens"] += completion
        stats["cached_tokens"] += cached
        if body.get("stream"):
            stats["streams"] += 1
        factor = mock.get("usage_factor", 1)  # an upstream that over-reports its usage
        gen = _Generation(
            body, mock, model, pieces, finish, prompt * factor, completion * factor, cached * factor, written * factor
        )
        gen.id = f"chatcmpl-mock-{next(state.ids)}"
        return gen

    async def chat(request: Request) -> Response:
        return await served(request, _chat, lambda body: body.get("messages"), "max_tokens")

    async def messages(request: Request) -> Response:
        return await served(request, _messages, _anthropic_prompt, "max_tokens")

    async def responses(request: Request) -> Response:
        return await served(request, _responses, _responses_prompt, "max_output_tokens")

    async def served(request: Request, render: Any, prompt_of: Any, limit_field: str) -> Response:
        state.stats["requests"] += 1
        try:
            gen = await generate(request, prompt_of, limit_field)
        except _BadRequest as exc:
            state.stats["failures"] += 1
            return _error(exc.status, exc.message, exc.code)
        return gen if isinstance(gen, Response) else render(gen)

    def _chat(gen: _Generation) -> Response:
        body, mock, model, pieces, finish = gen.body, gen.mock, gen.model, gen.pieces, gen.finish
        usage, extra = _usage(
            mock.get("dialect", state.options.dialect),
            gen.prompt,
            gen.completion,
            gen.cached,
            gen.written,
            mock.get("cost_prices"),
        )
        omit_usage = mock.get("omit_usage", False)
        cid, created = gen.id, int(time.time())
        state.generations[cid] = {
            "id": cid,
            "model": model,
            "native_tokens_prompt": gen.prompt,
            "native_tokens_completion": gen.completion,
            "native_tokens_cached": gen.cached,
            "total_cost": usage.get("cost"),
            "streamed": bool(body.get("stream")),
        }
        while len(state.generations) > 10_000:
            state.generations.popitem(last=False)

        if not body.get("stream"):
            out = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                **({} if omit_usage else {"usage": usage}),
                **extra,
            }
            raw = _dumps(out)
            if mock.get("nest"):  # a hostile upstream: JSON nested deeper than a parser's stack
                raw = raw[:-1] + b',"deep":' + b"[" * mock["nest"] + b"]" * mock["nest"] + b"}"
            return Response(raw, media_type="application/json")

        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not omit_usage
        head = _dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model})[:-1]

        def event(tail: dict[str, Any]) -> bytes:  # tail = the fields after id/object/created/model
            return b"data: " + head + b"," + _dumps(tail)[1:] + b"\n\n"

        def choice(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
            return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        def deltas() -> Any:
            for i, piece in enumerate(pieces or [""]):
                yield event(choice({"role": "assistant", "content": piece} if i == 0 else {"content": piece}, None))

        def failure() -> Any:
            err = {"message": "mock upstream: injected mid-stream failure", "code": 500}
            yield event({"error": err, **choice({"content": ""}, "error")})
            yield b"data: [DONE]\n\n"

        def end() -> Any:
            yield event({**choice({}, finish), **(extra if not include_usage else {})})
            if include_usage:
                yield event({"choices": [], "usage": usage, **extra})
            yield b"data: [DONE]\n\n"

        return _stream(gen, [b": MOCK PROCESSING\n\n"], deltas(), failure(), end())

    def _messages(gen: _Generation) -> Response:
        """Anthropic's Messages answer (its usage: input_tokens excludes the cached ones)."""
        usage = {
            "input_tokens": gen.prompt - gen.cached - gen.written,
            "cache_creation_input_tokens": gen.written,
            "cache_read_input_tokens": gen.cached,
            "output_tokens": gen.completion,
        }
        reason = "end_turn" if gen.finish == "stop" else "max_tokens"
        message = {"id": f"msg_{gen.id}", "type": "message", "role": "assistant", "model": gen.model}
        if not gen.body.get("stream"):
            content = [{"type": "text", "text": "".join(gen.pieces)}]
            out = {**message, "content": content, "stop_reason": reason, "stop_sequence": None, "usage": usage}
            return Response(_dumps(out), media_type="application/json")

        def event(kind: str, doc: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + _dumps({"type": kind, **doc}) + b"\n\n"

        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": {**usage}}
        start["usage"]["output_tokens"] = 1
        head = [event("message_start", {"message": start}), event("ping", {})]
        opening = event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        deltas = (
            (opening if i == 0 else b"")
            + event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
            for i, p in enumerate(gen.pieces)
        )
        failure = [event("error", {"error": {"type": "api_error", "message": "mock upstream: injected failure"}})]
        end = [
            event("content_block_stop", {"index": 0}),
            event(
                "message_delta",
                {"delta": {"stop_reason": reason, "stop_sequence": None}, "usage": {"output_tokens": gen.completion}},
            ),
            event("message_stop", {}),
        ]
        return _stream(gen, head, deltas, failure, end)

    def _responses(gen: _Generation) -> Response:
        """OpenAI's Responses answer (its usage: input_tokens with input_tokens_details)."""
        usage = {
            "input_tokens": gen.prompt,
            "input_tokens_details": {"cached_tokens": gen.cached},
            "output_tokens": gen.completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt + gen.completion,
        }
        text = "".join(gen.pieces)
        item_id = f"msg_{gen.id}"
        item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant"}
        part = {"type": "output_text", "text": text, "annotations": []}
        status = "completed" if gen.finish == "stop" else "incomplete"
        response = {
            "id": f"resp_{gen.id}",
            "object": "response",
            "created_at": int(time.time()),
            "model": gen.model,
            "status": status,
            "incomplete_details": None if status == "completed" else {"reason": "max_output_tokens"},
            "error": None,
            "output": [{**item, "content": [part]}],
            "usage": usage,
        }
        if not gen.body.get("stream"):
            return Response(_dumps(response), media_type="application/json")
        sequence = itertools.count()

        def event(kind: str, doc: dict[str, Any]) -> bytes:
            doc = {"type": kind, "sequence_number": next(sequence), **doc}
            return b"event: " + kind.encode() + b"\ndata: " + _dumps(doc) + b"\n\n"

        started = {**response, "status": "in_progress", "output": [], "usage": None}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        head = [event("response.created", {"response": started}), event("response.in_progress", {"response": started})]

        opening = event("response.output_item.added", {"output_index": 0, "item": {**item, "content": []}})
        opening += event("response.content_part.added", {**where, "part": {**part, "text": ""}})
        deltas = (
            (opening if i == 0 else b"") + event("response.output_text.delta", {**where, "delta": p})
            for i, p in enumerate(gen.pieces)
        )

        def failure() -> Any:
            yield event("error", {"code": "server_error", "message": "mock upstream: injected failure"})

        end = (
            event(kind, doc)
            for kind, doc in (
                ("response.output_text.done", {**where, "text": text}),
                ("response.content_part.done", {**where, "part": part}),
                ("response.output_item.done", {"output_index": 0, "item": response["output"][0]}),
                (f"response.{status}", {"response": response}),
            )
        )
        return _stream(gen, head, deltas, failure(), end)

    def _stream(gen: _Generation, head: Any, deltas: Any, failure: Any, end: Any) -> StreamingResponse:
        """A stream of events: ``head``, each of ``deltas`` (one per output token, ``chunk_delay``
        apart), ``end`` — or, at ``fail_after_chunks``, ``failure`` (or a dropped connection)."""
        mock = gen.mock
        delay = mock.get("chunk_delay", state.options.chunk_delay)
        fail_after = mock.get("fail_after_chunks")
        pause = mock.get("pause", 0.0)

        async def stream() -> Any:
            for event in head:
                yield event
            for i, event in enumerate(deltas):
                if i == fail_after:
                    break
                if i and delay:
                    await asyncio.sleep(delay)
                if i == 1 and pause:  # (a model thinking a while after its first token: nothing comes)
                    await asyncio.sleep(pause)
                yield event
            if fail_after is not None:  # inject the mid-stream failure (after min(N, all) content chunks)
                state.stats["failures"] += 1
                if mock.get("fail_mode") == "disconnect":
                    raise MockDisconnect()
                if mock.get("fail_mode") == "done":  # (the stream just ends, as if it had said it all)
                    yield b"data: [DONE]\n\n"
                    return
                for event in failure:
                    yield event
                return
            for event in end:
                yield event

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def generation(request: Request) -> Response:
        """OpenRouter's ``GET /generation?id=``: a finished completion's usage, after the fact."""
        record = state.generations.get(request.query_params.get("id", ""))
        if record is None:
            return _error(404, "generation not found", "not_found")
        return Response(_dumps({"data": record}), media_type="application/json")

    async def stats(_: Request) -> Response:
        return Response(_dumps(state.stats), media_type="application/json")

    async def reset(_: Request) -> Response:
        state.reset()
        return Response(_dumps({"ok": True}), media_type="application/json")

    async def set_options(request: Request) -> Response:
        try:
            patch = json.loads(await request.body() or b"{}")
            if not isinstance(patch, dict):
                raise ValueError("body must be a JSON object")
            new = MockOptions.model_validate({**state.options.model_dump(), **patch})
        except (ValueError, ValidationError) as exc:  # ValidationError is a ValueError; explicit for clarity
            return _error(400, f"invalid options: {exc}", "invalid_options")
        if (new.cache_block, new.cache) != (state.options.cache_block, state.options.cache):
            state.cache.clear()  # block keys are meaningless under another block size
        state.options = new
        return Response(new.model_dump_json().encode(), media_type="application/json")

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/generation", generation, methods=["GET"]),
            Route("/mock/stats", stats, methods=["GET"]),
            Route("/mock/reset", reset, methods=["POST"]),
            Route("/mock/options", set_options, methods=["POST"]),
        ]
    )
    app.state.mock = state
    return app


def run(
    host: str = "127.0.0.1", port: int = 8403, options: MockOptions | None = None, log_level: str = "warning"
) -> None:
    """Serve the mock upstream with uvicorn (blocking)."""
    import uvicorn

    uvicorn.run(create_app(options), host=host, port=port, log_level=log_level)
