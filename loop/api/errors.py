"""Errors a client can act on — the error contract of every route.

Every error leaves loop as `{"error": {"message", "type", "code", "param"}}` — the shape the OpenAI SDK parses, so
SDK users see our message in the exception text — with a status that says whose fault it is: 400 for a body that
is not JSON loop will read (`invalid_json`: not UTF-8, not JSON, nested deeper than `MAX_JSON_DEPTH`), 422 for
JSON that does not fit the route's schema (the field is named in `param`), other 4xx for the request, 500
`internal_error` for a fault of loop's own, 503 when vLLM or the worker is down, 504 when vLLM is too slow.

Every response carries `X-Request-Id` (the client's own when it sent a sane one, else a new one). An unexpected
exception is logged with its traceback under that id and answered 500 in the same shape, naming the id, so a
user's report finds the traceback. Tests: tests/unit/api/test_errors.py, tests/faults/test_fuzz.py.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loop import errors as domain
from loop.errors import LoopError

log = logging.getLogger("loop.api")

# Deeper than any OpenAI request (tool schemas included) nests; a parser recursing through thousands of levels
# is a crash waiting to happen.
MAX_JSON_DEPTH = 64
REQUEST_ID_HEADER = "X-Request-Id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
# A JSON string (skipped whole: brackets inside text do not nest) or one bracket.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class ApiError(domain.LoopError):
    """An error of the HTTP surface itself (a missing token, a body that is not JSON), with its status."""

    def __init__(self, message: str, *, status_code: int = 400, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, param=param)
        self.status_code = status_code
        self.headers = headers


# The domain's errors (loop/errors.py) as HTTP: status and the OpenAI-style error type.
_HTTP: list[tuple[type[domain.LoopError], int, str]] = [
    (domain.NotFound, 404, "not_found_error"), (domain.Conflict, 409, "conflict_error"),
    (domain.UpstreamTimeout, 504, "timeout_error"), (domain.Unavailable, 503, "service_unavailable"),
    (domain.Invalid, 422, "invalid_request_error")]  # first match wins: a timeout is also unavailable
_TYPES = {404: "not_found_error", 409: "conflict_error", 500: "server_error", 503: "service_unavailable",
          504: "timeout_error"}


def http_of(exc: domain.LoopError) -> tuple[int, str, dict[str, str] | None]:
    """(status, error type, headers) for a LoopError."""
    headers = getattr(exc, "headers", None)
    if exc.retry_after_s is not None:
        headers = {**(headers or {}), "Retry-After": str(max(1, round(exc.retry_after_s)))}
    if isinstance(exc, ApiError):
        return exc.status_code, _TYPES.get(exc.status_code, "invalid_request_error"), headers
    for kind, status, type_ in _HTTP:
        if isinstance(exc, kind):
            return status, type_, headers
    return 400, "invalid_request_error", headers


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


# --- malformed bodies ------------------------------------------------------------------------------------------
def json_body_problem(raw: bytes) -> str | None:
    """Why `raw` is not a body loop will hand to a JSON parser (None: go ahead). Checks what parsers get wrong or
    die on, or what no database can store: bytes that are not UTF-8, nesting deeper than MAX_JSON_DEPTH, a lone
    surrogate escape (`"\\ud800"`). Syntax is the parser's job."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"the body is not valid UTF-8 (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); "
                "send a JSON object encoded as UTF-8")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:  # else it cannot be too deep: no scan (the usual case)
        depth = 0
        for token in _JSON_TOKEN.finditer(raw):
            c = token.group()
            if c in (b"[", b"{"):
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    return (f"the body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; "
                            "send a flatter JSON object")
            elif c in (b"]", b"}"):
                depth -= 1
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then parse, to find a half of a UTF-16 pair standing alone
        try:
            json.dumps(json.loads(raw), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return ("the body has a \\uD800-\\uDFFF escape that is not half of a surrogate pair, which is no "
                    "character; send valid Unicode text")
        except ValueError:
            return None  # not JSON at all: the route's parser says so
    return None


def invalid_json(message: str) -> LoopError:
    return ApiError(message, code="invalid_json")


def check_json_body(raw: bytes) -> None:
    """Raise 400 `invalid_json` for a body no route should parse (see json_body_problem)."""
    problem = json_body_problem(raw)
    if problem is not None:
        raise invalid_json(problem)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, bool]:
    """(message, the first field named, whether the body was not JSON at all)."""
    parts = []
    first_param = None
    not_json = False
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            not_json = True
            parts.append(f"the body is not valid JSON ({err.get('msg')}); send a JSON object")
        else:
            first_param = first_param or where
            parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first_param, not_json


def install_error_handlers(app: FastAPI) -> None:
    """Map loop's errors, validation errors and Starlette's HTTP errors to the error shape, and check JSON bodies
    before any route parses them. (The catch-all for unexpected exceptions is `RequestContext`, outermost.)"""

    @app.exception_handler(LoopError)
    async def _loop_error(_: Request, exc: LoopError) -> JSONResponse:
        status, type_, headers = http_of(exc)
        return JSONResponse(error_body(exc.message, type_, exc.code, exc.param), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, not_json = _validation_message(exc)
        if not_json:
            return JSONResponse(error_body(message, "invalid_request_error", "invalid_json"), status_code=400)
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message, code = str(exc.detail), None
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's own words
            message, code = "the body could not be parsed as JSON; send a JSON object", "invalid_json"
        return JSONResponse(error_body(message, type_, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    app.add_middleware(JsonBodyCheck)  # added first = innermost: bodies are already bounded by BodySizeLimit


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class JsonBodyCheck:
    """ASGI middleware: a request whose body would go to a JSON parser (content type JSON or none) is read,
    checked by `json_body_problem` and replayed to the app; a bad one is answered 400 `invalid_json` here, so no
    route (FastAPI's parser, pydantic, the proxy's msgspec) ever sees it. A NUL in the URL is refused too: no
    path or query value of loop's can hold one, and PostgreSQL cannot compare against one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"") \
                or b"\x00" in scope.get("query_string", b""):
            return await _send_json(send, 400, error_body(
                "the URL contains a NUL character (%00); send path and query values without it",
                "invalid_request_error", "invalid_url"))
        if scope.get("method") not in ("POST", "PUT", "PATCH", "DELETE") or not _json_content(scope):
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the body
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        problem = json_body_problem(raw) if raw else None
        if problem is not None:
            return await _send_json(send, 400, error_body(problem, "invalid_request_error", "invalid_json"))
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as a streamed answer needs

        await self.app(scope, replay, send)


def _json_content(scope: Any) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media.endswith((b"/json", b"+json"))
    return True  # FastAPI parses a body without a content type as JSON


# --- request ids and the catch-all -----------------------------------------------------------------------------
def request_id_of(scope: Any) -> str | None:
    return (scope.get("state") or {}).get("request_id")


class RequestContext:
    """ASGI middleware, outermost: gives each request an id (the client's `X-Request-Id` when it is 1..128 of
    [A-Za-z0-9._:/+=-], else a new uuid), sends it back on every response, and turns any exception nothing else
    handled into a 500 in the error shape with that id, logging the traceback under it. An exception after the
    response has started (a stream) is logged the same way and re-raised: the connection is cut, as it must be."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
        rid = given if given and _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())
        started = False

        async def send_with_id(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.error("unhandled %s in %s %s (request id %s)", type(exc).__name__, scope.get("method"),
                      scope.get("path"), rid, exc_info=exc, extra={"request_id": rid})
            if started:
                raise
            await _send_json(send, 500, error_body(
                f"loop failed on this request ({type(exc).__name__}); this is a bug in loop, not in the request. "
                f"Report it with the request id {rid}: loop's log has the traceback under it",
                "server_error", "internal_error"), [header])


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes` with 413 before the route reads them."""

    def __init__(self, app, max_bytes: int) -> None:  # noqa: ANN001 - ASGI app
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._refuse(send)
        received = 0
        too_big = False

        async def limited_receive():  # noqa: ANN202
            nonlocal received, too_big
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_big = True
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:  # noqa: ANN001
        await _send_json(send, 413, error_body(
            f"request body is larger than the limit of {self.max_bytes} bytes; send less, or raise LOOP_MAX_BODY_BYTES",
            "invalid_request_error", "body_too_large"))


class _TooLarge(Exception):
    pass
