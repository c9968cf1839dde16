"""``UsageEvents`` reads a stream's usage events whole — split across reads, in any SSE line
ending, or unterminated at the stream's end — and leaves every other byte as it came."""

from __future__ import annotations

import json
import time

from tollway.usage import MAX_HELD, StreamUsage, UsageEvents

DONE = {
    "type": "response.completed",
    "response": {"output": [{"text": "y" * 3000}], "usage": {"input_tokens": 10, "output_tokens": 500}},
}
STREAM = (
    b"event: response.created\ndata: "
    + json.dumps({"type": "response.created", "response": {"usage": None}}).encode()
    + b"\n\nevent: response.completed\ndata: "
    + json.dumps(DONE).encode()
    + b"\n\n"
)


def relayed(chunks: list[bytes]) -> tuple[object, bytes]:
    reader = StreamUsage()
    events = UsageEvents(reader.see)
    out = b"".join(events.feed(c) for c in chunks) + events.flush()
    return reader.usage(), out


def test_a_usage_event_split_across_reads_is_read_whole():
    cut = STREAM.index(b"response.completed") + 40  # ("usage" comes only in the second read)
    usage, out = relayed([STREAM[:cut], STREAM[cut : cut + 1500], STREAM[cut + 1500 :]])
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (10, 500)
    assert out == STREAM


def test_crlf_and_cr_line_endings_end_events_too():
    for ending in (b"\r\n", b"\r"):
        stream = STREAM.replace(b"\n", ending)
        reader = StreamUsage()
        events = UsageEvents(reader.see)
        first = events.feed(stream[:200])
        assert first and stream.startswith(first)  # (the first event is not held back to the end)
        assert first + events.feed(stream[200:]) + events.flush() == stream
        assert reader.usage() is not None and reader.usage().completion_tokens == 500


def test_an_event_left_unterminated_at_the_end_is_read_too():
    usage, out = relayed([STREAM[:-2]])
    assert usage is not None and usage.completion_tokens == 500 and out == STREAM[:-2]


def test_a_dropped_event_takes_its_blank_line_and_an_endless_one_is_not_held_for_ever():
    events = UsageEvents(lambda doc: None if "usage" in doc else doc)
    assert (
        events.feed(b'data: {"a":1}\n\ndata: {"usage":{}}\n\ndata: {"b":2}\n\n')
        == b'data: {"a":1}\n\ndata: {"b":2}\n\n'
    )
    endless = b'data: {"usage": "' + b"x" * MAX_HELD
    assert events.feed(endless) == endless and events.held == b""


def test_a_usage_event_that_cannot_be_written_again_goes_as_it_came():
    """A lone surrogate the upstream escaped reads, but cannot be written as UTF-8: the event passes
    untouched (it stopped the stream mid-way)."""
    events = UsageEvents(lambda doc: {**doc, "usage": {**doc["usage"], "cost": 1}})
    event = b'data: {"usage":{"prompt_tokens":1},"note":"\\ud800"}\n\n'
    assert events.feed(event) == event


def test_a_final_event_whose_response_is_not_an_object_goes_on_as_it_came():
    """A hostile upstream's: it carries no usage (the stream is metered by the estimate) and breaks
    nothing — were it read as an object, the relay would stop mid-stream."""
    for response in (b'"done"', b"[1]", b"7"):
        event = (
            b'event: response.completed\ndata: {"type": "response.completed", "usage": 1, "response": '
            + response
            + b"}\n\n"
        )
        usage, out = relayed([event])
        assert usage is None and out == event


def test_an_event_that_never_ends_costs_each_byte_once():
    """A hostile upstream trickling one event that never ends (no blank line): each read is searched
    for its end, not everything held so far — else ~4 MB in 1,400-byte reads cost seconds of CPU
    (quadratic), against milliseconds for the same bytes as whole events. Compared, not timed."""
    piece = b"a" * 1398 + b"\n\n"

    def cpu(chunk: bytes) -> float:
        events = UsageEvents(lambda doc: doc)
        started = time.process_time()
        for _ in range(MAX_HELD // len(chunk)):
            events.feed(chunk)
        return time.process_time() - started

    endless, whole = cpu(b"a" * 1400), cpu(piece)
    assert endless < 20 * max(whole, 0.001), (endless, whole)
