"""Storing generated responses off the reply path: a journal line before the reply, a group commit after it.

Why: the proxy used to commit every response row before its reply left. On SQLite with `synchronous=FULL` that
commit is an fsync, and it was nearly all of what the proxy added to vLLM's latency. The row is a log of what
was served; the client already holds the answer. So the reply no longer waits for the database, and this module
says precisely what a response id in a reply promises instead.

The contract, for every id loop puts in a reply (`id`, `loop_response_id`, `X-Loop-Response-Id`):
1. Before the reply (or the stream's `[DONE]`) is sent, the row is appended to the journal file
   (`<data dir>/responses.journal`, 0600, one JSON line per row, plain `write()`, no fsync): from then on the
   row survives the loop process dying (SIGKILL, OOM, a crash), because the kernel holds the bytes. A row that
   cannot be journaled (disk full, I/O error) is committed to the database before the reply instead, as before;
   should that fail too, the request answers 503 `storage_unavailable` and no id is handed out.
2. The `ResponseWriter` commits journaled rows in batches (one transaction each) right after the reply, and
   retries a failed commit with backoff until it succeeds or the app stops; commits are idempotent (an id
   already stored is skipped), so a retry after an unknown outcome never duplicates a row. The one exception is
   a row the database itself rejects (IntegrityError / DataError: no retry can store it): its batch is retried
   row by row, and that row alone is logged by id and dropped rather than holding up every row behind it.
3. Within the process, a row waiting for its commit is `pending`: whoever looks a response up right after the
   reply (a rating, a comparison) first awaits `settled(ids)`, bounded, so a rating sent the moment the reply
   arrived finds its row instead of a 404; when the database keeps refusing past the bound, the rating is told
   to retry (503), never that the response does not exist.
4. At start-up (`replay_journal`, from `LoopState.open`) rows left in the journal by a process that died before
   committing them are inserted (ids already stored are skipped) and the journal is emptied; at a clean stop the
   writer commits what is queued, and what it cannot commit in time stays in the journal for the next start.
   The journal is emptied whenever every row in it has been committed, so it only holds the last moments.
Not covered: a power cut or kernel crash in the few milliseconds between a reply and its commit loses the rows
journaled in that window (the journal is not fsynced: that fsync is the cost being removed). Ratings and
comparisons keep the stronger promise (committed, on disk, before their 2xx): they are the training data.

Tests: tests/unit/feedback/test_response_writer.py, tests/unit/api/test_proxy.py,
tests/unit/api/test_state_shutdown.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import insert, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loop.db.models import Response

log = logging.getLogger("loop.feedback")

JOURNAL_NAME = "responses.journal"
# Backoff between commit retries: quick at first (a busy database), then at most every few seconds.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0

# What the database says about a row's own content: retrying the same row cannot help.
REJECTED = (IntegrityError, DataError)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

Row = dict[str, Any]  # a `responses` row: column name -> value (what loop.vllm.capture.row_values builds)


def insert_responses(sessions: sessionmaker[Session], rows: list[Row], *, skip_stored: bool) -> int:
    """Insert `rows` in one transaction; with `skip_stored`, ids already in the table are left alone (a retry or
    a replay). Returns how many rows were inserted."""
    with sessions() as session:
        if skip_stored:
            stored = set(session.scalars(select(Response.id).where(Response.id.in_([r["id"] for r in rows]))))
            rows = [r for r in rows if r["id"] not in stored]
        if rows:
            session.execute(insert(Response), rows)
        session.commit()
    return len(rows)


def _journal_line(row: Row) -> bytes:
    return _encode(row) + b"\n"


def _row_from_line(line: bytes) -> Row:
    row = _decode(line)
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        raise ValueError("not a response row")
    if isinstance(row.get("created_at"), str):
        row["created_at"] = datetime.fromisoformat(row["created_at"])
    row.setdefault("weight_version_last", row.get("weight_version"))  # journaled before the column existed
    return row


def replay_journal(sessions: sessionmaker[Session], path: Path) -> int:
    """Insert the rows a previous process journaled but did not commit, then empty the journal. Returns how many
    rows were inserted. A torn last line (the process died mid-write) is skipped: its reply never left. Raises
    when the database refuses the insert (the journal is kept for the next start)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    rows: dict[str, Row] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = _row_from_line(line)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("%s line %d is not a response row (%s); skipped", path, number, exc)
            continue
        rows[row["id"]] = row
    try:
        inserted = insert_responses(sessions, list(rows.values()), skip_stored=True) if rows else 0
    except REJECTED:  # one row the database will never take must not keep the others (or loop) from starting
        inserted = 0
        for one in rows.values():
            try:
                inserted += insert_responses(sessions, [one], skip_stored=True)
            except REJECTED as exc:
                log.error("the database rejects journaled response %s (%s); dropped", one["id"], exc)
    if inserted:
        log.warning("recovered %d response rows from %s (journaled, not yet committed when loop last stopped)",
                    inserted, path)
    with open(path, "r+b") as f:
        f.truncate(0)
    return inserted


class ResponseWriter:
    """Journal + group commit for response rows (the contract is the module docstring's).

        writer = ResponseWriter(sessions, data_dir / JOURNAL_NAME)
        writer.submit(rows)                  # before the reply: journaled, queued (raises OSError: not journaled)
        await writer.settled(["resp-…"], 5)  # before looking one up: True once committed
    """

    def __init__(self, sessions: sessionmaker[Session], journal: Path | None, *, max_batch: int = 256) -> None:
        """`journal` None: no journal (rows are only in memory until committed; tests and tools)."""
        self._sessions = sessions
        self._max_batch = max_batch
        self._journal_path = journal
        self._fd: int | None = None
        if journal is not None:
            self._fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._queue: list[Row] = []
        self._pending: dict[str, asyncio.Future[None]] = {}  # id -> resolved when its row is committed
        self._uncommitted_journaled = 0
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.committed = 0  # figures for tests and metrics
        self.failures = 0
        self.rejected: list[str] = []  # ids of rows the database refused for their content

    def pending(self, response_id: str) -> bool:
        return response_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, rows: list[Row]) -> None:
        """Journal `rows` and queue them for the next commit; returns at once (no await: nothing here waits for
        the database). Raises OSError when the journal write fails: the caller must store the rows itself."""
        if not rows:
            return
        if self._closed:
            raise OSError("the response writer is closed (loop is stopping)")
        if self._fd is not None:
            data = b"".join(_journal_line(r) for r in rows)
            written = os.write(self._fd, data)
            if written != len(data):  # a short write to a regular file: the disk is full
                raise OSError(f"short write to {self._journal_path} ({written} of {len(data)} bytes)")
            self._uncommitted_journaled += len(rows)
        loop = asyncio.get_running_loop()
        for row in rows:
            self._pending[row["id"]] = loop.create_future()
        self._queue.extend(rows)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="loop-response-writer")

    async def settled(self, ids: Iterable[str] | None, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until none of `ids` (None: of the rows pending now) is waiting for its
        commit. True when none is: each is either committed or was never a pending row of this process."""
        futs = set(self._pending.values()) if ids is None else {self._pending[i] for i in ids if i in self._pending}
        if not futs:
            return True
        await asyncio.wait(futs, timeout=timeout_s)
        return all(f.done() for f in futs)

    async def drain(self) -> None:
        """Wait until every row submitted so far is committed (retrying as long as that takes)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def close(self, timeout_s: float) -> None:
        """Commit what is queued, within `timeout_s`; rows still uncommitted after that stay in the journal and
        are inserted at the next start (`replay_journal`)."""
        self._closed = True
        try:
            await asyncio.wait_for(self.drain(), timeout_s)
        except TimeoutError:
            left = len(self._pending)
            where = f"kept in {self._journal_path} for the next start" if self._fd is not None else "lost"
            log.error("shutting down: %d response rows were not committed within %g s; %s", left, timeout_s, where)
            if self._flusher is not None:
                self._flusher.cancel()  # a commit already in its thread may still land: replay skips stored ids
                await asyncio.wait({self._flusher}, timeout=1.0)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def _flush(self) -> None:
        delay = RETRY_FIRST_S
        retry = one_by_one = False
        while self._queue:
            batch = self._queue[:1 if one_by_one else self._max_batch]
            try:
                await asyncio.to_thread(insert_responses, self._sessions, batch, skip_stored=retry)
            except REJECTED as exc:
                self.failures += 1
                if len(batch) > 1:  # find the row the database refuses: the others go in one by one
                    one_by_one = retry = True
                    continue
                log.error("the database rejects response %s (%s: %s); dropped", batch[0]["id"], type(exc).__name__,
                          exc)
                self.rejected.append(batch[0]["id"])
                self._done(batch)
                continue
            except Exception as exc:  # noqa: BLE001 - kept queued and journaled: retried, never dropped
                self.failures += 1
                log.error("committing %d response rows failed (%s: %s); retrying in %g s", len(batch),
                          type(exc).__name__, exc, delay)
                retry = True  # the commit may have happened after all: skip stored ids next time
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay, retry = RETRY_FIRST_S, False
            self.committed += len(batch)
            self._done(batch)

    def _done(self, batch: list[Row]) -> None:
        """`batch` (the queue's head) is settled: committed, or rejected by the database."""
        del self._queue[:len(batch)]
        for row in batch:
            fut = self._pending.pop(row["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        if self._fd is not None:
            self._uncommitted_journaled -= len(batch)
            if self._uncommitted_journaled == 0 and not self._queue:
                self._truncate()

    def _truncate(self) -> None:
        """Every journaled row is committed: empty the journal (appends go to its new end)."""
        try:
            os.ftruncate(self._fd, 0)  # type: ignore[arg-type]
        except OSError as exc:  # the rows are committed; a journal that stays is replayed idempotently
            log.warning("emptying %s failed: %s", self._journal_path, exc)
