"""Ratings and comparisons over HTTP on a real database: storage, idempotency, supersession, bad input, and what
a write whose commit fails answers (503 `storage_unavailable`, nothing stored, the retry stores it once).

Run: .venv/bin/python -m pytest -q tests/unit/feedback/test_feedback.py (tests/faults/ drives the same under load).
"""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from tests.unit.feedback_support import add_response, app, client, db_url, sessions  # noqa: F401 - fixtures
from loop.db.models import Comparison, Rating


def count(sessions: sessionmaker[Session], table: type) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


async def test_rating_is_stored_and_returned(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    r = await client.post("/api/ratings", json={"response_id": rid, "thumb": "up", "score": 8, "comment": "good",
                                                "tags": ["math", " math ", "short"], "rater": "ann"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["response_id"] == rid and body["thumb"] == "up" and body["score"] == 8
    assert body["tags"] == ["math", "short"] and body["rater"] == "ann" and body["is_current"] is True
    assert body["created_at"].endswith("Z")
    with sessions() as s:
        row = s.get(Rating, body["id"])
        assert row is not None and row.thumb == 1 and row.score == 8 and row.comment == "good"


async def test_new_rating_supersedes_older_of_same_rater_only(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    first = (await client.post("/api/ratings", json={"response_id": rid, "thumb": "down", "rater": "ann"})).json()
    other = (await client.post("/api/ratings", json={"response_id": rid, "thumb": "down", "rater": "bob"})).json()
    second = (await client.post("/api/ratings", json={"response_id": rid, "thumb": "up", "rater": "ann"})).json()
    with sessions() as s:
        assert s.get(Rating, first["id"]).is_current is False
        assert s.get(Rating, other["id"]).is_current is True
        assert s.get(Rating, second["id"]).is_current is True
    detail = (await client.get(f"/api/responses/{rid}")).json()
    assert [x["id"] for x in detail["ratings"]] == [second["id"], other["id"], first["id"]]  # history, newest first
    assert detail["rating"] == {"thumbs_up": 1, "thumbs_down": 1, "mean_score": None, "count": 2}


async def test_idempotent_retry_gives_one_row(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    body = {"response_id": rid, "score": 3, "idempotency_key": "k-1"}
    a = await client.post("/api/ratings", json=body)
    b = await client.post("/api/ratings", json=body)
    c = await client.post("/api/ratings", json={"response_id": rid, "score": 3}, headers={"Idempotency-Key": "k-1"})
    assert (a.status_code, b.status_code, c.status_code) == (201, 200, 200)
    assert a.json() == b.json() == c.json()
    assert count(sessions, Rating) == 1


async def test_concurrent_retries_in_one_batch_give_one_row(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    body = {"response_id": rid, "thumb": "up", "idempotency_key": "same"}
    replies = await asyncio.gather(*(client.post("/api/ratings", json=body) for _ in range(20)))
    assert sorted(r.status_code for r in replies) == [200] * 19 + [201]
    assert len({r.json()["id"] for r in replies}) == 1
    assert count(sessions, Rating) == 1


async def test_same_key_different_body_is_409(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    assert (await client.post("/api/ratings", json={"response_id": rid, "score": 3,
                                                    "idempotency_key": "k"})).status_code == 201
    r = await client.post("/api/ratings", json={"response_id": rid, "score": 4, "idempotency_key": "k"})
    assert r.status_code == 409 and "idempotency key 'k'" in r.json()["error"]["message"]
    assert count(sessions, Rating) == 1


async def test_bad_ratings_are_4xx_that_say_what_to_fix(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    r = await client.post("/api/ratings", json={"response_id": "resp-nope", "thumb": "up"})
    assert r.status_code == 404 and "resp-nope" in r.json()["error"]["message"]
    for bad, word in (({"score": 0}, "score"), ({"score": 11}, "score"), ({"thumb": "sideways"}, "thumb"),
                      ({}, "at least one of"), ({"thumb": "up", "scroe": 3}, "scroe"), ({"tags": [""]}, "tag")):
        r = await client.post("/api/ratings", json={"response_id": rid, **bad})
        assert r.status_code == 422, (bad, r.text)
        assert word in r.json()["error"]["message"], r.json()
    r = await client.post("/api/ratings", content=b'{"response_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = await client.post("/api/ratings", json={"response_id": rid, "thumb": "up", "idempotency_key": "a"},
                          headers={"Idempotency-Key": "b"})
    assert r.status_code == 422 and "differ" in r.json()["error"]["message"]
    r = await client.post("/api/ratings", json={"response_id": rid, "thumb": "up"}, headers={"Idempotency-Key": "k" * 201})
    assert r.status_code == 422 and "1..200" in r.json()["error"]["message"]
    assert count(sessions, Rating) == 0


async def test_batch_with_one_unknown_id_stores_the_others(client: httpx.AsyncClient, sessions) -> None:
    ids = [add_response(sessions) for _ in range(5)]
    bodies = [{"response_id": i, "thumb": "up"} for i in ids] + [{"response_id": "resp-missing", "thumb": "up"}]
    replies = await asyncio.gather(*(client.post("/api/ratings", json=b) for b in bodies))
    assert [r.status_code for r in replies] == [201] * 5 + [404]
    assert count(sessions, Rating) == 5


async def test_comparison_stored_and_superseded(client: httpx.AsyncClient, sessions) -> None:
    a, b = add_response(sessions, completion="4"), add_response(sessions, completion="5")
    r1 = await client.post("/api/comparisons", json={"response_a_id": a, "response_b_id": b, "winner": "b",
                                                     "rater": "ann"})
    assert r1.status_code == 201, r1.text
    assert r1.json()["winner"] == "b" and r1.json()["is_current"] is True
    r2 = await client.post("/api/comparisons", json={"response_a_id": b, "response_b_id": a, "winner": "b",
                                                     "rater": "ann", "idempotency_key": "c1"})
    assert r2.status_code == 201
    again = await client.post("/api/comparisons", json={"response_a_id": b, "response_b_id": a, "winner": "b",
                                                        "rater": "ann", "idempotency_key": "c1"})
    assert again.status_code == 200 and again.json()["id"] == r2.json()["id"]
    clash = await client.post("/api/comparisons", json={"response_a_id": b, "response_b_id": a, "winner": "tie",
                                                        "rater": "ann", "idempotency_key": "c1"})
    assert clash.status_code == 409
    with sessions() as s:
        assert s.get(Comparison, r1.json()["id"]).is_current is False
        assert s.get(Comparison, r2.json()["id"]).is_current is True
    listed = (await client.get("/api/comparisons", params={"current_only": "true"})).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == r2.json()["id"]


async def test_bad_comparisons(client: httpx.AsyncClient, sessions) -> None:
    a = add_response(sessions, prompt="one")
    other_prompt = add_response(sessions, prompt="two")
    r = await client.post("/api/comparisons", json={"response_a_id": a, "response_b_id": other_prompt,
                                                    "winner": "a"})
    assert r.status_code == 422 and "different prompts" in r.json()["error"]["message"]
    r = await client.post("/api/comparisons", json={"response_a_id": a, "response_b_id": a, "winner": "a"})
    assert r.status_code == 422 and "two different responses" in r.json()["error"]["message"]
    r = await client.post("/api/comparisons", json={"response_a_id": a, "response_b_id": "resp-x", "winner": "a"})
    assert r.status_code == 404 and "resp-x" in r.json()["error"]["message"]
    r = await client.post("/api/comparisons", json={"response_a_id": a, "response_b_id": other_prompt,
                                                    "winner": "c"})
    assert r.status_code == 422 and "winner" in r.json()["error"]["message"]
    assert count(sessions, Comparison) == 0


async def test_list_ratings_filters_and_pages(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    for i in range(5):
        await client.post("/api/ratings", json={"response_id": rid, "score": i + 1, "rater": f"r{i % 2}",
                                                "tags": ["odd" if i % 2 else "even"]})
    page = (await client.get("/api/ratings", params={"limit": 2, "offset": 1})).json()
    assert page["total"] == 5 and [x["score"] for x in page["items"]] == [4, 3]
    assert (await client.get("/api/ratings", params={"rater": "r1"})).json()["total"] == 2
    assert (await client.get("/api/ratings", params={"tag": "even"})).json()["total"] == 3
    current = (await client.get("/api/ratings", params={"current_only": "true"})).json()
    assert sorted(x["score"] for x in current["items"]) == [4, 5]
    assert (await client.get("/api/ratings", params={"limit": 0})).status_code == 422


async def test_stored_feedback_is_counted_in_metrics(app, client: httpx.AsyncClient, sessions) -> None:
    a, b = add_response(sessions), add_response(sessions)
    for body in ({"response_id": a, "thumb": "up", "idempotency_key": "m"}, {"response_id": a, "thumb": "up",
                 "idempotency_key": "m"}, {"response_id": "resp-missing", "thumb": "up"}):
        await client.post("/api/ratings", json=body)
    await client.post("/api/comparisons", json={"response_a_id": a, "response_b_id": b, "winner": "a"})
    text = app.state.metrics.render()[0].decode()
    assert "loop_ratings_total 1.0" in text and "loop_comparisons_total 1.0" in text  # replays and 404s: not


async def test_concurrent_comparison_retries_give_one_row(client: httpx.AsyncClient, sessions) -> None:
    a, b = add_response(sessions), add_response(sessions)
    body = {"response_a_id": a, "response_b_id": b, "winner": "a", "idempotency_key": "race"}
    replies = await asyncio.gather(*(client.post("/api/comparisons", json=body) for _ in range(8)))
    assert sorted(r.status_code for r in replies) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in replies}) == 1
    assert count(sessions, Comparison) == 1


def refuse_commits(sessions: sessionmaker[Session], n: int) -> list[int]:
    """The next `n` commits on this database raise, as a full disk or a lost connection does; returns a counter."""
    refused = [0]

    def on_commit(_conn) -> None:  # noqa: ANN001 - SQLAlchemy Connection
        if refused[0] < n:
            refused[0] += 1
            raise OSError(28, "No space left on device (injected)")

    event.listen(sessions.kw["bind"], "commit", on_commit)
    return refused


def assert_storage_unavailable(r: httpx.Response, kind: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert (err["type"], err["code"]) == ("service_unavailable", "storage_unavailable")
    assert f"the {kind} was not stored" in err["message"] and "same idempotency key" in err["message"]


async def test_rating_whose_commit_fails_is_503_and_its_retry_stores_one_row(client: httpx.AsyncClient,
                                                                              sessions) -> None:
    rid = add_response(sessions)
    body = {"response_id": rid, "thumb": "down", "comment": "wrong", "idempotency_key": "r-1"}
    refused = refuse_commits(sessions, 1)
    r = await client.post("/api/ratings", json=body)
    assert refused == [1]
    assert_storage_unavailable(r, "rating")
    assert count(sessions, Rating) == 0
    retry = await client.post("/api/ratings", json=body)
    assert retry.status_code == 201 and retry.json()["comment"] == "wrong"
    assert (await client.post("/api/ratings", json=body)).json()["id"] == retry.json()["id"]
    assert count(sessions, Rating) == 1


async def test_batch_whose_commits_fail_answers_each_rating_with_its_own_outcome(client: httpx.AsyncClient,
                                                                                  sessions) -> None:
    ids = [add_response(sessions) for _ in range(6)]
    refuse_commits(sessions, 3)  # the batch's commit, then the first two ratings' own commits
    replies = await asyncio.gather(*(client.post("/api/ratings", json={"response_id": i, "score": n + 1,
                                                                       "rater": f"r{n}"})
                                     for n, i in enumerate(ids)))
    acknowledged = {}
    for n, r in enumerate(replies):
        if r.status_code == 201:  # its own rating, not a neighbour's
            assert (r.json()["response_id"], r.json()["score"]) == (ids[n], n + 1)
            acknowledged[r.json()["id"]] = (ids[n], n + 1)
        else:
            assert_storage_unavailable(r, "rating")
    assert 3 <= len(acknowledged) < 6  # each refused commit costs at most one rating
    with sessions() as s:
        assert {row.id: (row.response_id, row.score) for row in s.scalars(select(Rating))} == acknowledged


async def test_comparison_whose_commit_fails_is_503_and_its_retry_stores_one_row(client: httpx.AsyncClient,
                                                                                  sessions) -> None:
    a, b = add_response(sessions), add_response(sessions)
    body = {"response_a_id": a, "response_b_id": b, "winner": "tie", "idempotency_key": "c-1"}
    refuse_commits(sessions, 1)
    r = await client.post("/api/comparisons", json=body)
    assert_storage_unavailable(r, "comparison")
    assert count(sessions, Comparison) == 0
    retry = await client.post("/api/comparisons", json=body)
    assert retry.status_code == 201 and retry.json()["winner"] == "tie"
    assert count(sessions, Comparison) == 1


def test_openapi_documents_the_rating_body(app) -> None:
    op = app.openapi()["paths"]["/api/ratings"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["response_id"]
    assert {"type": "integer", "minimum": 1, "maximum": 10} in schema["properties"]["score"]["anyOf"]
    assert set(op["responses"]) >= {"200", "201", "503"}
    assert "storage_unavailable" in op["responses"]["503"]["description"]


async def rate(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await client.post("/api/ratings", json={"rater": "ann", **body})


async def test_an_edit_merges_over_the_current_rating(client: httpx.AsyncClient, sessions) -> None:
    """A comment added later (History's widget, another API client) never drops the thumb; null clears a field."""
    rid = add_response(sessions)
    thumbed = (await rate(client, response_id=rid, thumb="up", score=8)).json()
    commented = await rate(client, response_id=rid, comment="clear and short")
    assert commented.status_code == 201, commented.text
    assert {k: commented.json()[k] for k in ("thumb", "score", "comment", "withdrawn")} == \
        {"thumb": "up", "score": 8, "comment": "clear and short", "withdrawn": False}
    cleared = (await rate(client, response_id=rid, score=None, tags=["style"])).json()
    assert (cleared["thumb"], cleared["score"], cleared["comment"], cleared["tags"]) == \
        ("up", None, "clear and short", ["style"])
    other = (await client.post("/api/ratings", json={"response_id": rid, "rater": "bob", "comment": "hm"})).json()
    assert (other["thumb"], other["comment"]) == (None, "hm")  # another rater's rating is never merged into
    history = (await client.get("/api/ratings", params={"response_id": rid, "rater": "ann"})).json()["items"]
    assert [x["id"] for x in history] == [cleared["id"], commented.json()["id"], thumbed["id"]]
    assert [x["is_current"] for x in history] == [True, False, False]


async def test_clearing_everything_withdraws_and_trains_nothing(client: httpx.AsyncClient, sessions) -> None:
    from loop.pairs import count_available

    rid = add_response(sessions)
    r = await rate(client, response_id=rid, thumb="down")
    with sessions() as s:
        assert count_available(s)["unpaired_available"] == 1
    withdrawn = await rate(client, response_id=rid, thumb=None)  # un-pressing the only thumb
    assert withdrawn.status_code == 201, withdrawn.text
    body = withdrawn.json()
    assert body["withdrawn"] is True and body["is_current"] is True and body["thumb"] is None
    with sessions() as s:
        assert count_available(s)["unpaired_available"] == 0
        assert s.get(Rating, r.json()["id"]).is_current is False  # the history keeps what was said and withdrawn
    listed = {x["id"]: x for x in (await client.get("/api/responses", params={"rating": "unrated"})).json()["items"]}
    assert rid in listed and listed[rid]["rating"]["count"] == 0  # a withdrawn rating leaves the answer unrated
    assert rid not in {x["id"] for x in (await client.get("/api/responses", params={"rating": "rated"})).json()["items"]}
    again = await rate(client, response_id=rid, thumb=None)
    assert again.status_code == 422 and again.json()["error"]["code"] == "nothing_to_rate"
    assert "none of" in again.json()["error"]["message"]
    fresh = add_response(sessions)
    r = await rate(client, response_id=fresh, comment=None, tags=[])
    assert r.status_code == 422 and r.json()["error"]["code"] == "nothing_to_rate"
    assert count(sessions, Rating) == 2
    assert (await rate(client, response_id=fresh, tags=["only-a-tag"])).status_code == 201
    rated = {x["id"] for x in (await client.get("/api/responses", params={"rating": "rated"})).json()["items"]}
    assert fresh in rated  # tags alone are a rating


async def test_a_write_from_a_stale_view_is_refused_not_applied(client: httpx.AsyncClient, sessions) -> None:
    """Two tabs of one rater (or a rater and a script) both show rating X; the first edit lands, the second is
    refused with 409 stale_rating, and nothing it said is stored."""
    rid = add_response(sessions)
    r = await rate(client, response_id=rid, thumb="up", expected_current_id=None)  # "I see no rating yet"
    assert r.status_code == 201, r.text
    shown = r.json()["id"]
    first = await rate(client, response_id=rid, comment="tab one", expected_current_id=shown)
    assert first.status_code == 201 and first.json()["thumb"] == "up"
    second = await rate(client, response_id=rid, thumb="down", expected_current_id=shown)
    assert second.status_code == 409, second.text
    err = second.json()["error"]
    assert err["code"] == "stale_rating" and err["param"] == "expected_current_id"
    assert f"rating {first.json()['id']}" in err["message"]
    r = await rate(client, response_id=rid, thumb="down", expected_current_id=None)
    assert r.status_code == 409  # "none" is stale too once there is one
    with sessions() as s:
        current = s.scalars(select(Rating).where(Rating.is_current.is_(True))).all()
        assert [(c.id, c.thumb, c.comment) for c in current] == [(first.json()["id"], 1, "tab one")]
    r = await rate(client, response_id=rid, expected_current_id=2**62, thumb="up")
    assert r.status_code == 409  # an id at the type's limit is just another stale id
    r = await rate(client, response_id=rid, expected_current_id=0, thumb="up")
    assert r.status_code == 422 and "expected_current_id" in r.json()["error"]["message"]


async def test_two_edits_of_one_view_in_one_batch_store_one(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    shown = (await rate(client, response_id=rid, score=5)).json()["id"]
    replies = await asyncio.gather(*(rate(client, response_id=rid, score=s, expected_current_id=shown)
                                     for s in (6, 7, 8, 9)))
    assert sorted(r.status_code for r in replies) == [201, 409, 409, 409], [r.text for r in replies]
    assert count(sessions, Rating) == 2


async def test_a_retried_partial_edit_replays_its_merged_rating(client: httpx.AsyncClient, sessions) -> None:
    rid = add_response(sessions)
    await rate(client, response_id=rid, thumb="up")
    body = {"response_id": rid, "comment": "ok", "idempotency_key": "edit-1"}
    a, b = await rate(client, **body), await rate(client, **body)
    assert (a.status_code, b.status_code) == (201, 200) and a.json() == b.json() and a.json()["thumb"] == "up"
    c = await rate(client, **{**body, "comment": "other"})
    assert c.status_code == 409 and c.json()["error"]["code"] == "idempotency_key_reused"
    assert count(sessions, Rating) == 2
