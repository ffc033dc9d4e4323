"""The error contract (loop/api/errors.py) on the whole app: request ids, the catch-all 500, malformed bodies,
integers past their column, the `n` cap, NUL in generated text, and stored scheduler settings that are not sane.

Every case runs on SQLite and on PostgreSQL (LOOP_TEST_POSTGRES_URL, marker `postgres`), through
`create_app(settings, manage=False)` with the vLLM client pointed at `fake_vllm`, an in-process ASGI stand-in.
Run: `.venv/bin/python -m pytest -q tests/unit/api/test_errors.py` (export LOOP_TEST_POSTGRES_URL for the other leg).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import text

from tests.unit.feedback_support import ADMIN, add_response, db_url  # noqa: F401 - fixture
from loop.api.app import create_app
from loop.config import Settings
from loop.db.models import Response
from loop.db.session import make_engine, migrate
from loop.scheduler import Scheduler
from loop.scheduler.tunables import SETTING
from loop.vllm.client import VLLMClient

MODEL = "m"
BIG = 2**63  # one past the largest BIGINT
NUL_TEXT = "before\x00after \uffff0 and \uffffe"  # a NUL, and text that looks like loop's escapes


def fake_vllm() -> FastAPI:
    """vLLM, small: refuses an unknown model, answers n choices (echoing the last message), streams on request.
    The user message "say nul" gets an answer with NUL characters in it, as a real model can produce."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # noqa: ANN202
        body = await request.json()
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": "model", "code": 404}}, 404)
        last = body["messages"][-1].get("content")
        content = NUL_TEXT if last == "say nul" else last if isinstance(last, str) and last else "ok"  # an echo
        if body.get("stream"):
            async def gen() -> AsyncIterator[bytes]:
                for part in (content[:3], content[3:]):
                    chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": part}, "token_ids": [7],
                                                     "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield b'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
                yield b"data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                    "token_ids": [7, 8]} for i in range(body.get("n") or 1)]
        return {"id": "chatcmpl-x", "object": "chat.completion", "model": MODEL, "choices": choices,
                "prompt_token_ids": [1, 2], "prompt_text": "P"}

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202
        body = await request.json()
        if body.get("model") != MODEL or not isinstance(body.get("prompt"), (str, list)):
            return JSONResponse({"error": {"message": "bad request", "type": "BadRequestError", "code": 400}}, 400)
        return {"id": "cmpl-x", "object": "text_completion", "model": MODEL,
                "choices": [{"index": i, "text": "ok", "finish_reason": "stop", "token_ids": [7]}
                            for i in range(body.get("n") or 1)]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}

    return app


@pytest.fixture
async def loop_app(db_url: str, tmp_path: Path) -> AsyncIterator[SimpleNamespace]:  # noqa: F811
    settings = Settings(data_dir=tmp_path, database_url=db_url, served_model_name=MODEL, vllm_url="http://fake",
                        admin_token=ADMIN)
    app = create_app(settings, manage=False)
    async with app.router.lifespan_context(app):
        state = app.state.loop
        await state.vllm.aclose()
        state.vllm = VLLMClient("http://fake", 5.0, transport=httpx.ASGITransport(fake_vllm()))
        state.scheduler = Scheduler(state)  # its routes, without its loop (manage=False starts none)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as client:
            yield SimpleNamespace(client=client, state=state, app=app, url=db_url)


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


AUTH = {"Authorization": f"Bearer {ADMIN}"}
JSON = {"content-type": "application/json"}


# --- request ids and the catch-all -------------------------------------------------------------------------------
async def test_every_response_has_a_request_id_and_a_sane_one_from_the_client_is_kept(loop_app) -> None:  # noqa: ANN001
    c = loop_app.client
    ok, missing, bad = (await c.get("/api/responses"), await c.get("/api/runs/99"),
                        await c.post("/api/ratings", content=b"{", headers=JSON))
    ids = {r.headers["x-request-id"] for r in (ok, missing, bad)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    assert (await c.get("/api/responses", headers={"X-Request-Id": "client-42.a:b"})).headers["x-request-id"] \
        == "client-42.a:b"
    for insane in ("x" * 129, "has space", "<script>"):
        got = (await c.get("/api/responses", headers={"X-Request-Id": insane})).headers["x-request-id"]
        assert got != insane and len(got) == 32


async def test_an_unexpected_exception_is_a_500_in_the_error_shape_with_its_traceback_logged_under_the_id(
        loop_app, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug deep down")

    monkeypatch.setattr("loop.api.routes.history.list_responses", broken)
    with caplog.at_level(logging.ERROR, logger="loop.api"):
        r = await loop_app.client.get("/api/responses", headers={"X-Request-Id": "report-me-1"})
    err = error_of(r, 500, "internal_error")
    assert err["type"] == "server_error" and "report-me-1" in err["message"] and "a bug deep down" not in err["message"]
    assert r.headers["x-request-id"] == "report-me-1"
    [record] = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "report-me-1"]
    assert record.exc_info and "a bug deep down" in str(record.exc_info[1]) and "GET /api/responses" in record.message


# --- malformed bodies ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/api/ratings", "/api/comparisons",
                                  "/api/candidates", "/api/scheduler/config"])
async def test_bodies_that_are_not_utf8_json_or_nest_too_deep_are_400_invalid_json(loop_app, path: str) -> None:  # noqa: ANN001
    c = loop_app.client
    for body, says in ((b'{"model": "m\xff\xfe"}', "UTF-8"), (b"[" * 5000 + b"]" * 5000, "deeper than 64"),
                       (b'{"a":' * 5000 + b"1" + b"}" * 5000, "deeper than 64"), (b'{"x": ', "JSON"),
                       (b'{"model": "m", "comment": "\\ud800"}', "surrogate"),
                       (b"not json at all", "JSON")):
        err = error_of(await c.post(path, content=body, headers={**JSON, **AUTH}), 400, "invalid_json")
        assert says in err["message"] and "send" in err["message"], (path, err)


async def test_nesting_up_to_the_limit_and_brackets_inside_strings_are_fine(loop_app) -> None:  # noqa: ANN001
    c = loop_app.client
    deep = json.loads("[" * 62 + "]" * 62)  # the body object + "extra" + 62 lists = 64 levels
    r = await c.post("/v1/chat/completions", json=chat(extra_body=deep))
    assert r.status_code == 200, r.text
    r = await c.post("/v1/chat/completions", json=chat("[{" * 5000))
    assert r.status_code == 200, r.text


async def test_a_nul_in_the_url_is_400_not_a_database_error(loop_app) -> None:  # noqa: ANN001
    c = loop_app.client
    for url in ("/api/responses?rater=a%00b", "/api/ratings?tag=%00", "/api/responses/resp-%00",
                "/api/responses?q=x%00"):
        error_of(await c.get(url), 400, "invalid_url")


async def test_a_nul_in_a_name_is_422_naming_the_field(loop_app) -> None:  # noqa: ANN001
    rid = add_response(loop_app.state.sessions)
    for field, value in (("rater", "a\x00"), ("idempotency_key", "k\x00"), ("tags", ["t\x00"])):
        r = await loop_app.client.post("/api/ratings", json={"response_id": rid, "thumb": "up", field: value})
        err = error_of(r, 422)
        assert err["param"] == field and "NUL" in err["message"]


# --- integers past their column ------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, param", [
    ("/api/responses?offset={}", "offset"), ("/api/ratings?offset={}", "offset"),
    ("/api/comparisons?offset={}", "offset"), ("/api/runs?offset={}", "offset"),
    ("/api/responses?weight_version={}", "weight_version"),
    ("/api/export/preference.jsonl?weight_version={}", "weight_version"),
    ("/api/export/unpaired.jsonl?weight_version={}", "weight_version"),
    ("/api/runs/{}", "run_id"),
])
async def test_integers_past_64_bits_are_422_naming_the_field_and_the_largest_one_works(
        loop_app, url: str, param: str) -> None:  # noqa: ANN001
    err = error_of(await loop_app.client.get(url.format(BIG)), 422)
    assert err["param"].endswith(param) and "9223372036854775807" in err["message"]
    r = await loop_app.client.get(url.format(BIG - 1))
    assert r.status_code in (200, 404), r.text  # 404: no run has that id


async def test_restore_of_a_version_past_64_bits_is_422(loop_app) -> None:  # noqa: ANN001
    err = error_of(await loop_app.client.post(f"/api/versions/{BIG}/restore", headers=AUTH), 422)
    assert err["param"].endswith("version")


@pytest.mark.parametrize("ids", [[1e30], [BIG], [0], [-1]])
async def test_train_feedback_ids_outside_the_id_range_are_422(loop_app, ids: list[Any]) -> None:  # noqa: ANN001
    for field in ("rating_ids", "comparison_ids"):
        err = error_of(await loop_app.client.post("/api/train", json={field: ids}, headers=AUTH), 422)
        assert err["param"] == f"{field}.0", err


async def test_a_version_past_32_bits_is_stored_and_listed(loop_app) -> None:  # noqa: ANN001
    rid = add_response(loop_app.state.sessions, weight_version=2**40)
    r = await loop_app.client.get("/api/responses", params={"weight_version": 2**40})
    assert [i["id"] for i in r.json()["items"]] == [rid]


# --- n ---------------------------------------------------------------------------------------------------------------
async def test_n_and_best_of_above_max_n_are_400_naming_the_limit_and_the_setting(loop_app) -> None:  # noqa: ANN001
    c = loop_app.client
    for field, value in (("n", 300), ("n", 17), ("n", BIG), ("best_of", 17)):
        err = error_of(await c.post("/v1/chat/completions", json=chat(**{field: value})), 400, "n_too_large")
        assert err["param"] == field and "16" in err["message"] and "max_n" in err["message"]
    err = error_of(await c.post("/v1/chat/completions", json=chat(n=0)), 400)
    assert err["param"] == "n"
    r = await c.post("/v1/chat/completions", json=chat(n=16))
    assert r.status_code == 200 and len(r.json()["choices"]) == 16


async def test_max_n_is_a_setting(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).max_n == 16
    assert Settings(data_dir=tmp_path, max_n=64).max_n == 64
    with pytest.raises(ValueError, match="max_n"):
        Settings(data_dir=tmp_path, max_n=0)


# --- NUL in generated text -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
async def test_a_nul_vllm_generates_reaches_the_client_and_is_stored_and_read_back_exactly(
        loop_app, stream: bool) -> None:  # noqa: ANN001
    r = await loop_app.client.post("/v1/chat/completions", json=chat("say nul", stream=stream))
    assert r.status_code == 200, r.text
    rid = r.headers["x-loop-response-id"]
    if stream:
        parts = [json.loads(line[6:]) for line in r.text.splitlines()
                 if line.startswith("data: {")]
        assert "".join(p["choices"][0]["delta"].get("content") or "" for p in parts) == NUL_TEXT
    else:
        assert r.json()["choices"][0]["message"]["content"] == NUL_TEXT
    detail = (await loop_app.client.get(f"/api/responses/{rid}")).json()
    assert detail["completion"] == NUL_TEXT
    with loop_app.state.sessions() as s:
        assert s.get(Response, rid).completion == NUL_TEXT
    listed = (await loop_app.client.get("/api/responses", params={"q": "after"})).json()["items"]
    assert [i["id"] for i in listed] == [rid]  # a search still finds it


async def test_nul_in_prompts_and_comments_round_trips(loop_app) -> None:  # noqa: ANN001
    c = loop_app.client
    r = await c.post("/v1/chat/completions", json=chat("a\x00prompt"))
    rid = r.json()["id"]
    detail = (await c.get(f"/api/responses/{rid}")).json()
    assert detail["messages"][0]["content"] == "a\x00prompt" and detail["request"]["messages"] == detail["messages"]
    r = await c.post("/api/ratings", json={"response_id": rid, "thumb": "up", "comment": NUL_TEXT})
    assert r.status_code == 201 and r.json()["comment"] == NUL_TEXT
    assert (await c.get("/api/ratings")).json()["items"][0]["comment"] == NUL_TEXT


async def test_nul_is_stored_escaped_so_no_backend_sees_one(loop_app) -> None:  # noqa: ANN001
    rid = (await loop_app.client.post("/v1/chat/completions", json=chat("say nul"))).json()["id"]
    await loop_app.state.response_writer.drain()  # committed just after the reply (loop.feedback.responses)
    with loop_app.state.sessions() as s:
        raw = s.execute(text("SELECT completion FROM responses WHERE id = :i"), {"i": rid}).scalar()
    assert raw == "before\uffff0after \uffffe0 and \uffffee"


# --- scheduler settings ----------------------------------------------------------------------------------------------
async def test_scheduler_config_refuses_non_finite_and_out_of_range_values(loop_app) -> None:  # noqa: ANN001
    c = loop_app.client
    for raw in (b'{"interval_s": Infinity}', b'{"interval_s": NaN}', b'{"interval_s": -1}', b'{"interval_s": 1e300}',
                b'{"min_pairs": 0}', b'{"min_pairs": 1e30}', b'{"max_wait_s": -Infinity}', b'{"steps": 1000}'):
        err = error_of(await c.post("/api/scheduler/config", content=raw, headers={**JSON, **AUTH}), 422)
        assert err["param"] == json.loads(raw.replace(b"Infinity", b"1").replace(b"NaN", b"1")).popitem()[0]
    r = await c.post("/api/scheduler/config", json={"interval_s": 60}, headers=AUTH)
    assert r.status_code == 200 and r.json()["thresholds"]["interval_s"] == 60


BAD_STORED = [("interval_s", "Infinity"), ("interval_s", "NaN"), ("interval_s", "-1"), ("max_wait_s", "1e300"),
              ("min_pairs", "1e30"), ("min_pairs", "\"eight\""), ("guard_enabled", "3"), ("bogus", "1"),
              ("max_conflict_t", "2.0"), ("poison_alpha", "1.5")]  # a setting an older loop stored; out of range


@pytest.mark.parametrize("name, value", BAD_STORED)
async def test_a_bad_stored_scheduler_setting_is_ignored_with_a_warning_and_no_route_breaks(
        db_url: str, tmp_path: Path, name: str, value: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    migrate(db_url)
    engine = make_engine(db_url)
    state = ('{"overrides": {"%s": %s, "batch_size": 3}, "next_interval_at": %s, "paused": false}'
             % (name, value, value if value != '"eight"' else "1e300"))
    insert = text("INSERT INTO scheduler_state (key, value, updated_at) VALUES ('scheduler', :v, CURRENT_TIMESTAMP)")
    try:
        if db_url.startswith("postgresql") and value in ("Infinity", "NaN"):
            with pytest.raises(Exception, match="invalid input syntax for type json"), engine.begin() as conn:
                conn.execute(insert, {"v": state})  # PostgreSQL's json cannot hold them: nothing to load
            return
        with engine.begin() as conn:
            conn.execute(insert, {"v": state})
    finally:
        engine.dispose()
    settings = Settings(data_dir=tmp_path, database_url=db_url, admin_token=ADMIN, vllm_url="http://fake")
    app = create_app(settings, manage=False)
    with caplog.at_level(logging.WARNING, logger="loop.scheduler"):
        async with app.router.lifespan_context(app):
            app.state.loop.scheduler = Scheduler(app.state.loop)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as c:
                r = await c.get("/api/scheduler")
                assert r.status_code == 200, r.text
                assert r.json()["thresholds"]["batch_size"] == 3  # the sane override is kept
                thresholds = r.json()["thresholds"]
                if name in SETTING:  # back to the configured value
                    assert thresholds[name] == getattr(settings, SETTING[name])
                else:
                    assert name not in thresholds
                for path in ("/api/scheduler/pause", "/api/scheduler/resume", "/api/scheduler/run"):
                    r = await c.post(path, headers=AUTH)
                    assert r.status_code in (200, 202), (path, r.text)
                r = await c.post("/api/scheduler/config", json={"interval_s": 30}, headers=AUTH)
                assert r.status_code == 200, r.text
    assert any("ignoring the stored scheduler" in rec.message for rec in caplog.records)
