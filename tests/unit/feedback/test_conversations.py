"""Conversations over real HTTP on SQLite and PostgreSQL: a rater's chats are listed, reopened and saved; a save
from a stale tab is refused and loses nothing; two saves at once cannot both win; other raters see none of them;
a conversation can only name responses loop logged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loop import raters
from loop.api.app import create_app
from loop.config import Settings
from loop.db.session import migrate
from tests.support import ServedApp
from tests.unit.feedback_support import ADMIN, add_response, db_url  # noqa: F401 - fixture


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[ServedApp]:  # noqa: F811
    s = Settings(data_dir=tmp_path, database_url=db_url, admin_token=ADMIN, vllm_url="http://fake",
                 worker_enabled=False, scheduler_enabled=False)
    s.ensure_dirs()
    migrate(s.db_url)
    with ServedApp(create_app(s, manage=False)) as srv:
        yield srv


def _turns(server: ServedApp, prompt: str = "What is 2+2?", answers: tuple[str, ...] = ("4",)) -> list[dict[str, Any]]:
    sessions = server.app.state.loop.sessions
    sibs = [{"response_id": add_response(sessions, prompt=prompt, completion=a), "content": a, "weight_version": 0}
            for a in answers]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "siblings": sibs, "shown": len(sibs) - 1}]


def _error(r: httpx.Response) -> tuple[int, str | None]:
    return r.status_code, r.json()["error"]["code"]


def test_a_conversation_is_listed_reopened_and_continued(server: ServedApp) -> None:
    url = f"{server.url}/api/conversations"
    made = httpx.post(url, json={"turns": _turns(server, answers=("4", "four"))})
    assert made.status_code == 201, made.text
    conv = made.json()
    assert conv["title"] == "What is 2+2?" and conv["revision"] == 1 and conv["rater"] == "anonymous"
    assert conv["turns"][1]["shown"] == 1 and [s["content"] for s in conv["turns"][1]["siblings"]] == ["4", "four"]
    more = conv["turns"] + _turns(server, "And 3+3?", ("6",))
    saved = httpx.put(f"{url}/{conv['id']}", json={"turns": more, "expected_revision": 1})
    assert saved.status_code == 200 and saved.json()["revision"] == 2 and len(saved.json()["turns"]) == 4
    again = httpx.get(f"{url}/{conv['id']}").json()
    assert again["turns"] == saved.json()["turns"]
    second = httpx.post(url, json={"turns": _turns(server, "x" * 100), "title": None}).json()
    assert second["title"] == "x" * 79 + "…"
    listed = httpx.get(url).json()
    assert [c["id"] for c in listed["items"]] == [second["id"], conv["id"]] and listed["total"] == 2
    assert listed["items"][1]["turns"] == 4  # a listing carries counts, not the turns
    assert httpx.delete(f"{url}/{second['id']}").status_code == 204
    assert _error(httpx.get(f"{url}/{second['id']}")) == (404, "conversation_not_found")


def test_a_save_from_a_stale_tab_is_refused_and_loses_nothing(server: ServedApp) -> None:
    url = f"{server.url}/api/conversations"
    conv = httpx.post(url, json={"turns": _turns(server)}).json()
    tab_a = conv["turns"] + _turns(server, "From tab A")
    tab_b = conv["turns"] + _turns(server, "From tab B")
    assert httpx.put(f"{url}/{conv['id']}", json={"turns": tab_a, "expected_revision": 1}).status_code == 200
    stale = httpx.put(f"{url}/{conv['id']}", json={"turns": tab_b, "expected_revision": 1})
    assert _error(stale) == (409, "stale_conversation") and "now 2" in stale.json()["error"]["message"]
    assert httpx.get(f"{url}/{conv['id']}").json()["turns"] == tab_a


def test_two_saves_at_once_one_wins(server: ServedApp) -> None:
    url = f"{server.url}/api/conversations"
    conv = httpx.post(url, json={"turns": _turns(server)}).json()
    bodies = [conv["turns"] + _turns(server, f"tab {i}") for i in range(4)]
    barrier = threading.Barrier(4)
    codes: list[int] = []

    def save(turns: list[dict[str, Any]]) -> None:
        barrier.wait()
        codes.append(httpx.put(f"{url}/{conv['id']}", json={"turns": turns, "expected_revision": 1}).status_code)

    threads = [threading.Thread(target=save, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 409, 409, 409]
    stored = httpx.get(f"{url}/{conv['id']}").json()
    assert stored["revision"] == 2 and stored["turns"] in bodies


def test_only_logged_responses_and_well_formed_turns(server: ServedApp) -> None:
    url = f"{server.url}/api/conversations"
    ghost = [{"role": "user", "content": "hi"},
             {"role": "assistant", "siblings": [{"response_id": "resp-nope", "content": "?"}]}]
    assert _error(httpx.post(url, json={"turns": ghost})) == (422, "unknown_response")
    bad = [
        [{"role": "assistant", "siblings": []}],
        [{"role": "assistant", "siblings": [{"response_id": "r", "content": ""}], "shown": 1}],
        [{"role": "user", "content": "hi", "siblings": [{"response_id": "r"}]}],
        [{"role": "user"}],
        [{"role": "system", "content": "x"}],
    ]
    for turns in bad:
        assert httpx.post(url, json={"turns": turns}).status_code == 422, turns
    assert httpx.get(url).json()["total"] == 0


def test_each_rater_sees_only_their_own(server: ServedApp) -> None:
    url = f"{server.url}/api/conversations"
    _, alice = raters.add(server.app.state.loop.sessions, "alice")
    mine = httpx.post(url, json={"turns": _turns(server)}, headers={"Authorization": f"Bearer {alice}"}).json()
    assert mine["rater"] == "alice"
    assert httpx.get(url).json()["total"] == 0  # anonymous has none
    assert _error(httpx.get(f"{url}/{mine['id']}")) == (404, "conversation_not_found")
    assert _error(httpx.get(f"{url}/{mine['id']}", params={"rater": "bob"})) == (404, "conversation_not_found")
    assert _error(httpx.get(url, params={"rater": "alice"})) == (403, "rater_is_account")
    theirs = httpx.get(url, headers={"Authorization": f"Bearer {alice}"}).json()
    assert [c["id"] for c in theirs["items"]] == [mine["id"]]
    bob = httpx.post(url, json={"turns": _turns(server)}, params={"rater": "bob"}).json()
    assert bob["rater"] == "bob" and httpx.get(url, params={"rater": "bob"}).json()["total"] == 1


async def test_a_conversation_saved_before_its_answer_is_committed_waits_for_it(tmp_path: Path) -> None:
    """The UI saves right after an answer streamed, while that answer's row may still wait for its commit: the save
    waits for it (as a rating does) instead of calling the answer unknown."""
    import asyncio

    from tests.unit.feedback.test_feedback_writer import failing_commits
    from tests.unit.feedback.test_response_writer import row

    app = create_app(Settings(data_dir=tmp_path, admin_token=ADMIN, vllm_url="http://fake", worker_enabled=False,
                              scheduler_enabled=False), manage=False)
    async with app.router.lifespan_context(app):
        state = app.state.loop
        r = row()
        turns = [{"role": "user", "content": "2+2?"},
                 {"role": "assistant", "siblings": [{"response_id": r["id"], "content": "4"}]}]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1:8000") as c:
            with failing_commits(state.sessions):
                state.response_writer.submit([r])
                save = asyncio.create_task(c.post("/api/conversations", json={"turns": turns}))
                await asyncio.sleep(0.5)
                assert not save.done()  # waiting for the answer's commit, not refused
            made = await save
        assert made.status_code == 201, made.text
        assert made.json()["turns"][1]["siblings"][0]["response_id"] == r["id"]
