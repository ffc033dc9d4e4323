"""Cached reads (loop/readcache.py): a polled figure is computed once while nothing changes, and every write it
depends on — a rating, a comparison, a response, feedback consumed or released, a held-out mark — shows in the
very next answer. GET /api/stats through the feedback app; the scheduler's status on a real SQLite file."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from tests.unit.scheduler_support import Clock, add_comparisons, state  # noqa: F401 - fixture
from sqlalchemy import delete

from tests.unit.feedback_support import add_response, app, client, db_url, sessions  # noqa: F401 - fixtures
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


def test_a_stale_ok_read_answers_the_last_value_at_once_while_one_background_refresh_runs() -> None:
    cache: ReadCache[int] = ReadCache()
    key = [1]
    release, refreshed = threading.Event(), threading.Event()
    refreshes: list[int] = []

    def compute() -> int:
        return key[0] * 10

    def refresh() -> None:
        refreshes.append(key[0])
        release.wait(10)
        cache.get(lambda: key[0], compute)
        refreshed.set()

    first = cache.read(lambda: key[0], compute, stale_ok=True, refresh=refresh)  # nothing cached yet: it waits
    assert (first.value, first.fresh) == (10, True) and refreshes == []
    key[0] = 2
    for _ in range(5):  # every poller gets the old value at once; one refresh runs for all of them
        r = cache.read(lambda: key[0], compute, stale_ok=True, refresh=refresh)
        assert (r.value, r.fresh, r.as_of) == (10, False, first.as_of)
    assert refreshes == [2]
    exact = threading.Thread(target=lambda: refreshes.append(cache.read(lambda: key[0], compute).value))
    release.set()
    assert refreshed.wait(10)
    exact.start()
    exact.join(10)
    now = cache.read(lambda: key[0], compute, stale_ok=True, refresh=refresh)
    assert (now.value, now.fresh) == (20, True) and now.as_of >= first.as_of and refreshes == [2, 20]
    assert cache.computed == 2


def _settled(cache: ReadCache) -> None:
    deadline = time.monotonic() + 10
    while cache._refreshing:
        assert time.monotonic() < deadline, "the background refresh never ended"
        time.sleep(0.01)


def test_a_failed_background_refresh_keeps_the_old_value_and_the_next_read_tries_again() -> None:
    cache: ReadCache[int] = ReadCache(refresh_duty=1.0)  # no pause between refreshes
    cache.get(lambda: 1, lambda: 10)
    attempts: list[int] = []

    def broken() -> None:
        attempts.append(1)
        raise RuntimeError("database hiccup")

    def working() -> None:
        cache.get(lambda: 2, lambda: 20)

    assert cache.read(lambda: 2, lambda: 20, stale_ok=True, refresh=broken).value == 10
    _settled(cache)
    r = cache.read(lambda: 2, lambda: 20, stale_ok=True, refresh=working)  # tries again, in the background
    assert r.value == 10 and not r.fresh and attempts == [1]
    _settled(cache)
    r = cache.read(lambda: 2, lambda: 20, stale_ok=True, refresh=working)
    assert (r.value, r.fresh) == (20, True)


def test_background_refreshes_take_at_most_their_share_of_the_time() -> None:
    clock = Clock()
    cache: ReadCache[int] = ReadCache(clock=clock, refresh_duty=0.25)
    cache.get(lambda: 1, lambda: 10)
    started: list[float] = []

    def slow() -> None:  # takes 1 s on the cache's clock
        started.append(clock.t)
        clock.t += 1.0

    cache.read(lambda: 2, lambda: 20, stale_ok=True, refresh=slow)
    _settled(cache)
    clock.t += 2.9  # 1 s of work at a quarter of the time: the next may start 3 s after it ended
    cache.read(lambda: 2, lambda: 20, stale_ok=True, refresh=slow)
    _settled(cache)
    assert len(started) == 1
    clock.t += 0.2
    cache.read(lambda: 2, lambda: 20, stale_ok=True, refresh=slow)
    _settled(cache)
    assert len(started) == 2


async def stats(client: httpx.AsyncClient) -> dict:
    r = await client.get("/api/stats")
    assert r.status_code == 200, r.text
    return r.json()


async def test_stats_are_computed_once_while_nothing_changes_and_follow_every_write(
        client: httpx.AsyncClient, app, sessions) -> None:
    a = add_response(sessions, prompt="Which is better?", completion="this")
    b = add_response(sessions, prompt="Which is better?", completion="that")
    first = await stats(client)
    assert await stats(client) == first and app.state.stats_caches[30].computed == 1
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
    computed = app.state.stats_caches[30].computed
    assert await stats(client) == s and app.state.stats_caches[30].computed == computed

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


async def test_polled_stats_answer_the_last_figures_at_once_and_catch_up(client: httpx.AsyncClient,
                                                                           sessions) -> None:
    a = add_response(sessions, prompt="p", completion="a")
    first = await stats(client)
    assert first["fresh"] is True and first["ratings_total"] == 0
    assert (await client.post("/api/ratings", json={"response_id": a, "thumb": "up"})).status_code == 201
    polled = (await client.get("/api/stats", params={"stale_ok": "true"})).json()
    assert polled["fresh"] is False and polled["ratings_total"] == 0 and polled["as_of"] == first["as_of"]
    deadline = time.monotonic() + 10
    while not polled["fresh"]:  # the recount ran in the background, with its own session
        assert time.monotonic() < deadline
        time.sleep(0.05)
        polled = (await client.get("/api/stats", params={"stale_ok": "true"})).json()
    assert polled["ratings_total"] == 1 and polled["as_of"] > first["as_of"]
    exact = await stats(client)  # without stale_ok, always the exact figures
    assert exact["ratings_total"] == 1 and exact["fresh"] is True


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


def test_polled_scheduler_status_answers_the_last_counts_at_once_and_catches_up(state) -> None:  # noqa: F811
    sched = Scheduler(state, guard=None, clock=Clock())
    add_comparisons(state, 2)
    first = sched.describe(stale_ok=True)
    assert first["untrained"] == {"pairs": 2, "examples": 0} and first["untrained_fresh"] is True
    add_comparisons(state, 1)
    polled = sched.describe(stale_ok=True)
    assert polled["untrained"]["pairs"] == 2 and polled["untrained_fresh"] is False
    assert polled["untrained_as_of"] == first["untrained_as_of"]
    deadline = time.monotonic() + 10
    while not polled["untrained_fresh"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        polled = sched.describe(stale_ok=True)
    assert polled["untrained"]["pairs"] == 3 and sched.describe()["untrained"]["pairs"] == 3
