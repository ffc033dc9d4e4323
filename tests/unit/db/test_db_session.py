"""loop/db/session.py: a commit that failed never lets its rows ride along with the next one (SQLite, PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import event, text

from tests.unit.feedback_support import db_url  # noqa: F401 - fixture
from loop.db.session import make_engine, make_sessionmaker


def test_rows_of_a_failed_commit_are_not_committed_by_the_next_one(db_url: str) -> None:  # noqa: F811
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE probe (x INTEGER)"))
        sessions = make_sessionmaker(engine)

        def refuse(_conn) -> None:  # noqa: ANN001 - as a full disk or a dropped link does, before the driver
            raise OSError(28, "No space left on device (injected)")

        event.listen(engine, "commit", refuse)
        try:
            with sessions() as s:
                s.execute(text("INSERT INTO probe VALUES (1)"))
                s.commit()
            raise AssertionError("the commit should have failed")
        except OSError:
            pass
        finally:
            event.remove(engine, "commit", refuse)
        with sessions() as s:  # the next writer, very likely on the same pooled connection
            s.execute(text("INSERT INTO probe VALUES (2)"))
            s.commit()
        other = make_engine(db_url)
        try:
            with other.connect() as conn:
                assert [r[0] for r in conn.execute(text("SELECT x FROM probe ORDER BY x"))] == [2]
        finally:
            other.dispose()
    finally:
        engine.dispose()
