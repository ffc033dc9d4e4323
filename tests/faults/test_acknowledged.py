"""An acknowledgement is a promise: a 2xx for a rating or a comparison means its row is committed, with exactly the
content sent and the id returned; every failure answers the documented 503 `storage_unavailable` (nothing stored,
retry with the same idempotency key), never a plain 500 and never another submission's id.

How: the real app (`create_app(settings, manage=False)`) is served by uvicorn in this process on a free port and
driven over real HTTP by many concurrent clients, while a SQLAlchemy `commit` listener refuses a seeded share of
the database's commits (SQLite and PostgreSQL); a second test fills a tiny tmpfs under SQLite until the disk is
full. Afterwards the database is read directly and every reply is checked against it.

Run: .venv/bin/python -m pytest -q tests/faults/test_acknowledged.py
(the PostgreSQL leg needs LOOP_TEST_POSTGRES_URL; the full-disk test needs root, as CI has, to mount a tmpfs)
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from tests.unit.feedback_support import ADMIN, add_response, db_url, sessions  # noqa: F401 - fixtures
from loop.api.app import create_app
from loop.config import Settings
from loop.db.models import Comparison, Rating
from loop.db.session import make_engine, make_sessionmaker, migrate
from tests.support import free_port

SEED = 10
CLIENTS = 50
FAIL_SHARE = 0.2
MAX_TRIES = 12  # a submission retried after 503s: 0.2 ** 12 that all of them are refused


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The real app behind uvicorn on 127.0.0.1, and a client for it; the lifespan runs as under `loop serve`."""
    app = create_app(settings, manage=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"uvicorn stopped before it listened on port {port}")
        await asyncio.sleep(0.02)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as client:
            yield client, app
    finally:
        server.should_exit = True
        await task


class CommitFaults:
    """Refuse a seeded random share of the engine's commits, as a flaky disk or database connection does."""

    def __init__(self, engine: Engine, share: float, seed: int) -> None:
        self.engine, self.share, self.rng = engine, share, random.Random(seed)
        self.lock = threading.Lock()  # commits come from the writer's and the thread pool's threads
        self.commits = self.refused = 0

    def __call__(self, _conn: Any) -> None:
        with self.lock:
            self.commits += 1
            refuse = self.rng.random() < self.share
            self.refused += refuse
        if refuse:
            raise OSError(5, "Input/output error (injected commit failure)")

    def __enter__(self) -> "CommitFaults":
        event.listen(self.engine, "commit", self)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "commit", self)


@dataclass
class Submission:
    """One thing a client meant to store, and every reply it got for it."""

    kind: str  # "rating" | "comparison"
    body: dict[str, Any]
    key: str | None = None
    key_in_header: bool = False
    retry: bool = False
    replies: list[httpx.Response] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[httpx.Response]:
        return [r for r in self.replies if r.is_success]


async def submit(client: httpx.AsyncClient, sub: Submission) -> None:
    """Send once, or (retry=True) until a 2xx and then once more as a replay, as a careful client does."""
    path = "/api/ratings" if sub.kind == "rating" else "/api/comparisons"
    body = dict(sub.body)
    headers = {}
    if sub.key and sub.key_in_header:
        headers["Idempotency-Key"] = sub.key
    elif sub.key:
        body["idempotency_key"] = sub.key
    goal = 2 if sub.retry else 1  # with retries: the 2xx, then a replay that must give the same row
    for _ in range(MAX_TRIES if sub.retry else 1):
        sub.replies.append(await client.post(path, json=body, headers=headers))
        if len(sub.acknowledged) == goal:
            return
        await asyncio.sleep(0.005)  # Retry-After says 1 s; the test keeps its time budget


def assert_documented_failure(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") == "1", r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    assert (err["type"], err["code"]) == ("service_unavailable", "storage_unavailable"), err
    assert "not stored" in err["message"] and "same idempotency key" in err["message"], err


def rating_content(r: Rating) -> dict[str, Any]:
    return {"response_id": r.response_id, "rater": r.rater, "thumb": {1: "up", -1: "down"}.get(r.thumb or 0),
            "score": r.score, "comment": r.comment, "tags": list(r.tags or []), "idempotency_key": r.idempotency_key}


def comparison_content(c: Comparison) -> dict[str, Any]:
    return {"response_a_id": c.response_a_id, "response_b_id": c.response_b_id, "winner": c.winner,
            "rater": c.rater, "comment": c.comment, "idempotency_key": c.idempotency_key}


def sent_content(sub: Submission) -> dict[str, Any]:
    if sub.kind == "rating":
        fields = {"response_id": None, "rater": "anonymous", "thumb": None, "score": None, "comment": None, "tags": []}
    else:
        fields = {"response_a_id": None, "response_b_id": None, "winner": None, "rater": "anonymous", "comment": None}
    return {**{k: sub.body.get(k, default) for k, default in fields.items()}, "idempotency_key": sub.key}


def check_promise(subs: list[Submission], sessions: sessionmaker[Session]) -> Counter[str]:
    """Every reply against the database; returns what happened (for the test to check faults did happen)."""
    seen: Counter[str] = Counter()
    with sessions() as s:
        stored = {"rating": {r.id: rating_content(r) for r in s.scalars(select(Rating))},
                  "comparison": {c.id: comparison_content(c) for c in s.scalars(select(Comparison))}}
    owner: dict[tuple[str, int], int] = {}  # (kind, id) -> the submission it was returned to
    for n, sub in enumerate(subs):
        for r in sub.replies:
            if not r.is_success:
                assert_documented_failure(r)
                seen["refused"] += 1
                continue
            assert r.status_code in (200, 201), r.text
            seen[f"{r.status_code}"] += 1
            row_id = r.json()["id"]
            assert owner.setdefault((sub.kind, row_id), n) == n, f"{sub.kind} id {row_id} returned to two submissions"
            assert stored[sub.kind].get(row_id) == sent_content(sub), (sub, r.json())
        acked = {r.json()["id"] for r in sub.acknowledged}
        assert len(acked) <= 1, f"one submission, several rows: {sub}"
        if sub.retry:
            assert [r.status_code for r in sub.acknowledged] == [201, 200], sub.replies
            seen["recovered"] += len(sub.replies) > 2
        if sub.key:  # exactly one row for a key that was acknowledged, none for one that never was
            rows = [i for i, c in stored[sub.kind].items() if c["idempotency_key"] == sub.key]
            assert rows == sorted(acked), (sub, rows)
    for kind in stored:  # no row that nobody was told about: a 503 stored nothing
        assert sorted(stored[kind]) == sorted(i for k, i in owner if k == kind), kind
    return seen


async def test_acknowledged_writes_are_stored_while_commits_fail(db_url: str, sessions, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    rids = [add_response(sessions, prompt=f"q{k}", completion=f"a{k}") for k in range(10)]
    pairs = [(add_response(sessions, prompt=f"p{k}", completion="x"), add_response(sessions, prompt=f"p{k}",
                                                                                   completion="y"))
             for k in range(10)]
    subs: list[list[Submission]] = []

    def rating(c: int, i: int) -> dict[str, Any]:
        return {"response_id": rng.choice(rids), "rater": f"rater-{c % 7}", "thumb": rng.choice(["up", "down"]),
                "score": rng.randint(1, 10), "comment": f"client {c} rating {i}", "tags": [f"t{i}"]}

    for c in range(CLIENTS):
        a, b = rng.choice(pairs)
        subs.append([
            Submission("rating", rating(c, 0), key=f"c{c}-r0", retry=True),
            Submission("rating", rating(c, 1), key=f"c{c}-r1", key_in_header=True, retry=True),
            Submission("rating", rating(c, 2)),  # no key: one try, a 503 is final
            Submission("rating", rating(c, 3), key=f"c{c}-r3"),  # a key but no retry
            Submission("comparison", {"response_a_id": a, "response_b_id": b, "winner": rng.choice("ab"),
                                      "rater": f"rater-{c % 7}", "comment": f"client {c}"},
                       key=f"c{c}-c0", retry=True),
            Submission("comparison", {"response_a_id": b, "response_b_id": a, "winner": "tie",
                                      "rater": f"other-{c}"}),
        ])

    async def client_run(client: httpx.AsyncClient, mine: list[Submission]) -> None:
        for sub in mine:
            await submit(client, sub)

    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, admin_token=ADMIN, worker_enabled=False)
    async with served(settings) as (client, app):
        with CommitFaults(app.state.loop.engine, FAIL_SHARE, SEED) as faults:
            await asyncio.wait_for(asyncio.gather(*(client_run(client, mine) for mine in subs)), 60)
    seen = check_promise([sub for mine in subs for sub in mine], sessions)
    # The faults did happen and were survived: refused commits, 503s, and retries that then stored their row.
    assert faults.refused > 0 and seen["refused"] > 0 and seen["recovered"] > 0, (faults.refused, seen)
    assert seen["201"] > CLIENTS * 3, seen


# --- a full disk (SQLite) --------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: SQLite's WAL fills it within a few hundred ratings."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        why = f"mounting a tmpfs failed ({done.stderr.strip()}); the full-disk test needs root"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)  # CI runs as root: there this test must run
        pytest.skip(why)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_acknowledged_ratings_are_stored_when_the_disk_fills(tiny_disk: Path) -> None:
    data_dir = tiny_disk / "loop"
    url = f"sqlite:///{data_dir / 'loop.db'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    try:
        rids = [add_response(sessions, prompt=f"q{k}") for k in range(5)]
        subs: list[Submission] = []
        settings = Settings(data_dir=data_dir, database_url=url, admin_token=ADMIN, worker_enabled=False)
        async with served(settings) as (client, _app):
            refused_in_a_row = 0
            while refused_in_a_row < 40 and len(subs) < 3000:
                wave = [Submission("rating", {"response_id": rids[j % 5], "rater": f"r{j % 3}", "score": 1 + j % 10,
                                              "comment": f"{j} " + "x" * 1500}, key=f"k{j}")
                        for j in range(len(subs), len(subs) + 8)]
                await asyncio.gather(*(submit(client, sub) for sub in wave))
                subs += wave
                refused = sum(1 for sub in wave if not sub.acknowledged)
                refused_in_a_row = refused_in_a_row + refused if refused == len(wave) else 0
        assert refused_in_a_row >= 40, f"the disk never filled in {len(subs)} ratings"
        seen = check_promise(subs, sessions)
        assert seen["201"] > 0 and seen["refused"] >= 40, seen
    finally:
        engine.dispose()
