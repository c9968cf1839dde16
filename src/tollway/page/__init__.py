"""The public page (``GET /``): the models and their prices, a model's upstreams with their live
figures, the rankings, and how to pay — three static files that read the public JSON API in the
browser. A strict Content-Security-Policy: the page loads nothing but its own script and style,
and talks to nothing but this gateway."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response

FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:;"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "public, max-age=300",
}


@cache
def _read(name: str) -> bytes:
    return (files(__package__) / name).read_bytes()


async def serve(request: Request) -> Response:
    name, media = FILES[request.url.path]
    return Response(_read(name), media_type=media, headers=HEADERS)
