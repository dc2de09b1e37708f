"""The operator console: static HTML, CSS and hand-written JavaScript, served at `/console`.

Every asset ships in this package (no CDN, no build step) and the page talks to the gateway only
through the public HTTP API with the operator's own key (import-linter keeps this package away
from the store, the bus and the API's internals). A strict Content-Security-Policy allows nothing
but this origin's own files: no inline script, no eval, no third-party connection.
"""

from __future__ import annotations

from importlib import resources

from litestar import Response, Router, get

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> Response[bytes]:
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(body, media_type=_TYPES[name], headers=_HEADERS)


@get("/", opt={"public": True}, include_in_schema=False)
async def console_page() -> Response[bytes]:
    return _asset("index.html")


@get("/console.js", opt={"public": True}, include_in_schema=False)
async def console_script() -> Response[bytes]:
    return _asset("console.js")


@get("/console.css", opt={"public": True}, include_in_schema=False)
async def console_styles() -> Response[bytes]:
    return _asset("console.css")


console_router = Router(
    path="/console", route_handlers=[console_page, console_script, console_styles]
)
