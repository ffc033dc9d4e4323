"""Engine, sessions and migrations.

SQLite gets WAL mode, `synchronous=FULL` and a busy timeout; foreign keys are switched on. FULL because a 2xx for
a write promises the row is on disk: in WAL mode FULL fsyncs the log at every commit, where NORMAL only does at
checkpoints (a power cut could then lose acknowledged feedback). Any other SQLAlchemy URL (PostgreSQL is tested)
is used as given; PostgreSQL's default `synchronous_commit=on` already flushes the WAL to disk before a commit
returns, so the same promise holds there (do not turn it off for a loop database). Migrations are Alembic
scripts in the top-level `migrations` package; `migrate()` runs them at start-up and `loop db upgrade|downgrade`
runs them by hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from loop.config import tighten


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            _private_sqlite_file(Path(db_path))
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI types
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    else:
        engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)
    event.listen(engine.pool, "checkin", _end_open_transaction)
    return engine


def _end_open_transaction(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI types
    """A commit that failed before reaching the driver can leave the connection inside its transaction, and the
    pool's own reset skips it (SQLAlchemy believes the transaction ended): the next user's commit would then also
    commit the rows whose writer was told they failed. Roll back on every check-in (a no-op when idle)."""
    if dbapi_conn is None:
        return
    try:
        dbapi_conn.rollback()
    except Exception:  # noqa: BLE001 - a connection that cannot even roll back is not handed out again
        _record.invalidate()


def _private_sqlite_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would follow the umask, often 0644), and tighten
    an existing one. SQLite gives its -wal and -shm files the database file's permissions."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            tighten(existing, 0o600)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):  # noqa: ANN201 - alembic.config.Config, imported lazily
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at `url` up to `revision` (default: the newest)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
