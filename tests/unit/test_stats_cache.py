"""Cached reads (loop/readcache.py): a polled figure is computed once while nothing changes, and every write it
depends on — a rating, a comparison, a response, feedback consumed or released, a held-out mark — shows in the
very next answer. GET /api/stats through the feedback app; the scheduler's status on a real SQLite file."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from scheduler_support import Clock, add_comparisons, state  # noqa: F401 - fixture
from sqlalchemy import delete

from feedback_support import add_response, app, client, db_url, sessions  # noqa: F401 - fixtures
from loop.db.models import RunFeedback, TrainingRun
from loop.readcache import ReadCache
from loop.scheduler import batches
from loop.scheduler.scheduler import Scheduler


def test_a_value_is_reused_until_its_key_changes_or_it_is_too_old() -> None:
    clock = Clock()
    cache: ReadCache[int] = ReadCache(max_age_s=60, clock=clock)
    key, calls = [1], []

    def compute() -> int:
        calls.append(key[0])
        return key[0] * 10

    assert cache.get(lambda: key[0], compute) == 10
    assert cache.get(lambda: key[0], compute) == 10 and calls == [1]
    key[0] = 2
    assert cache.get(lambda: key[0], compute) == 20 and calls == [1, 2]
    clock.t += 59
    assert cache.get(lambda: key[0], compute) == 20 and len(calls) == 2
    clock.t += 2  # older than max_age_s: computed again even though the key did not move
    assert cache.get(lambda: key[0], compute) == 20 and len(calls) == 3
    cache.clear()
    assert cache.get(lambda: key[0], compute) == 20 and len(calls) == 4 and cache.computed == 4


def test_a_failed_computation_is_raised_and_not_cached() -> None:
    cache: ReadCache[str] = ReadCache()

    def broken() -> str:
        raise RuntimeError("database hiccup")

    with pytest.raises(RuntimeError, match="hiccup"):
        cache.get(lambda: "k", broken)
    assert cache.get(lambda: "k", lambda: "ok") == "ok" and cache.computed == 1


def test_readers_arriving_during_a_computation_wait_for_it_instead_of_starting_their_own() -> None:
    cache: ReadCache[str] = ReadCache()
    release = threading.Event()
    results: list[str] = []

    def slow() -> str:
        release.wait(10)
        return "figures"

    readers = [threading.Thread(target=lambda: results.append(cache.get(lambda: "k", slow))) for _ in range(4)]
    for t in readers:
        t.start()
    time.sleep(0.3)  # the other three are now queued behind the first computation
    release.set()
    for t in readers:
        t.join(10)
    assert results == ["figures"] * 4 and cache.computed == 1


async def stats(client: httpx.AsyncClient) -> dict:
    r = await client.get("/api/stats")
    assert r.status_code == 200, r.text
    return r.json()


async def test_stats_are_computed_once_while_nothing_changes_and_follow_every_write(
        client: httpx.AsyncClient, app, sessions) -> None:
    a = add_response(sessions, prompt="Which is better?", completion="this")
    b = add_response(sessions, prompt="Which is better?", completion="that")
    first = await stats(client)
    assert await stats(client) == first and app.state.stats_cache.computed == 1
    assert (first["responses_total"], first["ratings_total"], first["untrained_pairs"]) == (2, 0, 0)

    add_response(sessions, prompt="another", completion="x")  # a response without feedback: only the total moves
    assert (await stats(client))["responses_total"] == 3
    r = await client.post("/api/comparisons", json={"response_a_id": a, "response_b_id": b, "winner": "a"})
    assert r.status_code == 201, r.text
    s = await stats(client)
    assert (s["comparisons_total"], s["pairs_available"], s["untrained_pairs"]) == (1, 1, 1)
    assert (await client.post("/api/ratings", json={"response_id": a, "thumb": "up"})).status_code == 201
    s = await stats(client)
    assert (s["ratings_total"], s["thumbs"]["up"], s["untrained_unpaired"]) == (1, 1, 1)
    computed = app.state.stats_cache.computed
    assert await stats(client) == s and app.state.stats_cache.computed == computed

    with sessions() as db, db.begin():  # a run consumes the pick
        run = TrainingRun(status="succeeded")
        db.add(run)
        db.flush()
        db.add(RunFeedback(run_id=run.id, comparison_id=1))
    s = await stats(client)
    assert (s["pairs_available"], s["untrained_pairs"]) == (1, 0)
    with sessions() as db, db.begin():  # ...and releases it (a failed run): no new row, one fewer
        db.execute(delete(RunFeedback))
    assert (await stats(client))["untrained_pairs"] == 1
    with sessions() as db:  # held out for the eval guard: an update of existing rows
        assert batches.mark_held_out(db, 1.0) == 2
    s = await stats(client)
    assert (s["pairs_available"], s["unpaired_available"], s["ratings_total"]) == (0, 0, 1)


async def test_other_day_windows_are_answered_for_their_own_days(client: httpx.AsyncClient, sessions) -> None:
    add_response(sessions)
    assert len((await client.get("/api/stats", params={"days": 1})).json()["by_day"]) == 1
    r = await client.get("/api/stats", params={"days": 0})
    assert r.status_code == 422 and "days" in r.json()["error"]["message"]


def test_scheduler_status_reuses_its_count_until_feedback_changes(state) -> None:  # noqa: F811
    sched = Scheduler(state, guard=None, clock=Clock())
    add_comparisons(state, 2)
    assert sched.describe()["untrained"] == {"pairs": 2, "examples": 0}
    assert sched.describe()["untrained"] == {"pairs": 2, "examples": 0}
    assert sched._pool_cache.computed == 1
    add_comparisons(state, 1)
    assert sched.describe()["untrained"] == {"pairs": 3, "examples": 0}
    assert sched._pool_cache.computed == 2
