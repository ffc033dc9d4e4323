"""`loop openwebui sync` (loop/openwebui.py) against a fake Open WebUI and a real database (SQLite and PostgreSQL).

The fake answers the two routes sync reads with the shapes of Open WebUI 0.12.4's source
(routers/evaluations.py `GET /api/v1/evaluations/feedbacks/list` -> FeedbackListResponse, 30 items a page;
routers/chats.py `GET /api/v1/chats/{id}` -> ChatResponse with chat.history.messages linked by parentId) and
checks the admin key. Specified here: a thumb lands on the exact logged response and nowhere else, an answer loop
never logged is reported and not guessed, a tie goes to the response logged closest in time, a re-sync stores
nothing twice, an edited feedback supersedes, and Open WebUI unreachable or refusing the key stores nothing.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loop import openwebui
from loop.cli import main as cli_main
from loop.db.models import Rating, Response
from loop.errors import Invalid, Unavailable
from loop.vllm.capture import prompt_hash
from tests.unit.feedback_support import add_response, db_url, sessions  # noqa: F401 - fixtures

KEY = "sk-admin-key"
T0 = datetime(2026, 11, 30, 9, 0, tzinfo=timezone.utc)


def logged(sessions: sessionmaker[Session], messages: list[dict[str, str]], completion: str,  # noqa: F811
           at: datetime = T0) -> str:
    """A response row as loop's proxy logs a chat completion: the prompt's messages and their prompt_hash."""
    rid = add_response(sessions, completion=completion, created_at=at)
    with sessions() as s, s.begin():
        s.execute(update(Response).where(Response.id == rid)
                  .values(messages=messages, request={"messages": messages}, prompt_hash=prompt_hash(messages)))
    return rid


class FakeOpenWebUI:
    """Open WebUI's feedback and chat routes, in memory."""

    def __init__(self) -> None:
        self.chats: dict[str, dict[str, Any]] = {}
        self.feedbacks: list[dict[str, Any]] = []
        self.users = {"u1": {"id": "u1", "name": "Alice", "email": "alice@example.com", "role": "user"}}
        self.down = False
        self.revoke_after_list = False  # the key stops working once the feedback list was read
        self.revoked = False
        self.requests: list[str] = []

    def chat(self, turns: list[tuple[str, str]], *, system: str | None = None, at: datetime = T0,
             extra_branch: bool = True) -> tuple[str, str]:
        """A chat of (user, assistant) turns; returns (chat id, id of the last assistant message). With
        `extra_branch`, the first user message also has a regenerated sibling answer that the chain must skip."""
        chat_id, msgs, parent = str(uuid.uuid4()), {}, None
        last = ""
        for user, answer in turns:
            uid, aid = str(uuid.uuid4()), str(uuid.uuid4())
            msgs[uid] = {"id": uid, "parentId": parent, "childrenIds": [aid], "role": "user", "content": user,
                         "timestamp": int(at.timestamp())}
            msgs[aid] = {"id": aid, "parentId": uid, "childrenIds": [], "role": "assistant", "content": answer,
                         "model": "SmolLM2-135M-Instruct", "timestamp": int(at.timestamp())}
            if parent:
                msgs[parent]["childrenIds"].append(uid)
            parent, last = aid, aid
            if extra_branch:
                sib = str(uuid.uuid4())
                msgs[sib] = {"id": sib, "parentId": uid, "childrenIds": [], "role": "assistant",
                             "content": "a discarded regeneration", "timestamp": int(at.timestamp())}
                msgs[uid]["childrenIds"].append(sib)
                extra_branch = False
        body: dict[str, Any] = {"id": "", "title": "t", "models": ["SmolLM2-135M-Instruct"], "params": {},
                                "history": {"messages": msgs, "currentId": last}, "messages": list(msgs.values())}
        if system:
            body["params"]["system"] = system
        self.chats[chat_id] = {"id": chat_id, "user_id": "u1", "title": "t", "chat": body,
                               "updated_at": int(at.timestamp()), "created_at": int(at.timestamp()),
                               "share_id": None, "archived": False, "pinned": False, "meta": {}, "folder_id": None}
        return chat_id, last

    def rate(self, chat_id: str, message_id: str, rating: int = 1, *, score: int | None = None,
             comment: str = "", reason: str = "", tags: list[str] | None = None, user_id: str = "u1") -> str:
        fid = str(uuid.uuid4())
        data: dict[str, Any] = {"rating": rating, "model_id": "SmolLM2-135M-Instruct", "sibling_model_ids": None,
                                "reason": reason, "comment": comment, "tags": tags or []}
        if score is not None:
            data["details"] = {"rating": score}
        now = int(T0.timestamp()) + len(self.feedbacks)
        self.feedbacks.append({"id": fid, "user_id": user_id, "version": 0, "type": "rating", "data": data,
                               "meta": {"arena": False, "chat_id": chat_id, "message_id": message_id,
                                        "tags": []},
                               "created_at": now, "updated_at": now})
        return fid

    def edit(self, fid: str, **data: Any) -> None:
        f = next(f for f in self.feedbacks if f["id"] == fid)
        f["data"].update(data)
        f["updated_at"] += 60

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.revoked or request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"detail": "Not authenticated"})
        path = request.url.path
        if path == "/api/v1/evaluations/feedbacks/list":
            self.revoked = self.revoke_after_list
            ordered = sorted(self.feedbacks, key=lambda f: f["updated_at"])
            page = int(request.url.params.get("page", "1"))
            items = [{**copy.deepcopy(f), "user": {**self.users[f["user_id"]], "last_active_at": 0,
                                                   "updated_at": 0, "created_at": 0}}
                     for f in ordered[(page - 1) * 30:page * 30]]
            return httpx.Response(200, json={"items": items, "total": len(self.feedbacks)})
        if path.startswith("/api/v1/chats/"):  # a chat that is gone gets 401, as in Open WebUI
            chat = self.chats.get(path.rsplit("/", 1)[1])
            return httpx.Response(200, json=chat) if chat else \
                httpx.Response(401, json={"detail": "We could not find what you're looking for :/"})
        return httpx.Response(404, json={"detail": "Not Found"})


@pytest.fixture
def owui() -> FakeOpenWebUI:
    return FakeOpenWebUI()


@pytest.fixture
def run_sync(sessions: sessionmaker[Session], owui: FakeOpenWebUI) -> Callable[..., openwebui.SyncReport]:  # noqa: F811
    return partial(openwebui.sync, sessions, "http://owui.test", KEY, transport=httpx.MockTransport(owui.handler))


def ratings(sessions: sessionmaker[Session]) -> list[Rating]:  # noqa: F811
    with sessions() as s:
        return list(s.scalars(select(Rating).order_by(Rating.id)))


def test_a_thumb_lands_on_the_exact_logged_response(sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
                                                    run_sync: Callable[..., openwebui.SyncReport]) -> None:
    system = "Be brief."
    prompt = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    right = logged(sessions, prompt, "4")
    other_prompt = logged(sessions, [{"role": "user", "content": "What is 2+2?"}], "4")  # same answer, other prompt
    other_answer = logged(sessions, prompt, "5")  # same prompt, other answer
    chat_id, message_id = owui.chat([("Hi", "Hello!"), ("What is 2+2?", "4\n")], system=system)
    owui.rate(chat_id, message_id, 1, score=9, comment=" Correct ", reason="Accurate information", tags=["math"])

    report = run_sync()

    assert (report.feedbacks, report.created, report.unmatched, report.failed) == (1, 1, [], [])
    (r,) = ratings(sessions)
    assert r.response_id == right and r.response_id not in (other_prompt, other_answer)
    assert (r.rater, r.thumb, r.score, r.comment, r.tags, r.is_current) == \
        ("openwebui:alice@example.com", 1, 9, "Correct", ["math", "Accurate information"], True)


def test_a_system_prompt_from_open_webui_settings_still_matches_nearby_in_time(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
        run_sync: Callable[..., openwebui.SyncReport]) -> None:
    """The user's (or the model's) system prompt in Open WebUI is sent to loop but not stored in the chat."""
    turns = [{"role": "user", "content": "Hi"}]
    with_system = logged(sessions, [{"role": "system", "content": "You are terse."}, *turns], "Hello", at=T0)
    logged(sessions, [{"role": "system", "content": "x"}, {"role": "user", "content": "Hi!"}], "Hello", at=T0)
    near = owui.rate(*owui.chat([("Hi", "Hello")], at=T0 + timedelta(seconds=30)), 1)
    too_far = owui.rate(*owui.chat([("Hi", "Hello")], at=T0 + timedelta(hours=2)), 1)

    report = run_sync()

    assert report.created == 1 and report.unmatched == [too_far] and near not in report.unmatched
    assert [r.response_id for r in ratings(sessions)] == [with_system]


def test_the_name_names_a_user_without_an_email(sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
                                                run_sync: Callable[..., openwebui.SyncReport]) -> None:
    owui.users["u1"]["email"] = ""
    logged(sessions, [{"role": "user", "content": "Hi"}], "Hello")
    owui.rate(*owui.chat([("Hi", "Hello")]), -1)
    assert run_sync().created == 1
    assert [(r.rater, r.thumb, r.score, r.comment) for r in ratings(sessions)] == \
        [("openwebui:Alice", -1, None, None)]


def test_an_answer_loop_never_logged_is_reported_not_guessed(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
        run_sync: Callable[..., openwebui.SyncReport]) -> None:
    logged(sessions, [{"role": "user", "content": "Hi"}], "Hello")
    other_model = owui.rate(*owui.chat([("Hi", "Hey there")]), 1)  # answered by another model: not loop's
    gone = owui.rate("deleted-chat", "m1", 1)  # its chat was deleted
    no_message = owui.rate(owui.chat([("Hi", "Hello")])[0], "not-a-message", 1)
    unrated = owui.rate(*owui.chat([("Hi", "Hello")]), 0)  # a feedback with nothing in it

    report = run_sync()

    assert sorted(report.unmatched) == sorted([other_model, gone, no_message])
    assert report.skipped == [unrated] and report.created == 0 and ratings(sessions) == []
    assert other_model in report.summary()


def test_identical_logged_answers_go_to_the_one_closest_in_time(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
        run_sync: Callable[..., openwebui.SyncReport]) -> None:
    prompt = [{"role": "user", "content": "Hi"}]
    logged(sessions, prompt, "Hello", at=T0 - timedelta(hours=1))
    near = logged(sessions, prompt, "Hello", at=T0 + timedelta(seconds=2))
    logged(sessions, prompt, "Hello", at=T0 + timedelta(hours=1))
    owui.rate(*owui.chat([("Hi", "Hello")], at=T0), 1)

    report = run_sync()

    assert (report.created, report.ambiguous) == (1, 1)
    assert [r.response_id for r in ratings(sessions)] == [near]


def test_a_resync_stores_nothing_twice(sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
                                      run_sync: Callable[..., openwebui.SyncReport]) -> None:
    for i in range(35):  # more than one page of Open WebUI's list
        logged(sessions, [{"role": "user", "content": f"q{i}"}], f"a{i}")
        owui.rate(*owui.chat([(f"q{i}", f"a{i}")]), 1 if i % 2 else -1)

    first, second = run_sync(), run_sync()

    assert (first.feedbacks, first.created, first.replayed) == (35, 35, 0)
    assert (second.feedbacks, second.created, second.replayed) == (35, 0, 35)
    assert len(ratings(sessions)) == 35


def test_an_edited_feedback_supersedes_its_rating(sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
                                                  run_sync: Callable[..., openwebui.SyncReport]) -> None:
    rid = logged(sessions, [{"role": "user", "content": "Hi"}], "Hello")
    fid = owui.rate(*owui.chat([("Hi", "Hello")]), 1, score=8, comment="nice")
    run_sync()
    owui.edit(fid, rating=-1, details={"rating": 3}, comment="")  # changed their mind, dropped the comment

    report = run_sync()

    assert (report.created, report.replayed) == (1, 0)
    old, new = ratings(sessions)
    assert (old.thumb, old.score, old.comment, old.is_current) == (1, 8, "nice", False)
    assert (new.response_id, new.thumb, new.score, new.comment, new.is_current) == (rid, -1, 3, None, True)
    assert run_sync().replayed == 1 and len(ratings(sessions)) == 2


def test_a_feedback_deleted_in_open_webui_withdraws_its_rating_even_in_an_incremental_sync(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
        run_sync: Callable[..., openwebui.SyncReport]) -> None:
    for i in range(3):
        logged(sessions, [{"role": "user", "content": f"q{i}"}], f"a{i}")
        owui.rate(*owui.chat([(f"q{i}", f"a{i}")]), 1)
    first = run_sync()
    gone = owui.feedbacks.pop(0)["id"]

    report = run_sync(since=first.latest)  # the poller's next round: only what changed, yet the deletion is seen

    assert report.withdrawn == [gone] and report.failed == []
    assert "1 deleted in Open WebUI" in report.summary() and report.to_json()["withdrawn"] == [gone]
    current = [r for r in ratings(sessions) if r.is_current]
    withdrawn = [r for r in current if r.idempotency_key == f"openwebui:{gone}:deleted"]
    assert len(withdrawn) == 1 and (withdrawn[0].thumb, withdrawn[0].score, withdrawn[0].comment) == (None, None, None)
    assert sum(r.thumb == 1 for r in current) == 2  # the other two stand
    again = run_sync()
    assert again.withdrawn == [] and len(ratings(sessions)) == 4  # nothing withdrawn twice


def test_a_rating_changed_in_loop_after_the_import_survives_the_deletion(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
        run_sync: Callable[..., openwebui.SyncReport]) -> None:
    from loop.feedback.store import RatingInput, write_ratings

    rid = logged(sessions, [{"role": "user", "content": "Hi"}], "Hello")
    owui.rate(*owui.chat([("Hi", "Hello")]), 1)
    run_sync()
    (imported,) = ratings(sessions)
    # the same rater edits it through loop: the current rating is no longer Open WebUI's import
    (out,) = write_ratings(sessions, [RatingInput(response_id=rid, rater=imported.rater, comment="still good",
                                                  given=frozenset({"comment"}))])
    assert out.kind == "created"
    owui.feedbacks.clear()

    report = run_sync()

    assert report.withdrawn == [] and report.failed == []
    current = [r for r in ratings(sessions) if r.is_current]
    assert [(r.thumb, r.comment) for r in current] == [(1, "still good")]


def test_since_reads_only_newer_feedback(sessions: sessionmaker[Session], owui: FakeOpenWebUI,  # noqa: F811
                                         run_sync: Callable[..., openwebui.SyncReport]) -> None:
    for i in range(3):
        logged(sessions, [{"role": "user", "content": f"q{i}"}], f"a{i}")
        owui.rate(*owui.chat([(f"q{i}", f"a{i}")]), 1)
    report = run_sync(since=T0.timestamp() + 1)
    assert (report.feedbacks, report.created) == (2, 2)


@pytest.mark.parametrize("failure", ["down", "wrong_key", "chats_refused"])
def test_open_webui_unreachable_or_refusing_stores_nothing(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI, failure: str) -> None:  # noqa: F811
    logged(sessions, [{"role": "user", "content": "Hi"}], "Hello")
    owui.rate(*owui.chat([("Hi", "Hello")]), 1)
    owui.down = failure == "down"
    owui.revoke_after_list = failure == "chats_refused"
    key = "sk-wrong" if failure == "wrong_key" else KEY
    expected = Unavailable if failure == "down" else Invalid
    with pytest.raises(expected) as err:
        openwebui.sync(sessions, "http://owui.test", key, transport=httpx.MockTransport(owui.handler))
    assert ("did not answer" if failure == "down" else "refused the API key") in err.value.message
    assert ratings(sessions) == []


def test_no_api_key_is_refused_before_any_request(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI) -> None:  # noqa: F811
    with pytest.raises(Invalid, match="LOOP_OPENWEBUI_API_KEY"):
        openwebui.sync(sessions, "http://owui.test", "", transport=httpx.MockTransport(owui.handler))
    assert owui.requests == []


def test_the_cli_prints_the_report_and_exits_by_outcome(db_url: str, owui: FakeOpenWebUI,  # noqa: F811
                                                        sessions: sessionmaker[Session],  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(openwebui, "sync", partial(openwebui.sync, transport=httpx.MockTransport(owui.handler)))
    monkeypatch.setenv("LOOP_OPENWEBUI_API_KEY", KEY)
    logged(sessions, [{"role": "user", "content": "Hi"}], "Hello")
    owui.rate(*owui.chat([("Hi", "Hello")]), 1)
    args = ["openwebui", "sync", "--url", "http://owui.test", "--database-url", db_url]
    assert cli_main(args) == 0
    assert "1 feedback(s): 1 stored" in capsys.readouterr().out
    lost = owui.rate(*owui.chat([("Hi", "never logged")]), 1)
    assert cli_main([*args, "--json"]) == 2
    assert lost in capsys.readouterr().out
    monkeypatch.setenv("LOOP_OPENWEBUI_API_KEY", "sk-wrong")
    assert cli_main(args) == 1
    assert "refused the API key" in capsys.readouterr().err
    assert len(ratings(sessions)) == 1


def test_the_cli_says_when_open_webui_is_not_there(db_url: str, sessions: sessionmaker[Session],  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOOP_OPENWEBUI_API_KEY", KEY)
    assert cli_main(["openwebui", "sync", "--url", "http://127.0.0.1:9", "--database-url", db_url]) == 1
    assert "did not answer" in capsys.readouterr().err and ratings(sessions) == []
    monkeypatch.delenv("LOOP_OPENWEBUI_URL", raising=False)
    assert cli_main(["openwebui", "sync", "--database-url", db_url]) == 1
    assert "--url" in capsys.readouterr().err
    monkeypatch.setenv("LOOP_OPENWEBUI_URL", "http://127.0.0.1:9")  # the setting stands in for --url
    assert cli_main(["openwebui", "sync", "--database-url", db_url]) == 1
    assert "127.0.0.1:9 did not answer" in capsys.readouterr().err


async def test_the_poller_reads_everything_once_then_only_what_changed(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI) -> None:  # noqa: F811
    poller = openwebui.Poller(sessions, "http://owui.test", KEY, 60, transport=httpx.MockTransport(owui.handler))
    for i in range(3):
        logged(sessions, [{"role": "user", "content": f"q{i}"}], f"a{i}")
        owui.rate(*owui.chat([(f"q{i}", f"a{i}")]), 1)
    first = await poller.round()
    assert first is not None and (first.feedbacks, first.created) == (3, 3)
    fid = owui.feedbacks[0]["id"]
    owui.edit(fid, rating=-1)  # now the newest change
    later = await poller.round()
    assert later is not None and (later.feedbacks, later.created, later.replayed) == (2, 1, 1)  # + the newest seen
    assert [r.thumb for r in ratings(sessions) if r.is_current].count(-1) == 1 and len(ratings(sessions)) == 4


async def test_a_failed_poll_is_logged_and_the_next_one_catches_up(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    poller = openwebui.Poller(sessions, "http://owui.test", KEY, 60, transport=httpx.MockTransport(owui.handler))
    logged(sessions, [{"role": "user", "content": "Hi"}], "Hello")
    owui.rate(*owui.chat([("Hi", "Hello")]), 1)
    owui.down = True
    assert await poller.round() is None
    assert "did not answer" in (poller.last_error or "") and "did not answer" in caplog.text
    assert ratings(sessions) == []
    owui.down = False
    report = await poller.round()
    assert report is not None and report.created == 1 and poller.last_error is None


async def test_the_poller_runs_in_the_background_until_stopped(
        sessions: sessionmaker[Session], owui: FakeOpenWebUI) -> None:  # noqa: F811
    poller = openwebui.Poller(sessions, "http://owui.test", KEY, 0.05, transport=httpx.MockTransport(owui.handler))
    await poller.start()
    try:
        logged(sessions, [{"role": "user", "content": "Hi"}], "Hello")
        owui.rate(*owui.chat([("Hi", "Hello")]), 1)
        for _ in range(200):
            if ratings(sessions):
                break
            await asyncio.sleep(0.05)
        assert len(ratings(sessions)) == 1
    finally:
        await poller.stop()
    seen = len(owui.requests)
    await asyncio.sleep(0.2)
    assert len(owui.requests) == seen  # stopped: no more requests
