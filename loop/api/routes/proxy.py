"""The OpenAI-compatible logging proxy: /v1/chat/completions, /v1/completions, /v1/models, /api/candidates.

Requests are forwarded to vLLM with token ids and the rendered prompt added, and per-token log-probs when the
capture_logprobs setting asks for them (`loop.vllm.capture.augment`: vLLM's log-prob work is per generated token
and on the reply's path); the reply is stripped back to what the client asked for. Every choice becomes one `responses` row whose id
(`resp-<hex>`) the client gets as the reply's `id`, as `loop_response_id` on each choice and in the
`X-Loop-Response-Id` header, so any OpenAI client can rate it afterwards.

Storage is off the reply path (the contract, and why, is loop.feedback.responses'): before the reply (or the
stream's `[DONE]`) leaves, its rows are appended to the response journal, a `write()` of a few microseconds; the
`ResponseWriter` commits them right after, in batches. Should the journal refuse the write, the rows are committed
before the reply instead, and should that fail too the request answers 503 `storage_unavailable` with no id.
- Non-stream: the reply leaves as soon as vLLM's answer is rewritten (ids added, loop's extras stripped).
- Stream: loop waits for vLLM's first chunk before answering (so a vLLM error or timeout still gets a proper
  status), then relays each chunk as it comes; the rows are journaled when vLLM ends the stream, before `[DONE]`,
  or — when the client leaves early — once, in a background task (`LoopState.stream_stores`, awaited when the
  app stops), marked `truncated`.
- /api/candidates waits for its rows' commit before answering: the comparison a person makes next must find them.
- Weight versions: a response records the first and the last version that generated it (they differ when an
  update lands while it is generated: the pause keeps answers in flight and continues them on the new weights).
  Each is `LoopState.serving_version()` when the token arrives — during a change that is still the old version,
  whatever the record says, since vLLM is paused. A non-stream request sent during a change waits in vLLM's queue
  and starts after it (`_first_version`). Each streamed chunk carries the version it arrived under.
- Bodies are checked as every route's are (loop.api.errors.check_json_body: UTF-8, nesting depth) and `n` /
  `best_of` are capped by the max_n setting (400 `n_too_large`): each choice holds the engine and becomes a row.
Hot path: pooled keep-alive connections to vLLM through loop.vllm.http1 (a finished stream is read to its end,
after [DONE]: its connection is reused), msgspec for JSON, no database round trip, no thread hop.
Tests: tests/unit/api/test_proxy.py, tests/unit/api/test_proxy_stream.py, tests/unit/api/test_proxy_upstream.py,
tests/unit/feedback/test_response_writer.py, tests/e2e/test_proxy_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import msgspec
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response as HTTPResponse
from starlette.responses import StreamingResponse

from loop.api.deps import StateDep
from loop.api.errors import ApiError, check_json_body, error_body
from loop.errors import Unavailable, UpstreamTimeout
from loop.feedback.responses import Row, insert_responses
from loop.state import LoopState
from loop.vllm.capture import (
    Capture,
    RequestInfo,
    Wants,
    augment,
    new_response_id,
    prompt_hash,
    row_values,
    strip_choice,
    strip_top,
)
from loop.vllm.client import UpstreamResponse, VLLMUnreachable

log = logging.getLogger("loop.proxy")

router = APIRouter(tags=["proxy"])

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
JSON = "application/json"


# --- request parsing -------------------------------------------------------------------------------------------
def _parse(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError("the request body is empty; send a JSON object", code="invalid_json")
    check_json_body(raw)  # not UTF-8, or nested too deep: the same 400 as every other route
    try:
        body = _decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(f"the body is not valid JSON ({exc}); send a JSON object", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(f"the body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def _request_info(state: LoopState, body: dict[str, Any], endpoint: str) -> RequestInfo:
    n = _choices(body, "n", state.settings.max_n)
    _choices(body, "best_of", state.settings.max_n)
    body.setdefault("model", state.settings.model_name)
    info = RequestInfo(endpoint=endpoint, request=dict(body), model=str(body["model"]), group_id=uuid.uuid4().hex,
                       stream=bool(body.get("stream")), n=n)
    if endpoint == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ApiError("messages must be a non-empty list of objects like {\"role\": \"user\", \"content\": "
                            "\"...\"}", param="messages")
        info.messages = msgs
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            info.prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            info.prompts = [prompt]  # one prompt given as token ids
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            info.prompts = list(prompt)
        else:
            raise ApiError("prompt must be a non-empty string (or a list of strings / token ids)", param="prompt")
    return info


def _choices(body: dict[str, Any], name: str, max_n: int) -> int:
    """`n` / `best_of`: a positive integer no larger than the max_n setting (each choice holds the engine)."""
    value = body.get(name)
    if value is None:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(f"{name} must be a positive integer, got {value!r}", param=name, code="invalid_n")
    if value > max_n:
        raise ApiError(f"{name} is {value}, above this loop's limit of {max_n} choices per request; ask for at most "
                        f"{max_n} (the limit is the max_n setting, LOOP_MAX_N)", param=name, code="n_too_large")
    return value


def _serving_supervisor(state: LoopState) -> Any:
    """The supervisor whose state decides whether chat is served: replica 0's, or with replicas none while any
    replica is routable (the client routes around the others)."""
    if state.replicas is not None and any(r["routable"] for r in state.vllm.describe()):
        return None
    return state.supervisor


def _ensure_up(state: LoopState) -> None:
    sup = _serving_supervisor(state)
    if sup is not None and sup.state != "ready":
        raise Unavailable(sup.describe(), code=f"vllm_{sup.state}", retry_after_s=5)
    held = getattr(state.trainer, "held_paused", None)
    if held:  # vLLM would queue the request behind a pause that only an operator ends: say so now
        raise Unavailable(held, code="vllm_held", retry_after_s=30)


def _unreachable(state: LoopState, exc: Exception) -> Unavailable:
    sup = _serving_supervisor(state)
    if sup is not None and sup.state != "ready":
        return Unavailable(sup.describe(), code=f"vllm_{sup.state}", retry_after_s=5)
    hint = "" if sup is not None else " — is it running? (attached with --vllm-url)"
    return Unavailable(f"{exc}{hint}", code="vllm_unreachable", retry_after_s=5)


def _timeout(state: LoopState) -> UpstreamTimeout:
    t = state.settings.request_timeout_s
    return UpstreamTimeout(f"vLLM did not answer within {t:g} s (LOOP_REQUEST_TIMEOUT_S); ask for fewer "
                           "max_tokens, retry later, or raise the limit", code="upstream_timeout")


def _passthrough(response: UpstreamResponse, content: bytes) -> HTTPResponse:
    """vLLM's own error, with its status and message, in loop's error shape."""
    try:
        data = _decode(content)
    except msgspec.DecodeError:
        data = None
    if not (isinstance(data, dict) and isinstance(data.get("error"), dict)):
        text = content.decode("utf-8", "replace").strip()[:1000] or response.reason_phrase
        data = error_body(f"vLLM: {text}", "invalid_request_error" if response.status_code < 500 else "upstream_error")
    return HTTPResponse(_encode(data), status_code=response.status_code, media_type=JSON)


def _headers(ids: list[str], version: int) -> dict[str, str]:
    return {"X-Loop-Response-Id": ",".join(ids), "X-Loop-Weight-Version": str(version)}


# How long /api/candidates waits for its rows' commit before answering anyway (they are journaled by then).
CANDIDATES_COMMIT_WAIT_S = 5.0


async def _store(request: Request, state: LoopState, rows: list[Row]) -> None:
    """Hand `rows` to the response writer (journaled now, committed after the reply). When the journal refuses
    them, commit them here, before the reply; raises when that fails too."""
    try:
        state.response_writer.submit(rows)
    except OSError as exc:
        log.error("journaling %d response rows failed (%s); committing them before the reply", len(rows), exc)
        await run_in_threadpool(insert_responses, state.sessions, rows, skip_stored=True)
    metrics = request.app.state.metrics
    for row in rows:
        metrics.stored(row["prompt_tokens"], row["completion_tokens"], truncated=row["truncated"])


# --- non-stream ------------------------------------------------------------------------------------------------
async def complete(request: Request, state: LoopState, path: str, body: dict[str, Any], info: RequestInfo,
                   wants: Wants) -> tuple[dict[str, Any], list[str], int]:
    """Forward a non-stream request, store its choices, return (client reply, response ids, weight version)."""
    _ensure_up(state)
    t0 = time.perf_counter()
    sent = _span_start(state)
    try:
        async with asyncio.timeout(state.settings.request_timeout_s):
            upstream = await state.vllm.post(path, _encode(body))
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise _timeout(state) from exc
    except VLLMUnreachable as exc:
        raise _unreachable(state, exc) from exc
    last = state.serving_version()
    version = _first_version(state, sent, last)
    latency_ms = (time.perf_counter() - t0) * 1000
    if upstream.status_code >= 400:
        raise _UpstreamError(upstream, upstream.content)
    data = _decode(upstream.content)
    choices = data.get("choices") or []
    ids = [new_response_id() for _ in choices]
    if info.endpoint == "chat":
        info.prompt_text = data.get("prompt_text")
    top_ptids = data.get("prompt_token_ids")
    rows = []
    for rid, choice in zip(ids, choices, strict=True):
        cap = Capture(rid, int(choice.get("index", 0)))
        cap.add(choice, info.endpoint)
        rows.append(row_values(info, cap, weight_version=version, weight_version_last=last, latency_ms=latency_ms,
                               ttft_ms=None, prompt_token_ids=top_ptids))
        choice["loop_response_id"] = rid
        choice["loop_weight_version"] = version
        choice["loop_weight_version_last"] = last
        strip_choice(choice, wants, stream=False)
    if rows:
        try:
            await _store(request, state, rows)
        except Exception as exc:  # noqa: BLE001 - the ids would name rows that do not exist: no reply is better
            log.error("storing %d generated choices failed: %s", len(rows), exc)
            raise Unavailable("the answer was generated but could not be stored (neither the response journal nor "
                              "the database took the write), so it is not returned; nothing was stored — retry "
                              "the request", code="storage_unavailable", retry_after_s=1) from exc
    strip_top(data, wants, stream=False)
    if ids:
        data["id"] = ids[0]
    request.app.state.metrics.proxied(info.endpoint, stream=False, latency_s=latency_ms / 1000)
    return data, ids, version


def _span_start(state: LoopState) -> tuple[int, int, bool]:
    return state.serving_version(), state.changes_done, state.changing_from is not None


def _first_version(state: LoopState, sent: tuple[int, int, bool], last: int) -> int:
    """The first version that generated a non-stream answer sent at `sent` (`_span_start`) and received under
    `last`. Sent during a change, it waited in vLLM's queue: when that change is the only one to have ended since,
    every token came after it. Otherwise the version serving at send (a lower bound when several changes passed)."""
    version, done, changing = sent
    if changing and state.changes_done == done + 1:
        return last
    return version


class _UpstreamError(Exception):
    def __init__(self, response: UpstreamResponse, content: bytes) -> None:
        self.response, self.content = response, content


async def _proxy(request: Request, state: LoopState, endpoint: str, path: str) -> HTTPResponse:
    body = _parse(await request.body())
    info = _request_info(state, body, endpoint)
    wants = augment(body, endpoint, logprobs=state.settings.capture_logprobs)
    try:
        if info.stream:
            response = await _open_stream(request, state, path, body, info, wants)
        else:
            data, ids, version = await complete(request, state, path, body, info, wants)
            response = HTTPResponse(_encode(data), media_type=JSON, headers=_headers(ids, version))
    except _UpstreamError as exc:
        response = _passthrough(exc.response, exc.content)
    return response


# --- stream ----------------------------------------------------------------------------------------------------
class _StreamState:
    def __init__(self, info: RequestInfo, wants: Wants, n_choices: int, t0: float) -> None:
        self.info, self.wants, self.t0 = info, wants, t0
        self.ids = [new_response_id() for _ in range(n_choices)]
        self.caps = [Capture(rid, i) for i, rid in enumerate(self.ids)]
        self.version = 0  # the first token's
        self.version_last = 0  # the latest chunk's
        self.ttft_ms: float | None = None
        self.prompt_token_ids: list[int] | None = None
        self.store_started = False
        self.error: str | None = None

    def rows(self, *, truncated: bool) -> list[Row]:
        latency_ms = (time.perf_counter() - self.t0) * 1000
        return [row_values(self.info, cap, weight_version=self.version, weight_version_last=self.version_last,
                           latency_ms=latency_ms,
                           ttft_ms=self.ttft_ms, truncated=truncated, error=self.error,
                           prompt_token_ids=self.prompt_token_ids) for cap in self.caps]

    def transform(self, chunk: dict[str, Any], version: int) -> None:
        """Record one chunk, which arrived while `version` served, and rewrite it for the client (ids, weight
        version, stripped extras)."""
        self.version_last = version
        if self.info.endpoint == "chat":
            if chunk.get("prompt_token_ids") and self.prompt_token_ids is None:
                self.prompt_token_ids = list(chunk["prompt_token_ids"])
            if chunk.get("prompt_text") and self.info.prompt_text is None:
                self.info.prompt_text = chunk["prompt_text"]
        for choice in chunk.get("choices") or ():
            idx = int(choice.get("index", 0))
            if 0 <= idx < len(self.caps):
                self.caps[idx].add(choice, self.info.endpoint)
                choice["loop_response_id"] = self.ids[idx]
            choice["loop_weight_version"] = self.version_last
            strip_choice(choice, self.wants, stream=True)
        strip_top(chunk, self.wants, stream=True)
        chunk["id"] = self.ids[0]


# How long a finished stream's connection may take to end its answer before it is closed instead of reused.
_DRAIN_S = 1.0


async def _next_data(lines: AsyncIterator[str], deadline: float) -> str | None:
    """The next SSE `data:` payload, or None when the stream ends. TimeoutError past the deadline."""
    async with asyncio.timeout_at(deadline):
        async for line in lines:
            if line.startswith("data:"):
                return line[5:].strip()
    return None


async def _open_stream(request: Request, state: LoopState, path: str, body: dict[str, Any], info: RequestInfo,
                       wants: Wants) -> HTTPResponse:
    _ensure_up(state)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    deadline = loop.time() + state.settings.request_timeout_s
    stack = AsyncExitStack()
    try:
        async with asyncio.timeout_at(deadline):
            upstream = await stack.enter_async_context(state.vllm.stream(path, _encode(body)))
            if upstream.status_code >= 400:
                content = await upstream.aread()
                raise _UpstreamError(upstream, content)
        lines = upstream.aiter_lines()
        first = await _next_data(lines, deadline)
    except (TimeoutError, httpx.TimeoutException) as exc:
        await stack.aclose()
        raise _timeout(state) from exc
    except VLLMUnreachable as exc:
        await stack.aclose()
        raise _unreachable(state, exc) from exc
    except BaseException:
        await stack.aclose()
        raise
    n_choices = info.n * max(len(info.prompts), 1)
    st = _StreamState(info, wants, n_choices, t0)
    st.version = st.version_last = state.serving_version()  # the first token is here
    st.ttft_ms = (time.perf_counter() - t0) * 1000
    metrics = request.app.state.metrics

    async def body_iter() -> AsyncIterator[bytes]:
        payload = first
        while payload is not None and payload != "[DONE]":
            try:
                chunk = _decode(payload)
            except msgspec.DecodeError:
                yield f"data: {payload}\n\n".encode()
            else:
                if isinstance(chunk, dict) and "error" in chunk and not chunk.get("choices"):
                    err = chunk["error"]
                    st.error = str(err.get("message") if isinstance(err, dict) else err)
                else:
                    st.transform(chunk, state.serving_version())
                yield b"data: " + _encode(chunk) + b"\n\n"
            try:
                payload = await _next_data(lines, deadline)
            except (TimeoutError, httpx.TimeoutException):
                st.error = _timeout(state).message
                yield b"data: " + _encode(error_body(st.error, "timeout_error", "upstream_timeout")) + b"\n\n"
                return  # stored as truncated by finish()
            except httpx.HTTPError as exc:
                st.error = f"vLLM broke off the stream: {exc!r}"
                yield b"data: " + _encode(error_body(st.error, "upstream_error", "upstream_broken")) + b"\n\n"
                return
        if payload is None:
            st.error = st.error or "vLLM ended the stream without [DONE]"
            return
        # Whole stream received: journal before [DONE] (see the module docstring for what that promises).
        st.store_started = True
        rows = st.rows(truncated=st.error is not None)
        try:
            await _store(request, state, rows)
        except Exception as exc:  # noqa: BLE001 - the ids sent name rows that do not exist: say so, no [DONE]
            log.error("storing %d streamed choices failed: %s", len(rows), exc)
            yield b"data: " + _encode(error_body(
                "the answer could not be stored (neither the response journal nor the database took the write): "
                "its loop_response_id cannot be rated; retry the request", "service_unavailable",
                "storage_unavailable")) + b"\n\n"
            return
        metrics.proxied(info.endpoint, stream=True, latency_s=time.perf_counter() - t0, ttft_s=st.ttft_ms / 1000)
        yield b"data: [DONE]\n\n"
        # Read vLLM's answer to its end (only the chunked terminator is left) before this response ends: a
        # half-read response closes its connection, and the next stream would pay for a new one before vLLM sees it.
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            async with asyncio.timeout(_DRAIN_S):
                async for _ in lines:
                    pass

    async def abandon() -> None:
        """After the client left (or the stream broke): close vLLM's stream, store what arrived, once."""
        await stack.aclose()
        if not st.store_started:
            st.store_started = True
            await _store(request, state, st.rows(truncated=True))

    def finish() -> None:
        state.stream_stores.spawn(abandon())  # awaited at shutdown: LoopState.stop

    return _LoggedStream(body_iter(), finish, headers=_headers(st.ids, st.version))


class _LoggedStream(StreamingResponse):
    """A StreamingResponse that runs `finish()` however the response ends (done, client gone, error)."""

    def __init__(self, content: AsyncIterator[bytes], finish: Any, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._finish = finish

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finish()


# --- routes ----------------------------------------------------------------------------------------------------
# The two hot routes read the state off the app rather than through a dependency: FastAPI's dependency
# resolution is per-request work that buys nothing here.
@router.post("/v1/chat/completions", summary="OpenAI chat completions, forwarded to vLLM and logged")
async def chat_completions(request: Request) -> HTTPResponse:
    return await _proxy(request, request.app.state.loop, "chat", "/v1/chat/completions")


@router.post("/v1/completions", summary="OpenAI text completions, forwarded to vLLM and logged")
async def completions(request: Request) -> HTTPResponse:
    return await _proxy(request, request.app.state.loop, "completion", "/v1/completions")


@router.get("/v1/models", summary="The served model (vLLM's list)")
async def models(state: StateDep) -> HTTPResponse:
    _ensure_up(state)
    try:
        upstream = await state.vllm.get("/v1/models", timeout=30.0)
    except VLLMUnreachable as exc:
        raise _unreachable(state, exc) from exc
    except httpx.TimeoutException as exc:
        raise _timeout(state) from exc
    if upstream.status_code >= 400:
        return _passthrough(upstream, upstream.content)
    return HTTPResponse(upstream.content, media_type=JSON)


class CandidatesRequest(BaseModel):
    messages: list[dict[str, Any]] = Field(..., min_length=1, description="The conversation to answer.")
    temperature: float = Field(0.9, ge=0.0, le=2.0)
    max_tokens: int = Field(256, ge=1, le=8192)
    n: int = Field(2, ge=2, le=4, description="How many answers (2..4).")
    rater: str | None = None


class Candidate(BaseModel):
    response_id: str
    content: str
    finish_reason: str | None


class CandidatesReply(BaseModel):
    prompt_hash: str
    weight_version: int
    candidates: list[Candidate]


@router.post("/api/candidates", response_model=CandidatesReply, tags=["feedback"],
             summary="n sampled answers to one prompt, for an A/B comparison")
async def candidates(req: CandidatesRequest, request: Request, state: StateDep) -> CandidatesReply:
    if not all("role" in m for m in req.messages):
        raise ApiError("every message needs a role, e.g. {\"role\": \"user\", \"content\": \"...\"}",
                        param="messages")
    body: dict[str, Any] = {"model": state.settings.model_name, "messages": req.messages,
                            "temperature": req.temperature, "max_tokens": req.max_tokens, "n": req.n}
    if req.rater:
        body["user"] = req.rater
    info = _request_info(state, body, "chat")
    wants = augment(body, "chat", logprobs=state.settings.capture_logprobs)
    try:
        data, ids, version = await complete(request, state, "/v1/chat/completions", body, info, wants)
    except _UpstreamError as exc:
        return _passthrough(exc.response, exc.content)  # type: ignore[return-value]
    await state.response_writer.settled(ids, CANDIDATES_COMMIT_WAIT_S)
    cands = [Candidate(response_id=c["loop_response_id"], content=(c.get("message") or {}).get("content") or "",
                       finish_reason=c.get("finish_reason")) for c in data.get("choices") or []]
    return CandidatesReply(prompt_hash=prompt_hash(req.messages), weight_version=version, candidates=cands)
