"""History: every filter, the sorts and pagination of GET /api/responses, and one response in full."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import httpx

from tests.unit.feedback_support import add_response, app, client, db_url, sessions  # noqa: F401 - fixtures


async def ids(client: httpx.AsyncClient, **params: object) -> list[str]:
    r = await client.get("/api/responses", params={"limit": 500, **params})
    assert r.status_code == 200, r.text
    return [x["id"] for x in r.json()["items"]]


async def rate(client: httpx.AsyncClient, rid: str, **body: object) -> None:
    r = await client.post("/api/ratings", json={"response_id": rid, **body})
    assert r.status_code == 201, r.text


async def test_filters(client: httpx.AsyncClient, sessions) -> None:
    now = datetime.now(timezone.utc)
    old = add_response(sessions, prompt="ancient question", completion="Paris", created_at=now - timedelta(days=3),
                       model="m-old", weight_version=1)
    up = add_response(sessions, prompt="Capital of France?", completion="It is PARIS.")
    down = add_response(sessions, prompt="2+2", completion="5", weight_version=2)
    scored = add_response(sessions, prompt="odd 100%_match", completion="x", endpoint="completion")
    unrated = add_response(sessions, prompt="nobody cares", completion="ok")
    await rate(client, up, thumb="up", tags=["geo"], rater="ann")
    await rate(client, down, thumb="down", tags=["math", "wrong"], rater="bob")
    await rate(client, scored, score=9)
    await rate(client, old, score=2, rater="ann")
    await rate(client, old, score=6, rater="ann")  # supersedes the 2

    assert set(await ids(client)) == {old, up, down, scored, unrated}
    assert await ids(client, rating="up") == [up]
    assert await ids(client, rating="down") == [down]
    assert set(await ids(client, rating="rated")) == {old, up, down, scored}
    assert await ids(client, rating="unrated") == [unrated]
    assert set(await ids(client, min_score=5)) == {scored, old}  # old's current score is 6, not 2
    assert await ids(client, max_score=5) == []
    assert await ids(client, min_score=7, max_score=10) == [scored]
    assert await ids(client, tag="math") == [down]
    assert await ids(client, tag="mat") == []  # whole tags only
    assert set(await ids(client, rater="ann")) == {up, old}
    assert await ids(client, model="m-old") == [old]
    assert await ids(client, weight_version=2) == [down]
    assert set(await ids(client, q="paris")) == {old, up}  # case-insensitive, prompt or completion
    assert await ids(client, q="france") == [up]  # in the chat messages
    assert await ids(client, q="100%_") == [scored]  # wildcards are literal
    assert await ids(client, q="%") == [scored]
    since = (now - timedelta(days=1)).isoformat()
    assert old not in await ids(client, since=since)
    assert await ids(client, until=since) == [old]
    assert await ids(client, until=(now - timedelta(days=1)).replace(tzinfo=None).isoformat()) == [old]


async def test_rater_filter_finds_answers_the_rater_only_compared(client: httpx.AsyncClient, sessions) -> None:
    a = add_response(sessions, prompt="Name a colour", completion="red")
    b = add_response(sessions, prompt="Name a colour", completion="blue")
    rated = add_response(sessions, prompt="Name a fruit", completion="pear")
    untouched = add_response(sessions, prompt="Name a tree", completion="oak")
    r = await client.post("/api/comparisons", json={"response_a_id": a, "response_b_id": b, "winner": "b",
                                                    "rater": "cat"})
    assert r.status_code == 201, r.text
    await rate(client, rated, thumb="up", rater="dan")
    assert set(await ids(client, rater="cat")) == {a, b}  # both sides of the pick, though cat rated nothing
    assert await ids(client, rater="dan") == [rated]
    await rate(client, a, score=3, rater="dan")
    assert set(await ids(client, rater="dan")) == {rated, a}  # rated and compared answers are listed once each
    await client.post("/api/comparisons", json={"response_a_id": b, "response_b_id": a, "winner": "a", "rater": "dan"})
    page = (await client.get("/api/responses", params={"rater": "dan"})).json()
    assert sorted(x["id"] for x in page["items"]) == sorted({rated, a, b}) and page["total"] == 3
    assert untouched not in await ids(client, rater="cat") + await ids(client, rater="dan")
    assert await ids(client, rater="nobody") == []


async def test_sort_and_pages(client: httpx.AsyncClient, sessions) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = [add_response(sessions, created_at=t0 + timedelta(minutes=i), completion=str(i)) for i in range(7)]
    assert await ids(client) == rows[::-1]
    assert await ids(client, sort="created_at") == rows
    page = (await client.get("/api/responses", params={"sort": "created_at", "limit": 3, "offset": 3})).json()
    assert [x["id"] for x in page["items"]] == rows[3:6] and page["total"] == 7
    assert (page["limit"], page["offset"]) == (3, 3)
    await rate(client, rows[2], score=9)
    await rate(client, rows[5], score=3)
    by_score = await ids(client, sort="-score")
    assert by_score[:2] == [rows[2], rows[5]] and len(by_score) == 7  # unscored last
    assert (await ids(client, sort="score"))[:2] == [rows[5], rows[2]]


async def test_summary_and_detail(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions, prompt="Say hi", completion="hi!")
    await rate(client, rid, score=4, tags=["a"], rater="x")
    await rate(client, rid, score=8, thumb="up", tags=["b"], rater="y")
    item = (await client.get("/api/responses")).json()["items"][0]
    assert item["prompt_preview"] == "Say hi" and item["completion"] == "hi!"
    assert item["rating"] == {"thumbs_up": 1, "thumbs_down": 0, "mean_score": 6.0, "count": 2}
    assert sorted(item["tags"]) == ["a", "b"] and item["created_at"].endswith("Z")
    detail = (await client.get(f"/api/responses/{rid}")).json()
    assert detail["messages"] == [{"role": "user", "content": "Say hi"}]
    assert detail["completion_token_ids"] == [4, 5] and detail["completion_logprobs"] == [-0.1, -0.2]
    assert len(detail["ratings"]) == 2 and detail["comparisons"] == []
    missing = await client.get("/api/responses/resp-gone")
    assert missing.status_code == 404 and "resp-gone" in missing.json()["error"]["message"]


async def test_bad_history_queries(client: httpx.AsyncClient, sessions) -> None:
    for params, word in (({"rating": "meh"}, "rating"), ({"sort": "name"}, "sort"), ({"limit": 501}, "limit"),
                         ({"since": "yesterday"}, "since"), ({"min_score": 8, "max_score": 2}, "min_score")):
        r = await client.get("/api/responses", params=params)
        assert r.status_code == 422, params
        assert word in r.json()["error"]["message"], r.json()
