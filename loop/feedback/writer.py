"""Group commit for ratings: many concurrent POSTs, one transaction, every reply only after its commit.

Why: a commit per rating costs a WAL append + lock round trip and an ORM unit of work each; under load that
dominates. Here each request appends its rating to a pending list and awaits a future; a single flusher (started
on demand, gone when idle) takes everything pending, writes it in one transaction on a worker thread (the event
loop keeps accepting requests meanwhile, which fills the next batch) and resolves each future with its own
outcome. Durability before the acknowledgement: a future is resolved only after the transaction that holds its
row has committed. A waiter always gets an outcome, never an exception and never a neighbour's: should
`write_ratings` break its one-outcome-per-item contract (raise, or return a list of another length), every waiter
of that batch gets `unknown` (`storage_outcome_unknown`) rather than a guess.

`close()` (the app's shutdown, through loop.state.LoopState.stop) refuses new ratings (`unavailable`: nothing
stored, retry) and waits for the queued ones to be written; past its bound, queued ratings not yet handed to the
database are `unavailable` and the batch being written is `unknown`. No waiter is ever left without an outcome.

A rating may arrive the moment the proxy's reply did, before that response's row is committed (the proxy
journals it and commits it after the reply: loop.feedback.responses). With a `ResponseWriter`, `submit` first
waits (at most `RESPONSE_WAIT_S`) for such a pending row; when it is still not committed after that, the rating
is `unavailable` (retry), never `not_found`.

Tests: tests/unit/feedback/test_feedback_writer.py, tests/unit/api/test_state_shutdown.py, tests/faults/test_acknowledged.py.

    writer = RatingWriter(sessions)
    outcome = await writer.submit(RatingInput(...))   # Outcome(kind="created", body={...})
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from loop.feedback.store import Outcome, RatingInput, not_stored, write_ratings

if TYPE_CHECKING:
    from loop.feedback.responses import ResponseWriter

log = logging.getLogger("loop.feedback")

# Which of the batch's rows were committed is not known here, so no waiter may be told either way.
OUTCOME_UNKNOWN = Outcome("unknown", message="storing the rating failed and whether it was stored is unknown; retry "
                                             "with the same idempotency key (a stored rating answers 200 with it)",
                          code="storage_outcome_unknown")
SHUTTING_DOWN = not_stored("rating", "loop is shutting down")
# How long a rating waits for its response's row to be committed: a healthy database commits in milliseconds;
# past this the database is refusing writes and the client is better told to retry.
RESPONSE_WAIT_S = 5.0


class RatingWriter:
    def __init__(self, sessions: sessionmaker[Session], *, max_batch: int = 512,
                 responses: ResponseWriter | None = None, response_wait_s: float = RESPONSE_WAIT_S) -> None:
        self._sessions = sessions
        self._responses = responses
        self._response_wait_s = response_wait_s
        self._max_batch = max_batch
        self._pending: list[tuple[RatingInput, asyncio.Future[Outcome]]] = []
        self._writing: list[tuple[RatingInput, asyncio.Future[Outcome]]] = []  # the batch in the database now
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # figures for the benchmark / metrics
        self.written = 0

    async def submit(self, item: RatingInput) -> Outcome:
        if self._closed:
            return SHUTTING_DOWN
        responses = self._responses
        if responses is not None and responses.pending(item.response_id):
            if not await responses.settled([item.response_id], self._response_wait_s):
                return not_stored("rating", f"response {item.response_id!r} was served but its row is not committed "
                                            "yet (the database is refusing writes)")
            if self._closed:
                return SHUTTING_DOWN
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="loop-rating-writer")
        # shield: a client that hangs up must not cancel the flush its neighbours wait for.
        return await asyncio.shield(fut)

    async def drain(self) -> None:
        """Wait until everything submitted so far has its outcome."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def close(self, timeout_s: float) -> None:
        """Refuse new ratings and give every queued one its outcome: written within `timeout_s`, else
        `unavailable` (never handed to the database) or `unknown` (its batch's commit did not come back)."""
        self._closed = True
        try:
            await asyncio.wait_for(self.drain(), timeout_s)
            return
        except TimeoutError:
            pass
        flusher = self._flusher
        if flusher is not None:
            flusher.cancel()  # its thread may still commit: hence `unknown` for the batch it holds
        left = [fut for _, fut in self._pending]
        unknown = [fut for _, fut in self._writing]
        self._pending, self._writing = [], []
        log.error("shutting down: %d queued ratings were not written within %g s (answered as not stored) and "
                  "%d were being committed (answered as unknown)", len(left), timeout_s, len(unknown))
        for futs, outcome in ((left, SHUTTING_DOWN), (unknown, OUTCOME_UNKNOWN)):
            for fut in futs:
                if not fut.done():
                    fut.set_result(outcome)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
            self._writing = batch
            items = [item for item, _ in batch]
            try:
                outcomes = await asyncio.to_thread(write_ratings, self._sessions, items)
            except Exception:  # noqa: BLE001 - every waiter hears about it; the flusher carries on
                log.exception("writing %d ratings failed", len(items))
                outcomes = [OUTCOME_UNKNOWN] * len(items)
            if len(outcomes) != len(items):
                log.error("write_ratings gave %d outcomes for %d ratings; failing the whole batch",
                          len(outcomes), len(items))
                outcomes = [OUTCOME_UNKNOWN] * len(items)
            self.batches += 1
            self.written += sum(1 for o in outcomes if o.kind == "created")
            self._writing = []
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(outcome)
