"""One trainer per database (loop/training/leader.py), on a real SQLite file and a real PostgreSQL (when
LOOP_TEST_POSTGRES_URL is set, as in CI): one holder at a time, the next one takes over when it lets go or dies, and
a holder whose PostgreSQL session ends knows it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from loop.training.leader import TrainerLock, lock_key
from tests.unit.feedback_support import postgres_schema_url


def test_each_schema_of_a_database_has_its_own_trainer() -> None:
    assert lock_key("loop", "public") != lock_key("loop", "t_1") != lock_key("other", "public")
    assert 0 < lock_key("loop", "public") < 1 << 63  # a bigint


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'loop.db'}"
    else:
        yield from postgres_schema_url()  # its own schema: the lock is per database and schema


def engines(url: str, n: int) -> list[Engine]:
    return [create_engine(url) for _ in range(n)]


def test_one_holder_at_a_time_and_the_next_takes_over_when_it_lets_go(url: str) -> None:
    a_engine, b_engine = engines(url, 2)
    a, b = TrainerLock(a_engine), TrainerLock(b_engine)
    try:
        assert a.try_acquire() and a.try_acquire()  # held: asking again is a yes
        assert not b.try_acquire() and not b.held
        assert a.still_held() and not b.still_held()
        assert b.holder()  # the standby can say who trains
        a.release()
        assert b.try_acquire() and b.held and not a.try_acquire()
    finally:
        a.release()
        b.release()
        a_engine.dispose()
        b_engine.dispose()


CHILD = r"""
import sys, time
from sqlalchemy import create_engine
from loop.training.leader import TrainerLock, lock_key
from tests.unit.feedback_support import postgres_schema_url


def test_each_schema_of_a_database_has_its_own_trainer() -> None:
    assert lock_key("loop", "public") != lock_key("loop", "t_1") != lock_key("other", "public")
    assert 0 < lock_key("loop", "public") < 1 << 63  # a bigint
lock = TrainerLock(create_engine(sys.argv[1]))
print("held" if lock.try_acquire() else "not held", flush=True)
time.sleep(600)
"""


def test_a_holder_killed_frees_the_lock_for_the_next(url: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, text=True)
    (engine,) = engines(url, 1)
    mine = TrainerLock(engine)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert not mine.try_acquire()
        child.kill()
        child.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not mine.try_acquire():  # PostgreSQL ends the dead client's session as its socket closes
            assert time.monotonic() < deadline, "the dead holder's lock was never freed"
            time.sleep(0.2)
        assert mine.still_held()
    finally:
        child.kill()
        mine.release()
        engine.dispose()


@pytest.mark.postgres
def test_a_holder_whose_postgres_session_ends_knows_it_lost_the_lock() -> None:
    schema = postgres_schema_url()
    pg = next(schema)
    holder_engine, admin_engine, next_engine = engines(pg, 3)
    holder, follower = TrainerLock(holder_engine), TrainerLock(next_engine)
    try:
        assert holder.try_acquire()
        backend = holder._conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with admin_engine.connect() as admin:  # the database drops the holder's session (a restart, a network cut)
            admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": backend})
        assert not holder.still_held() and not holder.held
        assert follower.try_acquire()
    finally:
        holder.release()
        follower.release()
        for e in (holder_engine, admin_engine, next_engine):
            e.dispose()
        schema.close()  # drops the test's schema
