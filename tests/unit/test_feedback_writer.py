"""RatingWriter: concurrent ratings share transactions (group commit), and each reply comes after its commit."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from feedback_support import add_response, db_url, sessions  # noqa: F401 - fixtures
from loop.db.models import Rating
from loop.feedback import RatingInput, RatingWriter


async def test_concurrent_ratings_are_group_committed(sessions) -> None:
    ids = [add_response(sessions) for _ in range(10)]
    writer = RatingWriter(sessions, max_batch=64)
    outcomes = await asyncio.gather(*(writer.submit(RatingInput(ids[i % 10], rater=f"r{i}", thumb=1))
                                      for i in range(200)))
    assert [o.status for o in outcomes] == [201] * 200
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
    assert [o.status for o in await asyncio.gather(*tasks)] == [201] * 50


async def test_last_in_batch_is_current(sessions) -> None:
    rid = add_response(sessions)
    writer = RatingWriter(sessions)
    outs = await asyncio.gather(*(writer.submit(RatingInput(rid, rater="same", score=s)) for s in (2, 5, 9)))
    assert [o.body["is_current"] for o in outs] == [False, False, True]
    with sessions() as s:
        assert s.scalars(select(Rating.score).where(Rating.is_current.is_(True))).all() == [9]
