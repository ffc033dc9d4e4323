"""Errors a client can act on.

Every error leaves loop as `{"error": {"message", "type", "code", "param"}}` — the shape the OpenAI SDK parses, so
SDK users see our message in the exception text — with a status that says whose fault it is: 4xx for the
request, 503 when vLLM or the worker is down, 504 when vLLM is too slow.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class LoopError(Exception):
    """An error with an HTTP status and a message that says what to fix."""

    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.code = code
        self.param = param
        self.headers = headers


class NotFound(LoopError):
    status_code = 404
    type = "not_found_error"


class Conflict(LoopError):
    status_code = 409
    type = "conflict_error"


class Unavailable(LoopError):
    """vLLM or the worker cannot serve right now (down, restarting, paused)."""

    status_code = 503
    type = "service_unavailable"


class UpstreamTimeout(LoopError):
    status_code = 504
    type = "timeout_error"


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    first_param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('msg')}); send a JSON object")
        else:
            parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoopError)
    async def _loop_error(_: Request, exc: LoopError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


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
        import json

        body = json.dumps(error_body(
            f"request body is larger than the limit of {self.max_bytes} bytes; send less, or raise LOOP_MAX_BODY_BYTES",
            "invalid_request_error", "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
