"""The one HTTP client loop uses to talk to vLLM.

One pooled `httpx.AsyncClient` per app (keep-alive connections, no per-request client creation: that would cost
a handshake per proxied request). vLLM's address is either `unix:/path/to/sock` (the managed vLLM listens only
on a Unix socket in loop's 0700 run dir: its dev routes /pause, /collective_rpc, ... have no authentication, so
no TCP port may reach them) or an `http(s)://` URL (an external vLLM attached with --vllm-url). The proxy uses the raw helpers (`post`, `stream`, `get`);
`post` and `stream`, the proxy's per-request calls, go through `loop.vllm.http1` (a lean keep-alive HTTP/1.1
client: httpx's per-request Python was the largest part of loop's own cost per request) for `unix:` and `http://`
addresses, and through httpx for https and test transports; both return a response with `status_code`,
`reason_phrase`, `content` / `aread()` and `aiter_lines()`, and fail with httpx's exception types.
the trainer uses the control calls, which need vLLM started with `VLLM_SERVER_DEV_MODE=1` (the supervisor sets
it): `POST /pause?mode=wait|keep|abort`, `POST /resume`, `GET /is_paused`, `POST /reset_prefix_cache`.

Control calls raise `VLLMError` (with vLLM's own message) on a non-2xx answer and `VLLMUnreachable` when nothing
answers, so the caller can tell "vLLM said no" from "vLLM is not there".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from loop.vllm.http1 import KEEPALIVE_S, Http1Pool, Http1Reply

UNIX_PREFIX = "unix:"
SOCKET_BASE_URL = "http://vllm"  # the host part is only a label: the transport connects to the socket
FREEZE_TIMEOUT_S = 30.0  # a keep or abort pause waits for one engine step at most


def parse_address(address: str) -> tuple[str, str | None]:
    """(base URL, Unix socket path or None) for `unix:/path` or `http(s)://host:port`."""
    if address.startswith(UNIX_PREFIX):
        path = address[len(UNIX_PREFIX):].removeprefix("//")
        if not path.startswith("/"):
            raise ValueError(f"a Unix socket address needs an absolute path (unix:/path/to/sock), got {address!r}")
        return SOCKET_BASE_URL, path
    if address.startswith(("http://", "https://")):
        return address.rstrip("/"), None
    raise ValueError(f"vLLM's address must be unix:/path/to/sock or start with http:// or https://, got {address!r}")


def sync_client(address: str, timeout: float = 60.0) -> httpx.Client:
    """A blocking client for the same address (benchmarks, tests, one-off scripts)."""
    base_url, socket_path = parse_address(address)
    transport = httpx.HTTPTransport(uds=socket_path) if socket_path else None
    return httpx.Client(base_url=base_url, timeout=timeout, transport=transport)


# What `VLLMClient.post` / `stream` return: the lean client's reply, or httpx's (https, test transports).
UpstreamResponse = Http1Reply | httpx.Response


class VLLMError(Exception):
    """vLLM answered, but with an error status."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"vLLM answered {status_code}: {message}")
        self.status_code = status_code
        self.message = message


class VLLMUnreachable(Exception):
    """Nothing answered at vLLM's address (not started yet, crashed, wrong --vllm-url)."""


def error_message(response: httpx.Response) -> str:
    """vLLM's own error text from a response body, whatever shape it has."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    return str(data)


class VLLMClient:
    """Async client for one vLLM server at `address` (`unix:/run/dir/vllm.sock` or `http://127.0.0.1:8001`)."""

    def __init__(self, address: str, timeout: float, *, transport: httpx.AsyncBaseTransport | None = None,
                 api_key: str | None = None) -> None:
        """`transport` is for unit tests (an ASGI fake vLLM); leave it None otherwise. `api_key`: sent as a bearer
        token on every request (an attached vLLM started with --api-key; it guards only its /v1 routes)."""
        self.address = address.rstrip("/")
        self.base_url, self.socket_path = parse_address(self.address)
        headers = {"user-agent": "loop", **({"authorization": f"Bearer {api_key}"} if api_key else {})}
        self._fast = Http1Pool(self.base_url, self.socket_path, headers) \
            if transport is None and self.base_url.startswith("http://") else None
        # Idle connections are dropped before vLLM's server closes them (5 s): a request sent on one just as the
        # server closes it fails with "Server disconnected" (a pause that fails that way fails a whole update).
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=KEEPALIVE_S)
        if transport is None and self.socket_path is not None:
            transport = httpx.AsyncHTTPTransport(uds=self.socket_path, limits=limits)  # a transport's own limits
        self.timeout = timeout
        # The read timeout bounds the wait between two bytes; the proxy bounds whole requests itself.
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=limits,
            headers=headers,
            transport=transport,
        )

    # --- raw helpers (the proxy) ---
    async def post(self, path: str, content: bytes, *, timeout: float | None = None) -> UpstreamResponse:
        """POST a JSON body as is; returns the response, read whole, whatever its status. `timeout` bounds the
        whole call (the proxy bounds it itself and leaves it out)."""
        try:
            if self._fast is None:
                return await self._http.post(path, content=content, headers={"content-type": "application/json"},
                                             timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
            async with asyncio.timeout(timeout):
                reply = await self._fast.send(path, content)
                try:
                    await reply.aread()
                finally:
                    self._fast.release(reply)
                return reply
        except TimeoutError as exc:
            if timeout is None:
                raise
            raise httpx.ReadTimeout(f"vLLM at {self.address} did not answer {path} within {timeout:g} s") from exc
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise VLLMUnreachable(f"cannot reach vLLM at {self.address}: {exc}") from exc

    async def get(self, path: str, *, timeout: float | None = None) -> httpx.Response:
        try:
            return await self._http.get(path, timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise VLLMUnreachable(f"cannot reach vLLM at {self.address}: {exc}") from exc

    @asynccontextmanager
    async def stream(self, path: str, content: bytes) -> AsyncIterator[UpstreamResponse]:
        """POST and keep the response open for streaming (`response.aiter_lines()`); on exit its connection is
        reused when the answer was read to its end, else closed."""
        if self._fast is not None:
            try:
                reply = await self._fast.send(path, content)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                raise VLLMUnreachable(f"cannot reach vLLM at {self.address}: {exc}") from exc
            try:
                yield reply
            finally:
                self._fast.release(reply)
            return
        request = self._http.build_request("POST", path, content=content,
                                           headers={"content-type": "application/json"})
        try:
            response = await self._http.send(request, stream=True)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise VLLMUnreachable(f"cannot reach vLLM at {self.address}: {exc}") from exc
        try:
            yield response
        finally:
            await response.aclose()

    # --- status and control (supervisor, health, trainer) ---
    async def health(self, timeout: float = 5.0) -> bool:
        """True when vLLM answers GET /health with 200."""
        return await self.health_problem(timeout) is None

    async def health_problem(self, timeout: float = 5.0) -> str | None:
        """None when vLLM answers GET /health with 200, else what went wrong. vLLM's API process answers
        non-200 when its engine core died while the API process lives on."""
        try:
            response = await self._http.get("/health", timeout=timeout)
        except httpx.HTTPError as exc:
            return f"no answer from vLLM at {self.address} to GET /health ({type(exc).__name__}: {exc})"
        if response.status_code == 200:
            return None
        return f"vLLM at {self.address} answered {response.status_code} to GET /health: {error_message(response)[:200]}"

    async def _control(self, method: str, path: str, params: dict[str, Any] | None = None,
                       timeout: float | None = None) -> Any:
        try:
            response = await self._http.request(method, path, params=params,
                                                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise VLLMUnreachable(f"cannot reach vLLM at {self.address}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise VLLMUnreachable(f"vLLM at {self.address} did not answer {method} {path} in time "
                                  f"({type(exc).__name__})") from exc
        if response.status_code == 404:
            raise VLLMError(404, f"{path} not found: start vLLM with VLLM_SERVER_DEV_MODE=1 (loop serve does)")
        if response.status_code >= 400:
            raise VLLMError(response.status_code, error_message(response))
        try:
            return response.json()
        except ValueError:
            return None

    async def pause(self, mode: str = "wait") -> None:
        """Stop scheduling new work. `wait`: let running requests finish first; `keep`: freeze them in place;
        `abort`: drop them. Returns once vLLM is paused."""
        if mode not in ("wait", "keep", "abort"):
            raise ValueError(f"pause mode must be 'wait', 'keep' or 'abort', not {mode!r}")
        # clear_cache=false: the trainer resets the prefix cache itself, after the weights changed. keep and abort
        # answer at once: a vLLM that has not within FREEZE_TIMEOUT_S is hung (a frozen host behind a remote
        # replica), and the others, already paused, must not wait for it as long as an answer may take.
        await self._control("POST", "/pause", params={"mode": mode, "clear_cache": "false"},
                            timeout=None if mode == "wait" else FREEZE_TIMEOUT_S)

    async def resume(self, timeout: float | None = None) -> None:
        await self._control("POST", "/resume", timeout=timeout)

    async def is_paused(self, timeout: float = 10.0) -> bool:
        data = await self._control("GET", "/is_paused", timeout=timeout)
        return bool(data.get("is_paused")) if isinstance(data, dict) else False

    async def reset_prefix_cache(self) -> None:
        """Drop cached KV blocks: they were computed with the old weights. Requests frozen by a `keep` pause are
        preempted with them (`reset_running_requests`): vLLM recomputes their keys and values from their tokens
        when it resumes. vLLM answers `{"success": false}` when blocks stay held; that is an error here, since
        resuming would serve the stale cache."""
        data = await self._control("POST", "/reset_prefix_cache", params={"reset_running_requests": "true"})
        if isinstance(data, dict) and data.get("success") is False:
            raise VLLMError(409, "vLLM could not reset its prefix cache (blocks still held), so cached keys and "
                            "values of the old weights would be served")

    async def models(self) -> dict[str, Any]:
        """vLLM's GET /v1/models answer."""
        return await self._control("GET", "/v1/models", timeout=10.0)

    async def aclose(self) -> None:
        if self._fast is not None:
            self._fast.close()
        await self._http.aclose()
