"""The paid hot path's request headers (``app.IndexedHeaders``): looked up in a dict made once,
and answering exactly as Starlette's own ``Headers`` do — case-insensitive names, the first of
repeated headers, absent ones a ``KeyError`` or the default."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from tollway.app import IndexedHeaders, IndexedRequest

RAW = [
    (b"host", b"gw.example"),
    (b"x-session-id", b"first"),
    (b"x-session-id", b"second"),
    (b"payment-signature", b"eyJ4IjoxfQ=="),
    (b"x-latin", "café".encode("latin-1")),
]


def scope() -> dict:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": list(RAW)}


@pytest.mark.parametrize("name", ["host", "Host", "X-Session-Id", "PAYMENT-SIGNATURE", "x-latin", "absent", "ABSENT"])
def test_indexed_headers_answer_as_starlettes_do(name):
    ours, theirs = IndexedHeaders(scope()), Headers(scope=scope())
    assert ours.get(name) == theirs.get(name)
    assert ours.get(name, "default") == theirs.get(name, "default")
    assert (name in ours) == (name in theirs)
    if name.lower() == "absent":
        with pytest.raises(KeyError):
            ours[name]
    else:
        assert ours[name] == theirs[name]
    assert ours.getlist(name) == theirs.getlist(name)
    assert ours.raw == theirs.raw and len(ours) == len(theirs)


def test_the_hot_paths_request_reads_indexed_headers():
    request = IndexedRequest(scope())
    assert isinstance(request.headers, IndexedHeaders) and request.headers is request.headers
    assert request.headers["x-session-id"] == "first"
