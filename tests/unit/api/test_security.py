"""The browser guard (loop/api/security.py) on the whole app, `create_app(settings, manage=False)`, over in-process
HTTP: which requests a web page cannot make (foreign Host, non-JSON writes, cross-site writes), what still works
(the UI's own requests, programs, body-less admin POSTs, reads), and the security headers on every answer.

The real service gets the same probes in tests/e2e/test_access_e2e.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import func, select

from tests.unit.feedback_support import add_response
from loop.api.app import create_app
from loop.config import Settings
from loop.db.models import Rating, Response
from loop.vllm.client import VLLMClient

ADMIN = "a" * 32
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def fake_vllm(seen: list[dict]) -> FastAPI:
    """Answers every chat completion with one fixed choice, streamed or not, and records what reached it."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": "hi"}, "token_ids": [7],
                                                 "finish_reason": "stop"}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "x", "object": "chat.completion", "model": "m", "prompt_token_ids": [1, 2],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop",
                             "token_ids": [7], "logprobs": {"content": [{"token": "hi", "logprob": -0.1}]}}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}

    return app


@asynccontextmanager
async def serve(tmp_path: Path, base_url: str = "http://127.0.0.1:8000",
                **settings: Any) -> AsyncIterator[SimpleNamespace]:
    """The whole app with a fake vLLM behind it, and a client whose requests carry `base_url`'s Host."""
    app = create_app(Settings(data_dir=tmp_path, served_model_name="m", vllm_url="http://fake", admin_token=ADMIN,
                              **settings), manage=False)
    seen: list[dict] = []
    async with app.router.lifespan_context(app):
        state = app.state.loop
        await state.vllm.aclose()
        state.vllm = VLLMClient("http://fake", 5, transport=httpx.ASGITransport(fake_vllm(seen)))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=base_url) as client:
            yield SimpleNamespace(client=client, state=state, seen=seen)


@pytest.fixture
async def loop(tmp_path: Path) -> AsyncIterator[SimpleNamespace]:
    async with serve(tmp_path) as s:
        yield s


def count(state: Any, table: type) -> int:
    with state.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def rating_body(state: Any) -> bytes:
    return json.dumps({"response_id": add_response(state.sessions), "thumb": "up", "rater": "probe"}).encode()


CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


def assert_error(r: httpx.Response, status: int, code: str, *words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"]


# --- JSON-only writes: the CORS "simple request" hole ----------------------------------------------------------
async def test_a_text_plain_rating_is_refused_and_nothing_is_stored(loop) -> None:  # noqa: ANN001
    body = rating_body(loop.state)
    r = await loop.client.post("/api/ratings", content=body, headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type", "application/json", "text/plain")
    assert count(loop.state, Rating) == 0
    ok = await loop.client.post("/api/ratings", content=body, headers={"content-type": "application/json"})
    assert ok.status_code == 201 and count(loop.state, Rating) == 1  # the same bytes, sent as JSON, are stored


async def test_a_text_plain_chat_completion_never_reaches_vllm_and_is_not_logged(loop) -> None:  # noqa: ANN001
    r = await loop.client.post("/v1/chat/completions", content=CHAT, headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type", "application/json")
    assert loop.seen == [] and count(loop.state, Response) == 0
    ok = await loop.client.post("/v1/chat/completions", content=CHAT, headers={"content-type": "application/json"})
    await loop.state.response_writer.drain()  # committed just after the reply (loop.feedback.responses)
    assert ok.status_code == 200 and len(loop.seen) == 1 and count(loop.state, Response) == 1


@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain;charset=UTF-8", None,
    "application/json-seq", "text/json",
])
async def test_every_body_that_is_not_json_is_refused(loop, content_type: str | None) -> None:  # noqa: ANN001
    headers = {"content-type": content_type} if content_type else {}
    for path, body in (("/api/ratings", rating_body(loop.state)), ("/v1/chat/completions", CHAT),
                       ("/api/comparisons", b"{}"), ("/api/train", b"{}")):
        r = await loop.client.post(path, content=body, headers=headers)
        assert_error(r, 415, "unsupported_media_type", "application/json")
    assert count(loop.state, Rating) == 0 and loop.seen == []


async def test_json_with_a_charset_parameter_is_json(loop) -> None:  # noqa: ANN001
    r = await loop.client.post("/api/ratings", content=rating_body(loop.state),
                               headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 201, r.text


async def test_a_bodiless_admin_post_needs_no_content_type(loop) -> None:  # noqa: ANN001
    paused: list[bool] = []
    loop.state.scheduler = SimpleNamespace(pause=lambda: paused.append(True), describe=lambda: {"paused": True})
    r = await loop.client.post("/api/scheduler/pause", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json() == {"paused": True} and paused == [True]
    assert "content-type" not in r.request.headers and r.request.headers["content-length"] == "0"


async def test_a_chunked_body_without_json_type_is_refused(loop) -> None:  # noqa: ANN001
    async def chunks() -> AsyncIterator[bytes]:
        yield CHAT

    r = await loop.client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "text/plain"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_error(r, 415, "unsupported_media_type")
    assert loop.seen == []


# --- Host allow-list: DNS rebinding ---------------------------------------------------------------------------
@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/api/responses"), ("POST", "/api/ratings")])
async def test_a_foreign_host_is_refused(tmp_path: Path, method: str, path: str) -> None:
    async with serve(tmp_path, base_url="http://rebound.attacker.example:8000") as s:
        r = await s.client.request(method, path, json={"response_id": "x", "thumb": "up"})
        assert_error(r, 400, "host_not_allowed", "rebound.attacker.example", "LOOP_ALLOWED_HOSTS")
        assert r.headers["x-frame-options"] == "DENY"  # refusals carry the headers too


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost:9", "LOCALHOST", "[::1]:8000", "[::1]"])
async def test_loopback_names_are_served_on_any_port(loop, host: str) -> None:  # noqa: ANN001
    r = await loop.client.get("/api/responses", headers={"host": host})
    assert r.status_code == 200, r.text


async def test_the_bind_host_is_allowed_when_it_is_a_name(tmp_path: Path) -> None:
    signed = {"authorization": f"Bearer {ADMIN}"}  # bound off loopback: every /api request needs a token
    async with serve(tmp_path, base_url="http://loop.lan:8000", host="loop.lan") as s:
        assert (await s.client.get("/api/responses", headers=signed)).status_code == 200
        assert_error(await s.client.get("/api/responses"), 401, "token_missing")
    async with serve(tmp_path, base_url="http://0.0.0.0:8000", host="0.0.0.0") as s:
        assert_error(await s.client.get("/api/responses", headers=signed), 400, "host_not_allowed")


async def test_allowed_hosts_from_the_environment_replace_the_default(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOP_ALLOWED_HOSTS", "loop.lan, 192.168.1.5:8000")
    async with serve(tmp_path, base_url="http://192.168.1.5:8000") as s:
        assert (await s.client.get("/api/responses")).status_code == 200
        assert (await s.client.get("/api/responses", headers={"host": "LOOP.lan"})).status_code == 200
        assert_error(await s.client.get("/api/responses", headers={"host": "localhost"}), 400, "host_not_allowed")


async def test_allowed_hosts_star_switches_the_check_off(tmp_path: Path) -> None:
    async with serve(tmp_path, base_url="http://anything.example", allowed_hosts=["*"]) as s:
        assert (await s.client.get("/api/responses")).status_code == 200
        r = await s.client.post("/api/ratings", json=json.loads(rating_body(s.state)))
        assert r.status_code == 201, r.text


@pytest.mark.parametrize("field, value, words", [
    ("allowed_hosts", "http://loop.lan", "LOOP_ALLOWED_HOSTS"),
    ("allowed_origins", "loop.example.com", "LOOP_ALLOWED_ORIGINS"),
    ("allowed_origins", "https://loop.example.com/ui", "no path"),
    ("allowed_origins", "ftp://loop.example.com", "LOOP_ALLOWED_ORIGINS"),
])
def test_bad_allow_list_entries_are_refused_naming_the_setting(tmp_path: Path, field: str, value: str,
                                                               words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Settings(data_dir=tmp_path, **{field: value})


# --- cross-site writes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:9999",
                                    "https://127.0.0.1:8000", "http://localhost:8000"])
async def test_a_write_from_another_origin_is_refused(loop, origin: str) -> None:  # noqa: ANN001
    body = rating_body(loop.state)
    r = await loop.client.post("/api/ratings", content=body,
                               headers={"content-type": "application/json", "origin": origin})
    assert_error(r, 403, "cross_site_request", "LOOP_ALLOWED_ORIGINS")
    chat = await loop.client.post("/v1/chat/completions", content=CHAT,
                                  headers={"content-type": "application/json", "origin": origin})
    assert_error(chat, 403, "cross_site_request")
    assert count(loop.state, Rating) == 0 and loop.seen == []


async def test_a_cross_site_text_plain_post_is_refused(loop) -> None:  # noqa: ANN001
    r = await loop.client.post("/api/ratings", content=rating_body(loop.state),
                               headers={"content-type": "text/plain", "origin": "http://evil.example"})
    assert r.status_code in (403, 415) and count(loop.state, Rating) == 0


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8000", "HTTP://127.0.0.1:8000"])
async def test_a_write_from_loops_own_page_is_allowed(loop, origin: str) -> None:  # noqa: ANN001
    r = await loop.client.post("/api/ratings", content=rating_body(loop.state),
                               headers={"content-type": "application/json", "origin": origin,
                                        "sec-fetch-site": "same-origin"})
    assert r.status_code == 201, r.text


async def test_the_default_port_is_the_same_origin(tmp_path: Path) -> None:
    async with serve(tmp_path, base_url="http://localhost") as s:
        r = await s.client.post("/api/ratings", json=json.loads(rating_body(s.state)),
                                headers={"origin": "http://localhost:80"})
        assert r.status_code == 201, r.text


async def test_an_allowed_origin_may_write(tmp_path: Path) -> None:
    async with serve(tmp_path, allowed_origins="https://ui.example.com") as s:
        r = await s.client.post("/api/ratings", json=json.loads(rating_body(s.state)),
                                headers={"origin": "https://ui.example.com"})
        assert r.status_code == 201, r.text
        other = await s.client.post("/api/ratings", json=json.loads(rating_body(s.state)),
                                    headers={"origin": "https://ui.example.com:444"})
        assert_error(other, 403, "cross_site_request")


@pytest.mark.parametrize("site, status", [("cross-site", 403), ("same-site", 403), ("same-origin", 201), ("none", 201)])
async def test_without_origin_sec_fetch_site_decides(loop, site: str, status: int) -> None:  # noqa: ANN001
    r = await loop.client.post("/api/ratings", content=rating_body(loop.state),
                               headers={"content-type": "application/json", "sec-fetch-site": site})
    assert r.status_code == status, r.text
    if status == 403:
        assert_error(r, 403, "cross_site_request", "Sec-Fetch-Site")


async def test_reads_stay_open_but_carry_no_cors_headers(loop) -> None:  # noqa: ANN001
    r = await loop.client.get("/api/responses", headers={"origin": "http://evil.example",
                                                         "sec-fetch-site": "cross-site"})
    assert r.status_code == 200
    assert not [h for h in r.headers if h.startswith("access-control-")]
    preflight = await loop.client.options("/api/ratings", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type"})
    assert "access-control-allow-origin" not in preflight.headers


# --- security headers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, path, status", [
    ("GET", "/", 200), ("GET", "/app.js", 200), ("GET", "/api/responses", 200), ("GET", "/health", 503),
    ("GET", "/api/responses/resp-missing", 404), ("POST", "/api/ratings", 415),
])
async def test_every_answer_carries_the_security_headers(loop, method: str, path: str,  # noqa: ANN001
                                                         status: int) -> None:
    r = await loop.client.request(method, path, content=b"x" if method == "POST" else None)
    assert r.status_code == status
    for name, value in SECURITY_HEADERS.items():
        assert r.headers.get(name) == value, (path, name)


async def test_a_streamed_answer_streams_and_carries_the_headers(loop) -> None:  # noqa: ANN001
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with loop.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == "hi"


async def test_the_api_docs_page_gets_only_the_allowance_it_needs(loop) -> None:  # noqa: ANN001
    r = await loop.client.get("/docs")
    csp = r.headers["content-security-policy"]
    assert r.status_code == 200 and "https://cdn.jsdelivr.net" in csp and "frame-ancestors 'none'" in csp
    assert "cdn.jsdelivr.net" not in (await loop.client.get("/")).headers["content-security-policy"]


def test_the_ui_has_no_inline_script_or_style() -> None:
    """What the CSP forbids, the UI must not need: no inline <script>/<style>, style attributes or eval."""
    web = Path(__file__).resolve().parents[3] / "web"
    html = (web / "index.html").read_text()
    assert "<style" not in html and " style=" not in html and "javascript:" not in html
    assert all(" src=" in tag for tag in html.split("<script")[1:])
    for js in [*web.glob("*.js"), *web.glob("js/*.js")]:
        text = js.read_text()
        for banned in (r"\beval\(", r"new Function\(", r"\.(inner|outer)HTML\s*=", r"insertAdjacentHTML\(",
                       r"document\.write", r"\.cssText", r"setAttribute\(\s*[\"']style", r"\bstyle\s*:"):
            assert not re.search(banned, text), f"{js.name} matches {banned}"
