"""One trainer per database: the lock that makes a loop process the one that trains and writes the version record.

Several API processes may share one database (PostgreSQL, or one SQLite file on one host): they all serve chat,
log responses and take ratings, but only the holder of this lock runs the training worker, the scheduler's runs
and the recovery of interrupted runs, so two trainers never consume the same feedback or write the version record
over each other. A process that does not hold it waits in standby and takes over when the holder goes away:
- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`) on a connection kept for the purpose; the
  server releases it when that connection ends, so a holder that crashes or is killed frees it at once. The holder
  checks its connection every few seconds: a holder that lost it (the database restarted, the network dropped)
  no longer knows that it is alone and must stop training (`loop serve` exits; its supervisor restarts it).
- SQLite: an exclusive `flock` on `<database>.trainer-lock` beside the file, released by the kernel when the
  holding process exits however it exits.
Tests: tests/unit/training/test_leader.py (SQLite and PostgreSQL); tests/e2e/test_standby_e2e.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

log = logging.getLogger("loop.training")



def lock_key(database: str, schema: str) -> int:
    """pg_advisory_lock's key for loop's tables in `database`.`schema` (advisory locks are per database; two loops
    may keep their tables in two schemas of one): a 63-bit number, the same in every loop process."""
    name = f"loop: the trainer of {database}.{schema}".encode()
    return int.from_bytes(hashlib.sha256(name).digest()[:8], "big") >> 1


def me() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class TrainerLock:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.held = False
        self._conn: Any = None  # PostgreSQL: the connection that holds the advisory lock
        self._fd: int | None = None  # SQLite: the locked file
        self._key: int | None = None

    def key(self, conn: Any) -> int:
        if self._key is None:
            database, schema = conn.execute(text("SELECT current_database(), current_schema()")).one()
            self._key = lock_key(str(database), str(schema))
        return self._key

    @property
    def kind(self) -> str:
        return "postgresql" if self.engine.dialect.name == "postgresql" else "sqlite"

    def _lock_file(self) -> Path:
        db = self.engine.url.database
        if not db or db == ":memory:":
            raise ValueError("the trainer lock needs a database file")
        return Path(db).with_name(Path(db).name + ".trainer-lock")

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True when this process holds it (now or already)."""
        if self.held:
            return True
        if self.kind == "postgresql":
            conn = self.engine.connect()
            try:
                got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key(conn)}).scalar())
                conn.commit()
            except Exception:
                conn.close()
                raise
            if not got:
                conn.close()
                return False
            self._conn = conn
        else:
            fd = os.open(self._lock_file(), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.write(fd, f"{me()}\n".encode())
            self._fd = fd
        self.held = True
        log.info("this process (%s) is the trainer of the database (%s lock)", me(), self.kind)
        return True

    def holder(self) -> str | None:
        """Who holds the lock, as far as can be told (SQLite: what the holder wrote; PostgreSQL: its backend pid)."""
        if self.held:
            return me()
        if self.kind == "sqlite":
            with contextlib.suppress(OSError, ValueError):
                return self._lock_file().read_text().strip() or None
            return None
        with contextlib.suppress(Exception), self.engine.connect() as conn:
            pid = conn.execute(text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                                    "((classid::bigint << 32) | objid::bigint) = :k"), {"k": self.key(conn)}).scalar()
            return f"PostgreSQL backend pid {pid}" if pid is not None else None
        return None

    def still_held(self) -> bool:
        """The holder's check that the lock is still its own (PostgreSQL: its connection is alive)."""
        if not self.held:
            return False
        if self._conn is None:
            return True  # a flock lasts as long as this process
        try:
            self._conn.execute(text("SELECT 1")).scalar()
            self._conn.commit()
            return True
        except Exception as e:  # noqa: BLE001 - any failure means the session (and the lock with it) may be gone
            log.error("the trainer lock's database connection failed (%s): this process no longer knows that it "
                      "is the only trainer", e)
            self.held = False
            return False

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key(self._conn)})
                self._conn.commit()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None
        self.held = False
