"""Browser-safe API: which web pages may talk to loop, and what every response tells the browser.

On a loopback-only loop feedback and chat need no token (rater tokens are optional there, loop/api/deps.py; the
admin token guards training, versions and accounts), so a program on this machine can use them freely. A web page can too, unless the server tells requests from pages apart. Three ways
in are closed here, in one pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streamed answers):
- DNS rebinding: a page on attacker.example re-points its name at 127.0.0.1 and is then same-origin with loop,
  but its requests still say `Host: attacker.example`. Only names in `allowed_hosts` are served
  (400 `host_not_allowed`; the bind host counts when it is a specific name).
- CORS "simple" requests: a page may POST text/plain, form or multipart bodies to any origin without asking
  first. A POST/PUT/PATCH/DELETE with a body must be `application/json` (415 `unsupported_media_type`); a page
  can send that cross-origin only after a preflight, which loop never grants (it sends no CORS headers).
- Cross-site writes: such a request whose Origin (or, lacking one, `Sec-Fetch-Site`) names another origin is
  refused (403 `cross_site_request`) unless the origin is in `allowed_origins`. Reads stay open: another site may
  send a GET but, without CORS headers, never read the answer.
Every response carries a strict Content-Security-Policy (the UI in web/ loads only its own files and uses no
inline script or style), X-Frame-Options: DENY, X-Content-Type-Options: nosniff and Referrer-Policy: no-referrer.

Tests: tests/unit/api/test_security.py (in-process), tests/e2e/test_access_e2e.py (a real `loop serve`).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from loop.api.errors import error_body
from loop.config import Settings, host_name

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from jsDelivr and start them with an inline script of
# their own (no request data in it); only those pages get that allowance.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
            "https://cdn.redoc.ly; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'self'")
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
_DEFAULT_PORT = {"http": 80, "https": 443}


def _headers(csp: str) -> list[tuple[bytes, bytes]]:
    return [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


SECURITY_HEADERS = _headers(CSP)
DOCS_HEADERS = _headers(DOCS_CSP)


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """('http', '127.0.0.1', 8000) for 'http://127.0.0.1:8000'; None for 'null' or anything unparsable."""
    parts = urlsplit(origin.strip())
    try:
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORT or not parts.hostname:
        return None
    return scheme, parts.hostname.rstrip("."), port or _DEFAULT_PORT[scheme]


class BrowserGuard:
    """ASGI middleware: Host allow-list, JSON-only writes, same-origin writes, security headers."""

    def __init__(self, app: Any, *, allowed_hosts: frozenset[str] | None, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts  # None: no check ('*')
        self.allowed_origins = {key for key in map(origin_key, allowed_origins) if key is not None}

    @classmethod
    def options(cls, settings: Settings) -> dict[str, Any]:
        """The keyword arguments for `app.add_middleware(BrowserGuard, ...)` from the settings."""
        return {"allowed_hosts": settings.host_allow_list, "allowed_origins": settings.allowed_origins}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = DOCS_HEADERS if scope.get("path") in DOCS_PATHS else SECURITY_HEADERS

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                message = {**message, "headers": [*message.get("headers", ()),
                                                   *(h for h in extra if h[0] not in present)]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await _refuse(send_with_headers, *refusal)
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Any) -> tuple[int, str, str, str] | None:
        """(status, code, param, message) when the request must not reach the app; None when it may."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name, value)
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed_hosts is not None and host and host_name(host) not in self.allowed_hosts:
            names = ", ".join(sorted(self.allowed_hosts))
            return (400, "host_not_allowed", "host",
                    f"loop does not answer to the host name {host_name(host)!r} (it answers to: {names}); open it "
                    "by one of those names, or add this one to LOOP_ALLOWED_HOSTS (comma-separated). The check "
                    "stops web pages from reaching loop through a name re-pointed at it (DNS rebinding)")
        if scope["method"] not in STATE_CHANGING:
            return None
        own = origin_key(f"{scope.get('scheme', 'http')}://{host}") if host else None
        origin = headers.get(b"origin")
        if origin is not None:
            given = origin.decode("latin-1")
            key = origin_key(given)
            if key is None or (key != own and key not in self.allowed_origins):
                return (403, "cross_site_request", "origin",
                        f"a web page on {given!r} may not change anything here (loop's own origin is "
                        f"{scope.get('scheme', 'http')}://{host}); to let that site write, add its origin to "
                        "LOOP_ALLOWED_ORIGINS")
        elif headers.get(b"sec-fetch-site", b"").lower() in (b"cross-site", b"same-site"):
            return (403, "cross_site_request", "origin",
                    "the browser says this request comes from another site (Sec-Fetch-Site), and loop lets only "
                    "its own pages and the origins in LOOP_ALLOWED_ORIGINS change anything")
        if _has_body(headers):
            media_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if media_type != b"application/json":
                shown = media_type.decode("latin-1") or "none"
                return (415, "unsupported_media_type", "content-type",
                        f"{scope['method']} bodies must be JSON: send 'Content-Type: application/json' (got "
                        f"{shown!r}); loop refuses other types so that web pages cannot post to it unasked")
        return None


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    if length is not None:
        return not length.strip().isdigit() or int(length) > 0
    return b"transfer-encoding" in headers  # chunked: a body of unknown length


async def _refuse(send: Any, status: int, code: str, param: str, message: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", code, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
