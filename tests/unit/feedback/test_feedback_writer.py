"""RatingWriter and write_ratings: concurrent ratings share transactions (group commit), each reply comes after
its commit, and when commits fail every item still gets exactly its own outcome (`unavailable` when nothing was
stored).

Run: .venv/bin/python -m pytest -q tests/unit/feedback/test_feedback_writer.py
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

import loop.feedback.writer as writer_module
from tests.unit.feedback_support import add_response, db_url, sessions  # noqa: F401 - fixtures
from loop.db.models import Rating
from loop.feedback import Outcome, RatingInput, RatingWriter, write_ratings


class InjectedCommitFailure(Exception):
    """What the database raises when it refuses a commit (disk full, I/O error, connection lost)."""


@contextmanager
def failing_commits(sessions: sessionmaker[Session], fail: set[int] | None = None) -> Iterator[list[int]]:
    """Make the listed commits (1 = the first one from now on; None = every one) raise; yields the commit count."""
    engine = sessions.kw["bind"]
    seen = [0]

    def on_commit(_conn) -> None:  # noqa: ANN001 - SQLAlchemy Connection
        seen[0] += 1
        if fail is None or seen[0] in fail:
            raise InjectedCommitFailure(f"commit {seen[0]} refused (injected)")

    event.listen(engine, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(engine, "commit", on_commit)


def stored(sessions: sessionmaker[Session]) -> dict[int, tuple[str, str, int | None]]:
    with sessions() as s:
        return {r.id: (r.response_id, r.rater, r.score) for r in s.scalars(select(Rating))}


async def test_concurrent_ratings_are_group_committed(sessions) -> None:
    ids = [add_response(sessions) for _ in range(10)]
    writer = RatingWriter(sessions, max_batch=64)
    outcomes = await asyncio.gather(*(writer.submit(RatingInput(ids[i % 10], rater=f"r{i}", thumb=1))
                                      for i in range(200)))
    assert [o.kind for o in outcomes] == ["created"] * 200
    assert len({o.body["id"] for o in outcomes}) == 200
    assert writer.written == 200 and writer.batches < 20  # 200 requests, a handful of transactions
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Rating)) == 200


async def test_reply_means_committed(sessions) -> None:
    rid = add_response(sessions)
    writer = RatingWriter(sessions)
    outcome = await writer.submit(RatingInput(rid, thumb=-1, comment="too long"))
    with sessions() as s:  # a fresh connection sees the row the moment the reply is there
        row = s.get(Rating, outcome.body["id"])
        assert row is not None and row.comment == "too long" and row.thumb == -1


async def test_drain_waits_for_pending(sessions) -> None:
    rid = add_response(sessions)
    writer = RatingWriter(sessions, max_batch=8)
    tasks = [asyncio.create_task(writer.submit(RatingInput(rid, rater=f"r{i}", score=5))) for i in range(50)]
    await asyncio.sleep(0)  # let the submits enqueue
    await writer.drain()
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Rating)) == 50
    assert [o.kind for o in await asyncio.gather(*tasks)] == ["created"] * 50


async def test_last_in_batch_is_current(sessions) -> None:
    rid = add_response(sessions)
    writer = RatingWriter(sessions)
    outs = await asyncio.gather(*(writer.submit(RatingInput(rid, rater="same", score=s)) for s in (2, 5, 9)))
    assert [o.body["is_current"] for o in outs] == [False, False, True]
    with sessions() as s:
        assert s.scalars(select(Rating.score).where(Rating.is_current.is_(True))).all() == [9]


def test_batch_commit_fails_then_one_item_commit_fails(sessions) -> None:
    rid = add_response(sessions)
    items = [RatingInput(rid, rater="a", score=1), RatingInput("resp-missing", rater="b", score=2),
             RatingInput(rid, rater="c", score=3), RatingInput(rid, rater="d", score=4)]
    # commit 1: the batch; then one commit per item, in order: the 3rd item's (commit 4) fails as well.
    with failing_commits(sessions, {1, 4}) as commits:
        outcomes = write_ratings(sessions, items)
    assert commits[0] == 5
    assert [o.kind for o in outcomes] == ["created", "not_found", "unavailable", "created"]
    assert outcomes[2].code == "storage_unavailable" and "not stored" in (outcomes[2].message or "")
    rows = stored(sessions)
    assert rows == {outcomes[0].body["id"]: (rid, "a", 1), outcomes[3].body["id"]: (rid, "d", 4)}


def test_every_commit_fails_every_item_is_unavailable_and_nothing_is_stored(sessions) -> None:
    rid = add_response(sessions)
    items = [RatingInput(rid, rater=f"r{i}", score=1 + i, idempotency_key=f"k{i}") for i in range(5)]
    with failing_commits(sessions):
        outcomes = write_ratings(sessions, items)
    assert [(o.kind, o.code) for o in outcomes] == [("unavailable", "storage_unavailable")] * 5
    assert all(o.body is None for o in outcomes)
    assert stored(sessions) == {}
    # The promised retry: the same keys, the database healthy again, one row each.
    again = write_ratings(sessions, items)
    assert [o.kind for o in again] == ["created"] * 5
    assert sorted(stored(sessions)) == sorted(o.body["id"] for o in again)


def test_single_rating_whose_commit_fails_is_unavailable_not_an_exception(sessions) -> None:
    rid = add_response(sessions)
    with failing_commits(sessions, {1}):
        (outcome,) = write_ratings(sessions, [RatingInput(rid, score=5)])
    assert (outcome.kind, outcome.code) == ("unavailable", "storage_unavailable")
    assert stored(sessions) == {}


def test_replay_in_a_failed_batch_follows_whichever_commit_held_the_row(sessions) -> None:
    rid = add_response(sessions)
    first, retry = RatingInput(rid, score=7, idempotency_key="k"), RatingInput(rid, score=7, idempotency_key="k")
    # The batch fails, then the first item's own commit fails: the retry is what stores the row, so it is created.
    with failing_commits(sessions, {1, 2}):
        outcomes = write_ratings(sessions, [first, retry])
    assert [o.kind for o in outcomes] == ["unavailable", "created"]
    assert list(stored(sessions)) == [outcomes[1].body["id"]]
    # The batch fails, the first item's commit succeeds: the retry is a replay of it, same id.
    with failing_commits(sessions, {1}):
        outcomes = write_ratings(sessions, [RatingInput(rid, score=2, idempotency_key="j"),
                                            RatingInput(rid, score=2, idempotency_key="j")])
    assert [o.kind for o in outcomes] == ["created", "replayed"]
    assert outcomes[0].body["id"] == outcomes[1].body["id"]
    assert len(stored(sessions)) == 2


async def test_writer_replies_after_failed_commits_carry_each_items_own_outcome(sessions) -> None:
    ids = [add_response(sessions) for _ in range(4)]
    writer = RatingWriter(sessions, max_batch=64)
    with failing_commits(sessions, {1, 3, 6}):
        outcomes = await asyncio.gather(*(writer.submit(RatingInput(ids[i % 4], rater=f"r{i}", score=1 + i % 10))
                                          for i in range(12)))
    assert len(outcomes) == 12 and {o.kind for o in outcomes} <= {"created", "unavailable"}
    assert any(o.kind == "unavailable" for o in outcomes)
    rows = stored(sessions)
    acknowledged = {o.body["id"]: (ids[i % 4], f"r{i}", 1 + i % 10) for i, o in enumerate(outcomes)
                    if o.kind == "created"}
    assert rows == acknowledged  # every created is its own row, and every unavailable left nothing behind


@pytest.mark.parametrize("broken", [lambda items: [Outcome("created", {"id": 1})] * (len(items) + 1),
                                    lambda items: [Outcome("created", {"id": 1})] * (len(items) - 1),
                                    lambda items: 1 / 0], ids=["too-many", "too-few", "raises"])
async def test_writer_fails_every_waiter_when_outcomes_do_not_match_items(sessions, monkeypatch, broken) -> None:
    monkeypatch.setattr(writer_module, "write_ratings", lambda _sessions, items: broken(items))
    writer = RatingWriter(sessions)
    # A waiter left without an outcome would hang its request forever: bound the wait.
    outcomes = await asyncio.wait_for(asyncio.gather(*(writer.submit(RatingInput(f"resp-{i}", score=3))
                                                       for i in range(5))), 10)
    assert [(o.kind, o.code, o.body) for o in outcomes] == [("unknown", "storage_outcome_unknown", None)] * 5
    assert writer.written == 0
