"""The composition root's shutdown (loop/state.py): what requests left behind gets its outcome before the app goes.

A rating queued in the writer when the app stops is committed and acknowledged; a rating that arrives after is
refused as not stored (503, retry); a commit that does not come back within the bound is answered `unknown`,
never dropped. A stream's rows that are being stored in the background when the app stops are stored (committed
by the response writer before the database goes). The
supervised parts start in their order and stop in reverse, after those leftovers, each even when another fails.
The app here is the real one (`create_app(settings, manage=False)`) and its real lifespan; commits and stores are
slowed down so that the stop happens while they are in flight.

Run: .venv/bin/python -m pytest -q tests/unit/api/test_state_shutdown.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session

import loop.feedback.responses as responses_module
from tests.unit.feedback_support import add_response
from loop.api.app import create_app
from loop.config import Settings
from loop.db.models import Rating, Response
from loop.feedback import RatingInput
from loop.state import BackgroundTasks, LoopState
from loop.vllm.client import VLLMClient


def settings_for(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, served_model_name="m", vllm_url="http://fake", admin_token="a" * 32)


def slow_commits(engine: Engine, seconds: float) -> threading.Event:
    """From now on every commit of this engine takes `seconds` (on the writer's thread), so the app stops while
    one is in flight; the event is set once a commit is under way."""
    under_way = threading.Event()

    def on_commit(_conn) -> None:  # noqa: ANN001 - SQLAlchemy Connection
        under_way.set()
        time.sleep(seconds)

    event.listen(engine, "commit", on_commit)
    return under_way


def rows(tmp_path: Path, table: type) -> list:
    """Read with a fresh engine: the app's own is disposed at stop."""
    engine = create_engine(f"sqlite:///{tmp_path / 'loop.db'}")
    try:
        with Session(engine) as s:
            return list(s.scalars(select(table)))
    finally:
        engine.dispose()


async def wait_until(predicate, timeout_s: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_rating_queued_when_the_app_stops_is_stored_and_acknowledged(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path), manage=False)
    async with app.router.lifespan_context(app):
        state: LoopState = app.state.loop
        rid = add_response(state.sessions)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1")
        committing = slow_commits(state.engine, 0.5)
        request = asyncio.create_task(client.post("/api/ratings", json={"response_id": rid, "score": 9}))
        await wait_until(committing.is_set)
        # the lifespan ends here: stop() runs while the rating's commit is in flight
    stored = rows(tmp_path, Rating)
    assert [(r.response_id, r.score) for r in stored] == [(rid, 9)]  # committed before stop() returned
    reply = await request
    await client.aclose()
    assert reply.status_code == 201 and reply.json()["id"] == stored[0].id


async def test_a_rating_after_the_stop_is_refused_as_not_stored(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path), manage=False)
    async with app.router.lifespan_context(app):
        state: LoopState = app.state.loop
        rid = add_response(state.sessions)
    outcome = await state.rating_writer.submit(RatingInput(rid, score=3))
    assert (outcome.kind, outcome.code) == ("unavailable", "storage_unavailable")
    assert "not stored" in (outcome.message or "") and "shutting down" in (outcome.message or "")
    assert rows(tmp_path, Rating) == []


async def test_ratings_still_in_flight_past_the_bound_get_an_outcome_not_silence(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="loop.feedback")
    app = create_app(settings_for(tmp_path), manage=False)
    async with app.router.lifespan_context(app):
        state: LoopState = app.state.loop
        state.drain_timeout_s = 0.2
        rid = add_response(state.sessions)
        committing = slow_commits(state.engine, 1.0)
        writing = asyncio.create_task(state.rating_writer.submit(RatingInput(rid, rater="a", score=1)))
        await wait_until(committing.is_set)
        queued = asyncio.create_task(state.rating_writer.submit(RatingInput(rid, rater="b", score=2)))
        await asyncio.sleep(0)  # queued behind the batch being committed
        stopping = time.monotonic()
        # the lifespan ends here, with a commit that takes longer than the bound
    assert time.monotonic() - stopping < 0.9  # bounded: the stop did not wait for the slow commit
    assert writing.done() and queued.done()
    assert (writing.result().kind, writing.result().code) == ("unknown", "storage_outcome_unknown")
    assert (queued.result().kind, queued.result().code) == ("unavailable", "storage_unavailable")
    assert any("were not written" in r.message for r in caplog.records)
    await asyncio.sleep(1.2)  # let the abandoned commit's thread end before the test's tmp_path goes
    assert [r.rater for r in rows(tmp_path, Rating)] in ([], ["a"])  # "b" was never handed to the database


def vllm_that_breaks_off() -> FastAPI:
    """A vLLM whose stream ends without [DONE]: the proxy stores the rows afterwards, in the background."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        await request.json()

        async def gen() -> AsyncIterator[bytes]:
            chunk = {"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "half"},
                                             "token_ids": [7], "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


async def test_a_stream_store_pending_when_the_app_stops_completes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    insert = responses_module.insert_responses

    def slow_insert(sessions, rows_, **kw) -> int:  # noqa: ANN001, ANN003
        time.sleep(0.5)
        return insert(sessions, rows_, **kw)

    monkeypatch.setattr(responses_module, "insert_responses", slow_insert)
    app = create_app(settings_for(tmp_path), manage=False)
    async with app.router.lifespan_context(app):
        state: LoopState = app.state.loop
        await state.vllm.aclose()
        state.vllm = VLLMClient("http://fake", 5.0, transport=httpx.ASGITransport(vllm_that_breaks_off()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as client:
            r = await client.post("/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "x"}], "stream": True})
        assert r.status_code == 200 and "[DONE]" not in r.text
        await asyncio.sleep(0.1)  # the client left: its stream store journals the rows ...
        assert len(state.response_writer) == 1  # ... and their commit is under way as the app stops
    stored = rows(tmp_path, Response)
    assert [(row.id, row.completion, row.truncated) for row in stored] == [(r.headers["x-loop-response-id"], "half",
                                                                            True)]


async def test_background_tasks_are_awaited_then_bounded_and_failures_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks("test tasks")
    finished: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.05)
        finished.append("quick")

    async def forever() -> None:
        await asyncio.Event().wait()

    async def broken() -> None:
        raise RuntimeError("the store failed")

    quick_task, forever_task = tasks.spawn(quick()), tasks.spawn(forever())
    tasks.spawn(broken())
    caplog.set_level(logging.ERROR, logger="loop.state")
    started = time.monotonic()
    await tasks.close(0.3)
    assert time.monotonic() - started < 2
    assert finished == ["quick"] and quick_task.done() and forever_task.cancelled() and len(tasks) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("a background task failed" in m for m in messages)
    assert any("1 test tasks still running after 0.3 s" in m for m in messages)


async def test_parts_start_in_order_and_stop_in_reverse_after_the_leftovers_even_when_one_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import loop.scheduler
    import loop.training
    import loop.vllm.process

    calls: list[str] = []

    class Part:
        name = "part"

        def __init__(self, *args, **kw) -> None:  # noqa: ANN002, ANN003 - whatever the real part takes
            calls.append(f"build {self.name}")

        async def start(self) -> None:
            calls.append(f"start {self.name}")

        async def stop(self) -> None:
            calls.append(f"stop {self.name}")
            if self.name == "trainer":
                raise RuntimeError("the trainer's stop failed")

        def prepare_supervisor(self, supervisor: Part) -> None:
            calls.append(f"prepare {supervisor.name}")

    parts = {n: type(n, (Part,), {"name": n}) for n in ("worker", "trainer", "supervisor", "scheduler")}
    monkeypatch.setattr(loop.training, "WorkerControl", parts["worker"])
    monkeypatch.setattr(loop.training, "Trainer", parts["trainer"])
    monkeypatch.setattr(loop.vllm.process, "VLLMSupervisor", parts["supervisor"])
    monkeypatch.setattr(loop.scheduler, "Scheduler", parts["scheduler"])
    settings = Settings(data_dir=tmp_path, served_model_name="m", admin_token="a" * 32, worker_enabled=True)
    state = LoopState.open(settings)
    await state.start(manage=True)
    assert calls == ["build worker", "build trainer", "build supervisor", "prepare supervisor", "start supervisor",
                     "start worker", "build scheduler", "start scheduler"]
    calls.clear()
    drained = state.rating_writer.close

    async def close(timeout_s: float) -> None:
        calls.append("drain ratings")
        await drained(timeout_s)

    state.rating_writer.close = close  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, logger="loop.state")
    await state.stop()
    assert calls == ["drain ratings", "stop scheduler", "stop trainer", "stop worker", "stop supervisor"]
    assert any("stopping trainer failed" in r.getMessage() for r in caplog.records)
