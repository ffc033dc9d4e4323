"""The rating queue over HTTP on a real database (SQLite and PostgreSQL): which answer comes next (under-rated
first, oldest first, never one the caller rated or skipped), assignment to N raters, progress, per-rater counts
and agreement, withdrawn ratings, two raters at once, who the caller is, and bad input.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/feedback/test_queue.py
(export LOOP_TEST_POSTGRES_URL=... for the PostgreSQL leg).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.unit.feedback_support import add_response, db_url, feedback_app, sessions  # noqa: F401 - fixtures
from loop import raters
from loop.api.routes import queue
from loop.config import Settings

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def queue_app(sessions, db_url: str, tmp_path: Path, **settings: Any) -> FastAPI:  # noqa: F811 - fixture names
    app = feedback_app(Settings(data_dir=tmp_path, database_url=db_url, **settings), sessions)
    app.include_router(queue.router)
    return app


@pytest.fixture
async def client(sessions, db_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=queue_app(sessions, db_url, tmp_path)),
                                 base_url="http://loop") as c:
        yield c


@pytest.fixture
async def assigned(sessions, db_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    """A loop with LOOP_QUEUE_RATERS_PER_ITEM=2."""
    app = queue_app(sessions, db_url, tmp_path, queue_raters_per_item=2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loop") as c:
        yield c


def answers(sessions, n: int) -> list[str]:  # noqa: F811
    """n answers, oldest first, one minute apart."""
    return [add_response(sessions, prompt=f"question {i}", completion=f"answer {i}",
                         created_at=T0 + timedelta(minutes=i)) for i in range(n)]


async def rate(client: httpx.AsyncClient, rid: str, rater: str, **fields: Any) -> dict[str, Any]:
    r = await client.post("/api/ratings", json={"response_id": rid, "rater": rater, **fields})
    assert r.status_code == 201, r.text
    return r.json()


async def next_for(client: httpx.AsyncClient, rater: str, skip: tuple[str, ...] = (), **params: Any
                   ) -> dict[str, Any]:
    r = await client.get("/api/queue/next", params={"rater": rater, "skip": list(skip), **params})
    assert r.status_code == 200, r.text
    return r.json()


def item_id(body: dict[str, Any]) -> str | None:
    return body["item"]["id"] if body["item"] else None


async def test_next_is_the_oldest_answer_with_fewest_raters(client, sessions) -> None:  # noqa: F811
    a, b, c = answers(sessions, 3)
    await rate(client, a, "bob", thumb="up")
    await rate(client, b, "bob", thumb="up")
    await rate(client, b, "cy", score=4)
    # c has no rater, a one, b two: under-rated first
    assert item_id(await next_for(client, "ann")) == c
    await rate(client, c, "ann", thumb="down")
    # ann rated c: a (1 rater) before b (2 raters), though c now has one rater too
    body = await next_for(client, "ann")
    assert item_id(body) == a and body["item"]["raters"] == 1
    assert body["progress"] == {"rated_by_you": 1, "left_for_you": 2, "total": 3}
    # bob rated a and b: only c is his
    assert item_id(await next_for(client, "bob")) == c


async def test_the_item_has_prompt_and_answer_but_not_others_verdicts(client, sessions) -> None:  # noqa: F811
    (a,) = answers(sessions, 1)
    await rate(client, a, "bob", thumb="down", comment="wrong")
    body = await next_for(client, "ann")
    item = body["item"]
    assert item["messages"] == [{"role": "user", "content": "question 0"}] and item["completion"] == "answer 0"
    assert item["your_rating"] is None and "ratings" not in item and "wrong" not in str(body)
    assert body["rater"] == "ann" and body["raters_per_item"] is None


async def test_equal_raters_go_oldest_first_and_ties_by_id(client, sessions) -> None:  # noqa: F811
    same = T0 + timedelta(hours=1)
    later = add_response(sessions, rid="resp-b", created_at=same)
    earlier_id = add_response(sessions, rid="resp-a", created_at=same)
    oldest = add_response(sessions, rid="resp-z", created_at=T0)
    assert item_id(await next_for(client, "ann")) == oldest
    assert item_id(await next_for(client, "ann", skip=(oldest,))) == earlier_id
    assert item_id(await next_for(client, "ann", skip=(oldest, earlier_id))) == later


async def test_skipped_answers_are_left_out_but_still_count_as_left(client, sessions) -> None:  # noqa: F811
    a, b = answers(sessions, 2)
    assert item_id(await next_for(client, "ann", skip=(a,))) == b
    body = await next_for(client, "ann", skip=(a, b))
    assert body["item"] is None
    assert body["progress"] == {"rated_by_you": 0, "left_for_you": 2, "total": 2}  # a skip is not stored
    assert item_id(await next_for(client, "ann")) == a  # a fresh queue (a reload) has forgotten the skips


async def test_a_withdrawn_rating_puts_the_answer_back_and_is_no_rater(client, sessions) -> None:  # noqa: F811
    a, b = answers(sessions, 2)
    await rate(client, b, "bob", thumb="up")
    first = await rate(client, a, "ann", thumb="up")
    withdrawn = await rate(client, a, "ann", thumb=None, expected_current_id=first["id"])
    assert withdrawn["withdrawn"] is True
    body = await next_for(client, "ann")
    # a has no rater left (withdrawn), b has bob: a first, and the widget starts from the withdrawn rating
    assert item_id(body) == a and body["item"]["raters"] == 0
    assert body["item"]["your_rating"]["id"] == withdrawn["id"]
    assert body["progress"]["rated_by_you"] == 0
    stats = (await client.get("/api/queue/stats")).json()
    assert [r["rater"] for r in stats["raters"]] == ["bob"] and stats["totals"]["ratings"] == 1


async def test_assignment_serves_started_answers_first_and_retires_them_at_n(assigned, sessions) -> None:  # noqa: F811
    a, b, c = answers(sessions, 3)
    await rate(assigned, c, "bob", thumb="up")
    # c has 1 of 2 raters: it comes before the older, unstarted a and b
    body = await next_for(assigned, "ann")
    assert item_id(body) == c and body["raters_per_item"] == 2
    await rate(assigned, c, "ann", thumb="up")
    # c has its 2 raters: gone from everyone's queue, cy's included
    cy = await next_for(assigned, "cy")
    assert item_id(cy) == a
    assert cy["progress"] == {"rated_by_you": 0, "left_for_you": 2, "total": 3}
    await rate(assigned, a, "cy", score=3)
    # a is started (cy): ann gets a before b
    assert item_id(await next_for(assigned, "ann")) == a
    # among started answers, the one closest to N comes first: b gets 1 rater, a still 1: oldest wins
    await rate(assigned, b, "bob", thumb="down")
    assert item_id(await next_for(assigned, "dee")) == a


async def test_assignment_is_off_by_default(client, sessions) -> None:  # noqa: F811
    (a,) = answers(sessions, 1)
    for name in ("bob", "cy", "dee"):
        await rate(client, a, name, thumb="up")
    assert item_id(await next_for(client, "ann")) == a


async def test_per_rater_counts_and_agreement(client, sessions) -> None:  # noqa: F811
    a, b, c = answers(sessions, 3)
    await rate(client, a, "ann", thumb="up", score=8)
    await rate(client, b, "ann", thumb="down", score=2)
    await rate(client, c, "ann", comment="no verdict, but rated")
    old = await rate(client, a, "bob", thumb="down")
    await rate(client, a, "bob", thumb="up", expected_current_id=old["id"])  # a changed mind: only the latest
    await rate(client, b, "bob", thumb="up", score=6)
    stats = (await client.get("/api/queue/stats")).json()
    ann, bob = stats["raters"]
    assert (ann["rater"], ann["ratings"], ann["thumbs_up"], ann["thumbs_down"], ann["scored"], ann["mean_score"]) \
        == ("ann", 3, 1, 1, 2, 5.0)
    assert (bob["rater"], bob["ratings"], bob["thumbs_up"], bob["thumbs_down"], bob["mean_score"]) == \
        ("bob", 2, 2, 0, 6.0)
    assert ann["last_rated_at"].endswith("Z") and bob["last_rated_at"] >= ann["last_rated_at"]
    # thumbs on a agree, on b disagree: one of two pairs each
    assert ann["agreement"] == {"items": 2, "pairs": 2, "agreed": 1, "rate": 0.5} == bob["agreement"]
    assert stats["totals"] == {"raters": 2, "ratings": 5, "thumbs_up": 3, "thumbs_down": 1, "scored": 3,
                               "mean_score": round(16 / 3, 3)}
    # 2 units x 2 thumbs: o(up,up)=2, o(up,down)=o(down,up)=1; n_up=3, n_down=1, n=4:
    # alpha = 1 - (n-1) * 2 / (2 * 3 * 1) = 0
    assert stats["agreement"]["thumbs"] == {"alpha": 0.0, "items": 2, "values": 4}
    # scores: only b has two (2 and 6): alpha = 1 - 1 * (2 * 16) / (2 * 1 * 1 * 16) = 0
    assert stats["agreement"]["scores"] == {"alpha": 0.0, "items": 1, "values": 2}


async def test_api_stats_carries_agreement_and_a_new_rating_moves_it(client, sessions) -> None:  # noqa: F811
    a, b = answers(sessions, 2)
    undefined = (await client.get("/api/stats")).json()["agreement"]
    assert undefined["thumbs"] == {"alpha": None, "items": 0, "values": 0}
    for rid in (a, b):
        await rate(client, rid, "ann", thumb="up")
        await rate(client, rid, "bob", thumb="up")
    # all the same value: no variation, alpha undefined by its definition (0/0)
    same = (await client.get("/api/stats")).json()["agreement"]
    assert same["thumbs"] == {"alpha": None, "items": 2, "values": 4}
    await rate(client, a, "cy", thumb="down")
    moved = (await client.get("/api/stats")).json()["agreement"]["thumbs"]  # the cached answer is not served
    # a: up, up, down (each ordered pair weighs 1/2), b: up, up: o(up,up)=3, o(up,down)=o(down,up)=1;
    # n_up=4, n_down=1, n=5: alpha = 1 - 4 * 2 / (2 * 4 * 1) = 0
    assert moved == {"alpha": 0.0, "items": 2, "values": 5}


async def test_two_raters_working_at_once_each_rate_every_answer_once(client, sessions) -> None:  # noqa: F811
    ids = set(answers(sessions, 4))

    async def work(name: str) -> list[str]:
        seen = []
        while (body := await next_for(client, name))["item"] is not None:
            rid = body["item"]["id"]
            assert rid not in seen, f"{name} was served {rid} again after rating it"
            seen.append(rid)
            await rate(client, rid, name, thumb="up" if name == "ann" else "down")
        assert body["progress"] == {"rated_by_you": 4, "left_for_you": 0, "total": 4}
        return seen

    ann, bob = await asyncio.gather(work("ann"), work("bob"))
    assert set(ann) == set(bob) == ids


async def test_filters_narrow_the_queue_and_its_progress(client, sessions) -> None:  # noqa: F811
    answers(sessions, 2)
    marked = add_response(sessions, prompt="about zebras", created_at=T0 + timedelta(days=1))
    body = await next_for(client, "ann", q="zebras")
    assert item_id(body) == marked and body["progress"] == {"rated_by_you": 0, "left_for_you": 1, "total": 1}


async def test_unsigned_caller_without_a_name_is_anonymous(client, sessions) -> None:  # noqa: F811
    (a,) = answers(sessions, 1)
    await rate(client, a, "anonymous", thumb="up")
    r = await client.get("/api/queue/next")
    assert r.status_code == 200 and r.json()["rater"] == "anonymous" and r.json()["item"] is None


async def test_a_signed_in_caller_is_their_account_only(sessions, db_url, tmp_path) -> None:  # noqa: F811
    (a,) = answers(sessions, 1)
    _, token = raters.add(sessions, "carol")
    app = queue_app(sessions, db_url, tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loop",
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        assert (await c.post("/api/ratings", json={"response_id": a, "thumb": "up"})).status_code == 201
        body = (await c.get("/api/queue/next")).json()
        assert body["rater"] == "carol" and body["item"] is None and body["progress"]["rated_by_you"] == 1
        r = await c.get("/api/queue/next", params={"rater": "dave"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "rater_mismatch"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loop") as c:
        r = await c.get("/api/queue/next", params={"rater": "carol"})  # her name without her token
        assert r.status_code == 403 and r.json()["error"]["code"] == "rater_is_account"


async def test_where_tokens_are_required_the_queue_needs_one(sessions, db_url, tmp_path) -> None:  # noqa: F811
    app = queue_app(sessions, db_url, tmp_path, rater_auth="tokens")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loop") as c:
        r = await c.get("/api/queue/next", params={"rater": "ann"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_missing"


async def test_too_many_skips_is_a_422_that_says_what_to_do(client, sessions) -> None:  # noqa: F811
    r = await client.get("/api/queue/next", params={"skip": [f"resp-{i}" for i in range(queue.MAX_SKIP + 1)]})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "too_many_skips" and err["param"] == "skip" and "at most" in err["message"]


def test_the_setting_refuses_zero_raters_per_item(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="queue_raters_per_item"):
        Settings(data_dir=tmp_path, queue_raters_per_item=0)
