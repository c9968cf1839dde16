"""What a call used, read from any upstream's usage dialect, streamed or not.

A cache figure the upstream did not report is ``None`` (unknown), never 0.

| dialect            | cached (read)                                  | cache write                      |
|--------------------|------------------------------------------------|----------------------------------|
| OpenAI/OpenRouter  | usage.prompt_tokens_details.cached_tokens      | ...prompt_tokens_details.cache_write_tokens |
| DeepSeek           | usage.prompt_cache_hit_tokens                  | —                                |
| Anthropic          | usage.cache_read_input_tokens                  | usage.cache_creation_input_tokens |
| llama.cpp          | prompt_tokens_details.cached_tokens, timings.cache_n | —                          |
| OpenAI Responses   | usage.input_tokens_details.cached_tokens       | —                                |

Anthropic's ``input_tokens`` excludes cached tokens; everywhere else ``prompt_tokens`` (Responses:
``input_tokens``) includes them. A stream carries usage in its API's own events (``StreamUsage``).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

from .jsonbytes import dumps, loads, python_recursion_limit


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None  # prompt tokens read from the upstream's cache
    cache_write_tokens: int | None = None  # prompt tokens written to it
    upstream_cost: Decimal | None = None  # the upstream's own figure, USD, if it states one
    dialect: str = "openai"
    cache_write_1h_tokens: int | None = None  # of those written, for an hour (None: not said apart)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["upstream_cost"] = None if self.upstream_cost is None else str(self.upstream_cost)
        return d


MAX_COUNT = 2**31 - 1  # a token count beyond this is kept as this (the ledger's columns are 32-bit on PostgreSQL)


def _int(v: Any) -> int | None:
    """A token count an upstream reports: a whole number ≥ 0, at most ``MAX_COUNT`` (a call is
    never charged more than its quote, whatever is reported)."""
    return min(v, MAX_COUNT) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def parse_usage(usage: Any, timings: Any = None) -> Usage | None:
    """Normalise one ``usage`` object (plus llama.cpp's ``timings``); None when it has no counts."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    details = details if isinstance(details, dict) else {}
    cost = usage.get("cost")
    figure = isinstance(cost, (int, float)) and not isinstance(cost, bool) and math.isfinite(cost)
    upstream_cost = Decimal(str(cost)) if figure else None  # (an upstream's JSON may say NaN: no figure)
    completion = _int(usage.get("completion_tokens"))
    if completion is None:
        completion = _int(usage.get("output_tokens"))

    written_1h = None
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        read = _int(usage.get("cache_read_input_tokens"))
        written = _int(usage.get("cache_creation_input_tokens"))
        prompt = _int(usage.get("prompt_tokens"))
        if prompt is None:
            uncached = _int(usage.get("input_tokens")) if "input_tokens" in usage else 0  # (malformed: unknown)
            prompt = None if uncached is None else uncached + (read or 0) + (written or 0)
        dialect, cached = "anthropic", read
        by_ttl = usage.get("cache_creation")  # (Anthropic: the writes by TTL, when a request marks both)
        written_1h = _int(by_ttl.get("ephemeral_1h_input_tokens")) if isinstance(by_ttl, dict) else None
    elif "prompt_cache_hit_tokens" in usage:
        prompt = _int(usage.get("prompt_tokens"))
        cached, written, dialect = _int(usage.get("prompt_cache_hit_tokens")), None, "deepseek"
        missed = _int(usage.get("prompt_cache_miss_tokens")) if "prompt_cache_miss_tokens" in usage else 0
        if prompt is None and missed is not None:
            prompt = (cached or 0) + missed
    else:
        prompt = _int(usage.get("prompt_tokens"))
        if prompt is None:
            prompt = _int(usage.get("input_tokens"))
        cached = _int(details.get("cached_tokens"))
        written = _int(details.get("cache_write_tokens"))
        dialect = "openai"
        if isinstance(timings, dict):
            dialect = "llamacpp"
            if cached is None:
                cached = _int(timings.get("cache_n"))

    if prompt is None or completion is None:
        return None
    total = _int(usage.get("total_tokens"))
    if total is not None and total - prompt > completion:  # reasoning reported beside the output (xAI, some
        completion = min(total - prompt, MAX_COUNT)  # Gemini proxies), but in the total and in the bill
    # (a buggy or hostile upstream's: no more read from the cache than the prompt, no more written
    # to it than the rest — else one prompt token would be billed as read and as written)
    if cached is not None and cached > prompt:
        cached = prompt
    if written is not None and written > prompt - (cached or 0):
        written = prompt - (cached or 0)
    if written_1h is not None:
        written_1h = min(written_1h, written or 0)
    return Usage(prompt, completion, cached, written, upstream_cost, dialect, written_1h)


def answer_doc(body: bytes) -> dict[str, Any] | None:
    """A non-streamed answer's JSON object (None if it is not sane JSON, or not an object): parsed
    once, for its usage and for the charge written into it."""
    try:
        doc = loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def usage_of_answer(doc: dict[str, Any] | None, output: bool = True) -> Usage | None:
    """Usage of a non-streamed answer (None if it has none, or is not sane JSON). An API without
    output (embeddings) reports no completion tokens: they are 0."""
    if doc is None:
        return None
    usage = doc.get("usage")
    if not output and isinstance(usage, dict) and "completion_tokens" not in usage:
        usage = {**usage, "completion_tokens": 0}
    return parse_usage(usage, doc.get("timings"))


def with_cost(doc: dict[str, Any], cost_usd: Decimal) -> dict[str, Any]:
    """A response (or usage chunk) with what tollway charged as ``usage.cost`` in USD (OpenRouter's
    convention); the upstream's own figure, if it stated one, moves to ``usage.upstream_cost``."""
    usage = dict(doc["usage"])
    if "cost" in usage:
        usage["upstream_cost"] = usage.pop("cost")
    usage["cost"] = float(cost_usd)  # a display figure: the exact amount is in atomic units elsewhere
    return {**doc, "usage": usage}


def body_with_cost(raw: bytes, doc: dict[str, Any] | None, cost_usd: Decimal) -> bytes:
    """A non-streamed answer (``raw``, parsed: ``doc``) with tollway's charge in ``usage.cost``
    (unchanged if it has no usage)."""
    if doc is None or not isinstance(doc.get("usage"), dict):
        return raw
    try:
        with python_recursion_limit():
            return dumps(with_cost(doc, cost_usd))
    except (ValueError, RecursionError):
        return raw


EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")  # (SSE ends an event with a blank line, in any line ending)
EVENT_END = re.compile(b"(" + b"|".join(EVENT_ENDS) + b")")
MAX_HELD = 4 * 2**20  # bytes of one unfinished event held back; past it they go on as they are, unread


class UsageEvents:
    """Rewrites a stream's usage events as they pass — ``rewrite(doc)`` returns the event to send
    (or None to drop it) — and leaves every other byte as it came. The stream goes on event by
    event: an event's start is held back until its end comes (a usage event split across reads is
    read whole), and only events that mention ``"usage"`` are parsed."""

    def __init__(self, rewrite: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        self.rewrite = rewrite
        self.held = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        # Only the new bytes are searched for an event's end (and the held ones' last 3, where one
        # may begin): an event that never ends costs each byte once, not once per read.
        start = max(len(self.held) - 3, 0)
        if self.held:
            self.held += chunk
        data = self.held or chunk
        end = 0
        for e in EVENT_ENDS:
            at = data.rfind(e, start)
            if at >= 0:
                end = max(end, at + len(e))
        if end == 0:  # (no event ends in it yet)
            if len(data) > MAX_HELD:
                self.held = bytearray()
                return bytes(data)
            if not self.held:
                self.held += chunk
            return b""
        complete, self.held = bytes(data[:end]), bytearray(data[end:])
        if b'"usage"' not in complete:
            return complete
        parts = EVENT_END.split(complete)  # [event, its end, event, its end, ..., ""]
        out = []
        for event, ending in zip(parts[0::2], [*parts[1::2], b""], strict=True):
            event = self._event(event)
            if event:  # (a dropped event takes its blank line with it)
                out += (event, ending)
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left at the stream's end (an event with no blank line after it), read too."""
        held, self.held = bytes(self.held), bytearray()
        return self._event(held)

    def _event(self, event: bytes) -> bytes:
        data = event.find(b"data:")  # (after an ``event:`` line, in the Messages and Responses APIs)
        if data >= 0 and b'"usage"' in event and (data == 0 or event[data - 1 : data] in (b"\n", b"\r")):
            try:
                doc = loads(event[data + 5 :])
            except (ValueError, RecursionError):
                doc = None
            if isinstance(doc, dict):
                new = self.rewrite(doc)
                if new is None:
                    return b""
                if new is not doc:
                    try:
                        return event[:data] + b"data: " + dumps(new)
                    except ValueError:  # (a lone surrogate the upstream escaped: it goes as it came)
                        return event
        return event


def stream_error(doc: dict[str, Any]) -> Any:
    """The error a Responses stream event reports (``error``, ``response.failed``), if any."""
    kind = doc.get("type")
    if kind == "error":
        return doc
    if kind == "response.failed" and isinstance(doc.get("response"), dict):
        return doc["response"].get("error") or "the response failed"
    return None


class StreamUsage:
    """What a Messages or Responses stream used, read from its own events as they pass (fed by
    ``UsageEvents``; the events go on unchanged). Messages: ``message_start`` carries the prompt's
    counts and ``message_delta`` the output's (later counts replace earlier ones); Responses: the
    final ``response.completed`` / ``incomplete`` / ``failed`` event carries it all."""

    FINAL = ("response.completed", "response.incomplete", "response.failed")

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}
        self.final = False  # the event with the output's count has passed

    def see(self, doc: dict[str, Any]) -> dict[str, Any]:
        kind, found = doc.get("type"), None
        if kind == "message_start" and isinstance(doc.get("message"), dict):
            found = doc["message"].get("usage")
        elif kind == "message_delta":
            found = doc.get("usage")
            self.final = self.final or isinstance(found, dict)
        elif kind in self.FINAL:
            response = doc.get("response")  # (a hostile upstream's may be anything)
            found = response.get("usage") if isinstance(response, dict) else None
            self.final = self.final or isinstance(found, dict)
        if isinstance(found, dict):
            self.counts.update(found)
        return doc

    def usage(self) -> Usage | None:
        """The stream's usage, once its final count has passed."""
        return parse_usage(self.counts) if self.final else None

    def prompt(self) -> Usage | None:
        """What a stream cut before its final count said of its prompt (Messages' message_start)."""
        return parse_usage(self.counts) if self.counts else None


ANSWER_ENDS = ("content_block_stop", "response.output_item.done")  # Messages, Responses
SUMMARY_PREFIX = b": tollway "  # the SSE comment a tollway ends its streams with


class StreamTail:
    """Keeps the last bytes of an SSE stream so usage can be read at its end.

    Chunks are relayed untouched; only the tail (where OpenAI-style upstreams put the usage
    chunk, right before ``[DONE]``) is parsed, once, when the stream ends.
    """

    def __init__(self, keep: int = 16384) -> None:
        self.keep = keep
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.events_seen = 0  # data events relayed (roughly: one per output token)
        self._edge = b"\n"  # the last bytes fed (the stream starts a line)
        self._id: str | None = None

    def feed(self, chunk: bytes) -> None:
        """O(1) per chunk: the tail is joined only when read."""
        # Lines that start with ``data:`` (not one a model wrote: JSON escapes a newline in its
        # strings), also where two reads meet.
        seam = self._edge + chunk[:5]
        self.events_seen += chunk.count(b"\ndata:") + chunk.count(b"\rdata:")
        self.events_seen += seam.count(b"\ndata:") + seam.count(b"\rdata:")
        self._edge = seam[-5:] if len(chunk) < 5 else chunk[-5:]
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= self.keep:
            self._size -= len(self._chunks.popleft())

    @property
    def buf(self) -> bytes:
        return b"".join(self._chunks)

    def events(self, containing: bytes = b"") -> Iterator[dict[str, Any]]:
        """The JSON ``data:`` events in the tail, newest first, that contain ``containing``
        (only those are parsed; a cut first event is skipped)."""
        for line in reversed(self.buf.splitlines()):
            if not line.startswith(b"data:") or containing not in line:
                continue
            try:
                doc = loads(line[5:])
            except (ValueError, RecursionError):
                continue
            if isinstance(doc, dict):
                yield doc

    def estimate(
        self, prompt_bound: int, tokens_per_event: int, output_bound: int, prompt: Usage | None = None
    ) -> Usage:
        """For a stream that ended without usage: the prompt at its bound (or as the stream's
        opening counted it: ``prompt``) and each relayed event at the model's most tokens per event,
        within the output the upstream was asked for at most (``output_bound``; the caller caps the
        cost at the quote)."""
        output = min(self.events_seen * tokens_per_event, output_bound)
        if prompt is None:
            return Usage(prompt_bound, output, dialect="estimated")
        return Usage(prompt.prompt_tokens, output, prompt.cached_tokens, prompt.cache_write_tokens, dialect="estimated")

    def answered(self) -> bool:
        """Whether the stream's answer has ended: a chat choice's ``finish_reason``, or, as the newest
        event, a Messages content block or a Responses output item complete (not an earlier one: a
        thinking block's end is followed by the answer). What may follow is the event with its usage
        (and ``[DONE]``; or another block, which the relay's grace bounds)."""
        for doc in self.events(b'"finish_reason"'):
            choices = doc.get("choices")
            if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
                return True
        newest = next((d for d in self.events(b'"type"') if d.get("type") != "ping"), {})  # (Messages' keep-alive)
        return newest.get("type") in ANSWER_ENDS

    def generation_id(self) -> str:
        """The id the stream's events carry (OpenRouter: the generation's id), "" if none."""
        if self._id is None:
            self._id = next((str(d["id"]) for d in self.events(b'"id"') if isinstance(d.get("id"), str)), "")
        return self._id

    def usage(self) -> Usage | None:
        for doc in self.events(b'"usage"'):
            found = parse_usage(doc.get("usage"), doc.get("timings"))
            if found is not None:
                return found
        return None

    def error(self) -> str | None:
        """The message of a mid-stream error event, if the stream ended with one: an ``error``
        member (chat, Messages), a Responses ``error`` or ``response.failed`` event."""
        for doc in self.events(b'"error"'):
            err = doc.get("error") or stream_error(doc)
            if err:
                return str(err.get("message", err)) if isinstance(err, dict) else str(err)
        return None

    def upstream_hops(self) -> list[dict[str, Any]]:
        """Cache hops from an upstream tollway's closing summary comment, if it sent one."""
        for line in reversed(self.buf.splitlines()):
            if line.startswith(SUMMARY_PREFIX):
                try:
                    hops = loads(line[len(SUMMARY_PREFIX) :]).get("cache")
                except (ValueError, AttributeError, RecursionError):
                    return []
                return [h for h in hops if isinstance(h, dict)][:16] if isinstance(hops, list) else []
        return []
