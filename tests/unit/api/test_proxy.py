"""The proxy against a tiny fake vLLM (an ASGI app): storage, stripping, ids, errors. The real thing is in
tests/e2e/test_proxy.py; here each behaviour is pinned down fast and without a model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import create_engine, select

from loop.api.app import create_app
from loop.config import Settings
from loop.db.models import Response
from loop.vllm.client import VLLMClient


def fake_vllm(seen: list[dict], delay: float = 0.0) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # noqa: ANN202
        body = await request.json()
        seen.append(body)
        await asyncio.sleep(delay)
        if body["model"] != "m":
            return JSONResponse({"error": {"message": f"The model `{body['model']}` does not exist.",
                                           "type": "NotFoundError", "param": "model", "code": 404}}, 404)
        lp = {"content": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.2}]}
        if body.get("stream"):
            async def gen() -> AsyncIterator[bytes]:
                yield b'data: {"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],' \
                      b'"prompt_token_ids":[1,2],"prompt_text":"P"}\n\n'
                for tok, tid in (("a", 7), ("b", 8)):
                    chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": tok}, "token_ids": [tid],
                             "logprobs": {"content": [{"token": tok, "logprob": -0.5}]},
                             "finish_reason": "stop" if tok == "b" else None}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        choices = [{"index": i, "message": {"role": "assistant", "content": f"ab{i}"}, "logprobs": lp,
                    "finish_reason": "stop", "token_ids": [7, 8]} for i in range(body.get("n") or 1)]
        return {"id": "chatcmpl-x", "object": "chat.completion", "model": "m", "choices": choices,
                "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
                "prompt_token_ids": [1, 2], "prompt_text": "P"}

    @app.get("/health")
    async def health() -> dict:
        return {}

    return app


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[SimpleNamespace]:
    settings = Settings(data_dir=tmp_path, served_model_name="m", request_timeout_s=0.3, vllm_url="http://fake")
    app = create_app(settings, manage=False)
    seen: list[dict] = []
    async with app.router.lifespan_context(app):
        state = app.state.loop
        await state.vllm.aclose()
        state.vllm = VLLMClient("http://fake", 0.3, transport=httpx.ASGITransport(fake_vllm(seen)))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as client:
            yield SimpleNamespace(client=client, state=state, seen=seen, app=app)


async def stored(state, rid: str) -> Response:  # noqa: ANN001
    """The row as committed: the reply does not wait for the commit (loop.feedback.responses), so wait for it."""
    await state.response_writer.drain()
    with state.sessions() as s:
        return s.scalars(select(Response).where(Response.id == rid)).one()


async def test_non_stream_stores_every_choice_and_strips_extras(proxied) -> None:  # noqa: ANN001
    r = await proxied.client.post("/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert r.status_code == 200
    data = r.json()
    ids = r.headers["x-loop-response-id"].split(",")
    assert data["id"] == ids[0] and [c["loop_response_id"] for c in data["choices"]] == ids
    assert all(c["logprobs"] is None and c["token_ids"] is None for c in data["choices"])
    assert data["prompt_token_ids"] is None and data["prompt_text"] is None
    sent = proxied.seen[-1]
    assert "logprobs" not in sent and sent["return_token_ids"] is True and sent["model"] == "m"
    row = await stored(proxied.state, ids[1])
    assert (row.completion, row.completion_token_ids, row.completion_logprobs) == ("ab1", [7, 8], [-0.1, -0.2])
    assert row.prompt_token_ids == [1, 2] and row.prompt_text == "P" and row.choice_index == 1


async def test_with_logprobs_capture_vllm_is_asked_for_them_and_the_client_still_gets_none(proxied) -> None:  # noqa: ANN001
    proxied.state.settings.capture_logprobs = True
    r = await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert proxied.seen[-1]["logprobs"] is True and r.json()["choices"][0]["logprobs"] is None
    assert (await stored(proxied.state, r.json()["id"])).completion_logprobs == [-0.1, -0.2]


async def test_weight_version_is_read_when_the_answer_arrives(proxied) -> None:  # noqa: ANN001
    proxied.state.weight_version = 7
    r = await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.headers["x-loop-weight-version"] == "7" and r.json()["choices"][0]["loop_weight_version"] == 7
    assert (await stored(proxied.state, r.json()["id"])).weight_version == 7


async def test_stream_is_stored_before_done(proxied) -> None:  # noqa: ANN001
    r = await proxied.client.post("/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "x"}], "stream": True})
    rid = r.headers["x-loop-response-id"]
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["id"] == rid for c in chunks) and "prompt_token_ids" not in chunks[0]
    assert all("token_ids" not in ch for c in chunks for ch in c["choices"])
    row = await stored(proxied.state, rid)
    assert row.completion == "ab" and row.completion_token_ids == [7, 8] and row.completion_logprobs == [-0.5, -0.5]
    assert row.stream and not row.truncated and row.prompt_tokens == 2 and row.finish_reason == "stop"


async def test_upstream_error_passes_through(proxied) -> None:  # noqa: ANN001
    r = await proxied.client.post("/v1/chat/completions",
                                  json={"model": "other", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]


async def test_slow_upstream_gives_504(proxied) -> None:  # noqa: ANN001
    proxied.state.vllm = VLLMClient("http://fake", 0.3,
                                    transport=httpx.ASGITransport(fake_vllm(proxied.seen, delay=2.0)))
    r = await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 504 and "did not answer within 0.3 s" in r.json()["error"]["message"]


async def test_starting_supervisor_gives_503_with_progress(proxied) -> None:  # noqa: ANN001
    proxied.state.supervisor = SimpleNamespace(state="starting", describe=lambda: "vLLM is starting (12 s)",
                                               restarts=0, recent_restarts=0, address="unix:/s", socket_path="/s",
                                               settings=SimpleNamespace(vllm_restart_limit=3, vllm_restart_window_s=600),
                                               model_path="p", log_path="l", last_error=None, elapsed_s=lambda: 12.0)
    r = await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["message"] == "vLLM is starting (12 s)"
    h = await proxied.client.get("/health")
    assert h.status_code == 503 and h.json()["vllm"]["state"] == "starting"


async def test_vllm_held_paused_after_an_unfinished_apply_gives_503_with_the_reason(proxied) -> None:  # noqa: ANN001
    why = "the training worker stopped while writing run 7's update; vLLM is kept paused"
    proxied.state.trainer = SimpleNamespace(held_paused=why)
    r = await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["message"] == why and r.json()["error"]["code"] == "vllm_held"
    assert proxied.seen == []  # nothing reached vLLM
    h = await proxied.client.get("/health")
    assert h.status_code == 503 and h.json()["vllm"]["state"] == "held" and h.json()["vllm"]["reason"] == why


async def test_candidates_validation_and_answer(proxied) -> None:  # noqa: ANN001
    r = await proxied.client.post("/api/candidates", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and [c["content"] for c in r.json()["candidates"]] == ["ab0", "ab1"]
    assert proxied.seen[-1]["n"] == 2 and proxied.seen[-1]["temperature"] == 0.9
    r = await proxied.client.post("/api/candidates", json={"messages": [], "n": 2})
    assert r.status_code == 422


async def test_every_request_is_counted_by_route_template_and_status(proxied) -> None:  # noqa: ANN001
    await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    await proxied.client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    await proxied.client.get("/no/such/thing")
    text = (await proxied.client.get("/metrics")).text
    assert 'loop_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'loop_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert 'route="/no/such/thing"' not in text  # raw paths never become labels


async def test_the_reply_does_not_wait_for_the_database_and_a_rating_right_after_it_finds_the_row(
        proxied) -> None:  # noqa: ANN001
    from sqlalchemy import event

    def refuse(conn) -> None:  # noqa: ANN001
        raise OSError(28, "No space left on device (injected commit failure)")

    event.listen(proxied.state.engine, "commit", refuse)
    try:  # the database refuses every commit: the answers still leave, journaled
        r = await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        s = await proxied.client.post("/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "x"}], "stream": True})
        assert r.status_code == 200 and s.text.rstrip().endswith("data: [DONE]")
        ids = [r.json()["id"], s.headers["x-loop-response-id"]]
        assert all(proxied.state.response_writer.pending(i) for i in ids)
        journal = proxied.state.settings.data_dir / "responses.journal"
        assert all(i.encode() in journal.read_bytes() for i in ids)  # would survive the process dying now
        rating = asyncio.create_task(proxied.client.post("/api/ratings", json={"response_id": ids[0], "thumb": "up"}))
        await asyncio.sleep(0.3)
        assert not rating.done()  # waits for the row: neither 404 nor a rating of nothing
    finally:
        event.remove(proxied.state.engine, "commit", refuse)
    assert (await asyncio.wait_for(rating, 10)).status_code == 201
    assert [(await stored(proxied.state, i)).completion for i in ids] == ["ab0", "ab"]
    assert journal.read_bytes() == b""


async def test_a_reply_whose_rows_neither_the_journal_nor_the_database_take_gets_no_id(
        proxied, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from sqlalchemy import event

    def full_disk(rows) -> None:  # noqa: ANN001
        raise OSError(28, "No space left on device (injected journal failure)")

    def refuse(conn) -> None:  # noqa: ANN001
        raise OSError(28, "No space left on device (injected commit failure)")

    monkeypatch.setattr(proxied.state.response_writer, "submit", full_disk)
    r = await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200  # the journal refused: committed before the reply instead
    with proxied.state.sessions() as s:  # no drain: it is there already
        assert s.get(Response, r.json()["id"]) is not None
    event.listen(proxied.state.engine, "commit", refuse)
    try:
        r = await proxied.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
        assert r.headers["retry-after"] == "1" and "x-loop-response-id" not in r.headers
        s = await proxied.client.post("/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "y"}], "stream": True})
        events = [line[6:] for line in s.text.splitlines() if line.startswith("data: ")]
        assert "[DONE]" not in events and json.loads(events[-1])["error"]["code"] == "storage_unavailable"
    finally:
        event.remove(proxied.state.engine, "commit", refuse)
    fresh = create_engine(proxied.state.settings.db_url)  # a new connection: only what was committed
    try:
        with fresh.connect() as conn:
            assert len(conn.execute(select(Response.id)).all()) == 1
    finally:
        fresh.dispose()


async def test_candidates_answer_after_their_rows_are_committed(proxied) -> None:  # noqa: ANN001
    r = await proxied.client.post("/api/candidates", json={"messages": [{"role": "user", "content": "x"}]})
    ids = [c["response_id"] for c in r.json()["candidates"]]
    with proxied.state.sessions() as s:  # no drain: the comparison a person makes next must find both
        assert [s.get(Response, i) is not None for i in ids] == [True, True]


async def test_a_comparison_sent_before_its_responses_are_committed_waits_for_them(proxied) -> None:  # noqa: ANN001
    from sqlalchemy import event

    def refuse(conn) -> None:  # noqa: ANN001
        raise OSError(28, "No space left on device (injected commit failure)")

    event.listen(proxied.state.engine, "commit", refuse)
    try:
        r = await proxied.client.post("/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "x"}], "n": 2})
        a, b = r.headers["x-loop-response-id"].split(",")
        pick = asyncio.create_task(proxied.client.post(
            "/api/comparisons", json={"response_a_id": a, "response_b_id": b, "winner": "a"}))
        await asyncio.sleep(0.3)
        assert not pick.done()  # waiting for the rows, not answering 404
    finally:
        event.remove(proxied.state.engine, "commit", refuse)
    assert (await asyncio.wait_for(pick, 10)).status_code == 201


async def test_history_shows_an_answer_served_before_the_read_even_while_its_commit_is_pending(
        proxied) -> None:  # noqa: ANN001
    from sqlalchemy import event

    def refuse(conn) -> None:  # noqa: ANN001
        raise OSError(28, "No space left on device (injected commit failure)")

    event.listen(proxied.state.engine, "commit", refuse)
    try:
        rid = (await proxied.client.post("/v1/chat/completions",
                                         json={"messages": [{"role": "user", "content": "x"}]})).json()["id"]
        one = asyncio.create_task(proxied.client.get(f"/api/responses/{rid}"))
        listed = asyncio.create_task(proxied.client.get("/api/responses"))
        await asyncio.sleep(0.3)
        assert not one.done() and not listed.done()  # waiting for the commit, not answering 404 / an empty page
    finally:
        event.remove(proxied.state.engine, "commit", refuse)
    assert (await asyncio.wait_for(one, 10)).json()["completion"] == "ab0"
    assert [i["id"] for i in (await asyncio.wait_for(listed, 10)).json()["items"]] == [rid]
