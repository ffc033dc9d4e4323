"""A lean HTTP/1.1 keep-alive client for the proxy's two hot calls to vLLM: a POST read whole, a POST streamed.

Why: every proxied request pays loop's own Python twice (client → loop, loop → vLLM), and on a GPU, where vLLM
answers in tens of milliseconds, that Python runs with cold caches after each wait, so its cost is multiplied.
httpx's per-request layers (URL and header models, anyio streams, pool bookkeeping) were the largest part of it.
Here a request is one `write()` of bytes built in one expression, the response is parsed by httptools (the C
parser uvicorn uses, a declared dependency through uvicorn[standard]) in asyncio protocol callbacks, and the
connection goes back to a pool once its response has been read to its end.

Only plain HTTP over a Unix socket or TCP (`unix:` and `http://` addresses); `VLLMClient` keeps httpx for
https, for test transports and for every other call. Failures raise httpx's exception types, so callers keep
one vocabulary: `httpx.ConnectError` / `ConnectTimeout` when no connection can be made, `httpx.RemoteProtocolError`
when vLLM closes the connection or sends what is not HTTP. A reused connection that fails before any byte of the
answer (vLLM closed it idle at that moment) is retried once on a new one; vLLM had not read the request then.

Tests: tests/unit/api/test_proxy_upstream.py.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx

# Past this much unread answer, reading from vLLM pauses until the proxy catches up (a client reading slowly).
HIGH_WATER = 1 << 20

# vLLM's server closes connections idle for 5 s (uvicorn's keep-alive timeout): one idle longer than this is
# dropped rather than raced against that close.
KEEPALIVE_S = 4.0


class Http1Reply:
    """One response being read. `status_code`, `reason_phrase` and `headers` once `Http1Pool.send` returned;
    the body through `aread()` (then `content`, `text`, `json()`), `aiter_bytes()` or `aiter_lines()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status_code = 0
        self._reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._loop = loop
        self._head: asyncio.Future[None] = loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._content: bytes | None = None
        self._buffered = 0
        self.got_bytes = False
        self.complete = False
        self.keep_alive = False
        self._conn: _Connection | None = None  # until released
        self._release: Callable[[Http1Reply], None] | None = None

    @property
    def reason_phrase(self) -> str:
        return self._reason.decode("latin-1")

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.raw_headers}

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise RuntimeError("the response body has not been read (await aread() first)")
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    async def aread(self) -> bytes:
        if self._content is None:
            self._content = b"".join([chunk async for chunk in self.aiter_bytes()])
        return self._content

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._conn is not None and self._conn.paused and self._buffered < HIGH_WATER // 4:
                    self._conn.resume()
                yield data
            if self.complete:
                if self._release is not None:  # read to its end: the connection serves the next request now
                    self._release(self)
                return
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body as text lines (`\\n` or `\\r\\n` ended), without their ends, as they arrive."""
        rest = b""
        async for chunk in self.aiter_bytes():
            parts = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
            rest = parts.pop()
            for part in parts:
                yield (part[:-1] if part.endswith(b"\r") else part).decode("utf-8", "replace")
        if rest:
            yield rest.decode("utf-8", "replace")

    # --- fed by the connection ---
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: a caller that stopped waiting must not log it as unhandled
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; answers one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply: Http1Reply | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.reply is not None:
            why = f": {exc}" if exc else ""
            self.reply._fail(httpx.RemoteProtocolError(f"vLLM closed the connection before its answer ended{why}"))

    def data_received(self, data: bytes) -> None:
        reply = self.reply
        if reply is None:  # nothing was asked on this connection: it is out of step, drop it
            self.close()
            return
        reply.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            reply._fail(httpx.RemoteProtocolError(f"vLLM's answer is not valid HTTP/1.1: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost reports an unfinished answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.loop.is_closed():
            self.transport.close()

    # --- httptools callbacks ---
    def on_status(self, status: bytes) -> None:
        self.reply._reason += status  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.reply.raw_headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        reply = self.reply
        reply.status_code = self.parser.get_status_code()  # type: ignore[union-attr]
        if not reply._head.done():  # type: ignore[union-attr]
            reply._head.set_result(None)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        reply = self.reply
        reply._chunks.append(body)  # type: ignore[union-attr]
        reply._buffered += len(body)  # type: ignore[union-attr]
        if reply._buffered > HIGH_WATER and not self.paused:  # type: ignore[union-attr]
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        reply._wake()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.paused = False
        if not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        reply = self.reply
        reply.keep_alive = self.parser.should_keep_alive()  # type: ignore[union-attr]
        reply.complete = True  # type: ignore[union-attr]
        reply._wake()  # type: ignore[union-attr]


class Http1Pool:
    """Keep-alive connections to one `http://host:port[/prefix]` server, or to a Unix socket (`socket_path`)."""

    def __init__(self, base_url: str, socket_path: str | None, headers: dict[str, str],
                 connect_timeout: float = 5.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http":
            raise ValueError(f"Http1Pool speaks plain http only, not {parts.scheme!r}")
        self._socket_path = socket_path
        self._host, self._port = parts.hostname or "localhost", parts.port or 80
        self._prefix = parts.path.rstrip("/").encode()
        self._where = socket_path or f"{self._host}:{self._port}"
        fixed = {"host": parts.netloc or "localhost", **{k.lower(): v for k, v in headers.items()}}
        self._fixed = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in fixed.items())
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._closed = False

    async def send(self, path: str, content: bytes) -> Http1Reply:
        """POST `content` as JSON to `path`; returns once the status line and headers are in. The caller reads
        the body and must then `release(reply)` (which the `finally` of every caller does)."""
        conn, reused = await self._acquire()
        try:
            return await self._exchange(conn, path, content)
        except httpx.RemoteProtocolError:
            if not reused or (conn.reply is not None and conn.reply.got_bytes):
                raise
        conn, _ = await self._acquire(fresh=True)  # the reused one was closed under us: one retry, new connection
        return await self._exchange(conn, path, content)

    async def _exchange(self, conn: _Connection, path: str, content: bytes) -> Http1Reply:
        reply = Http1Reply(asyncio.get_running_loop())
        conn.reply = reply
        reply._conn, reply._release = conn, self.release
        conn.transport.write(b"POST %s HTTP/1.1\r\n%scontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"  # type: ignore[union-attr]
                             % (self._prefix + path.encode(), self._fixed, len(content), content))
        try:
            await reply._head
        except BaseException:
            conn.close()
            raise
        return reply

    def release(self, reply: Http1Reply) -> None:
        """Give the reply's connection back when its answer was read to the end, else close it. Done when the
        body has been read to its end, and again (a no-op then) when the caller is finished with the reply."""
        conn = reply._conn
        if conn is None:
            return
        reply._conn = None
        conn.reply = None
        if reply.complete and reply.keep_alive and not (conn.closed or conn.paused or self._closed):
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.append(conn)
        else:
            conn.close()

    async def _acquire(self, fresh: bool = False) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and not fresh:
            conn = self._idle.pop()  # the most recently used: warm, and the least likely to have been closed
            if not conn.closed and conn.loop is loop and now - conn.idle_since < KEEPALIVE_S:
                return conn, True
            conn.close()
        if self._closed:
            raise httpx.ConnectError(f"the connection pool to {self._where} is closed")
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._socket_path is not None:
                    _, conn = await loop.create_unix_connection(_Connection, self._socket_path)
                else:
                    _, conn = await loop.create_connection(_Connection, self._host, self._port)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"no connection to {self._where} within {self._connect_timeout:g} s") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self._where}: {exc}") from exc
        return conn, False

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
