"""ResponseWriter and replay_journal: a response row is journaled before the reply and committed after it; a
failed commit is retried and never duplicated; rows of a process killed before its commit are inserted at the
next start; a rating sent before its response's commit waits for it and is never told `not_found`.

Run: .venv/bin/python -m pytest -q tests/unit/feedback/test_response_writer.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import loop.feedback.responses as responses_module
from loop.db.models import Response
from loop.feedback import RatingInput, RatingWriter
from loop.feedback.responses import ResponseWriter, replay_journal
from tests.unit.feedback.test_feedback_writer import failing_commits
from tests.unit.feedback_support import db_url, sessions  # noqa: F401 - fixtures


def row(rid: str | None = None, completion: str = "4") -> dict[str, Any]:
    """One response row as the proxy builds it (loop.vllm.capture.row_values)."""
    return {"id": rid or f"resp-{uuid.uuid4().hex}", "group_id": uuid.uuid4().hex, "choice_index": 0,
            "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "endpoint": "chat", "model": "m",
            "weight_version": 0, "request": {"messages": [{"role": "user", "content": "2+2?"}]},
            "messages": [{"role": "user", "content": "2+2?"}], "prompt_text": "P", "prompt_hash": "h" * 64,
            "completion": completion, "prompt_token_ids": [1, 2], "completion_token_ids": [7],
            "completion_logprobs": [-0.5], "finish_reason": "stop", "prompt_tokens": 2, "completion_tokens": 1,
            "latency_ms": 3.0, "ttft_ms": None, "stream": False, "truncated": False, "error": None}


def stored(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as s:
        return {r.id: r.completion for r in s.scalars(select(Response))}


async def test_submit_returns_before_the_commit_and_the_row_is_committed_right_after(sessions,
                                                                                    tmp_path: Path) -> None:
    journal = tmp_path / "responses.journal"
    writer = ResponseWriter(sessions, journal)
    r = row()
    writer.submit([r])  # no await: this is all the reply waits for
    assert writer.pending(r["id"]) and journal.read_bytes().count(b"\n") == 1
    assert stored(sessions) == {}
    assert await writer.settled([r["id"]], 5.0)
    assert stored(sessions) == {r["id"]: "4"} and not writer.pending(r["id"])
    assert journal.read_bytes() == b""  # everything committed: the journal holds nothing
    with sessions() as s:
        got = s.get(Response, r["id"])
        assert got is not None and got.messages == r["messages"] and got.created_at.year == 2026
    await writer.close(1.0)


async def test_a_failed_commit_is_retried_until_the_database_takes_it(sessions, tmp_path: Path) -> None:
    writer = ResponseWriter(sessions, tmp_path / "responses.journal")
    r = row()
    with failing_commits(sessions):
        writer.submit([r])
        assert not await writer.settled([r["id"]], 0.3)  # the database refuses: still pending, never dropped
        assert writer.failures >= 2 and writer.pending(r["id"])
    assert await writer.settled([r["id"]], 5.0)
    assert stored(sessions) == {r["id"]: "4"}
    await writer.close(1.0)


async def test_a_commit_whose_outcome_was_lost_is_not_stored_twice(sessions, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = responses_module.insert_responses
    calls: list[bool] = []

    def committed_then_lost(sessions_, rows, *, skip_stored: bool) -> int:  # noqa: ANN001
        calls.append(skip_stored)
        n = real(sessions_, rows, skip_stored=skip_stored)
        if len(calls) == 1:
            raise ConnectionError("the connection dropped after COMMIT (injected)")
        return n

    monkeypatch.setattr(responses_module, "insert_responses", committed_then_lost)
    writer = ResponseWriter(sessions, tmp_path / "responses.journal")
    r = row()
    writer.submit([r])
    await writer.drain()
    assert calls == [False, True] and stored(sessions) == {r["id"]: "4"}
    await writer.close(1.0)


KILLED_AFTER_REPLY = r"""
import os, signal, sys, uuid
from pathlib import Path
import asyncio
from loop.db.session import make_engine, make_sessionmaker
from loop.feedback.responses import ResponseWriter
from tests.unit.feedback.test_response_writer import row

async def main():
    writer = ResponseWriter(make_sessionmaker(make_engine(sys.argv[1])), Path(sys.argv[2]))
    r = row(sys.argv[3])
    writer.submit([r])            # what the proxy does before its reply leaves
    print("replied", flush=True)  # the reply is out ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the writer could commit

asyncio.run(main())
"""


async def test_rows_of_a_process_killed_right_after_its_reply_are_inserted_at_the_next_start(
        sessions, db_url: str, tmp_path: Path) -> None:
    journal, rid = tmp_path / "responses.journal", f"resp-{uuid.uuid4().hex}"
    done = subprocess.run([sys.executable, "-c", KILLED_AFTER_REPLY, db_url, str(journal), rid],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == -signal.SIGKILL and done.stdout == "replied\n", done.stderr
    assert stored(sessions) == {}  # never committed ...
    assert replay_journal(sessions, journal) == 1  # ... and there at the next start
    assert stored(sessions) == {rid: "4"} and journal.read_bytes() == b""
    assert replay_journal(sessions, journal) == 0


async def test_replay_skips_stored_rows_and_a_torn_last_line(sessions, tmp_path: Path) -> None:
    journal = tmp_path / "responses.journal"
    writer = ResponseWriter(sessions, journal)
    committed, kept = row(completion="a"), row(completion="b")
    writer.submit([committed])
    await writer.drain()
    journal.write_bytes(responses_module._journal_line(committed) + responses_module._journal_line(kept)
                        + b'{"id": "resp-torn", "compl')  # the process died mid-write: that reply never left
    assert replay_journal(sessions, journal) == 1
    assert stored(sessions) == {committed["id"]: "a", kept["id"]: "b"}
    await writer.close(1.0)


async def test_close_commits_what_is_queued_and_keeps_what_it_cannot_for_the_next_start(sessions,
                                                                                       tmp_path: Path) -> None:
    journal = tmp_path / "responses.journal"
    writer = ResponseWriter(sessions, journal)
    first = row()
    writer.submit([first])
    await writer.close(5.0)
    assert stored(sessions) == {first["id"]: "4"}
    writer = ResponseWriter(sessions, journal)
    late = row()
    with failing_commits(sessions):
        writer.submit([late])
        await writer.close(0.3)
        with pytest.raises(OSError, match="closed"):
            writer.submit([row()])  # a stopped writer takes nothing it could lose
    assert stored(sessions) == {first["id"]: "4"}
    assert replay_journal(sessions, journal) == 1 and late["id"] in stored(sessions)


async def test_a_journal_that_refuses_the_write_raises_and_keeps_nothing_pending(sessions) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) to stand for a full disk")
    writer = ResponseWriter(sessions, Path("/dev/full"))
    r = row()
    with pytest.raises(OSError):
        writer.submit([r])
    assert not writer.pending(r["id"]) and len(writer) == 0
    await writer.close(1.0)


async def test_a_rating_sent_before_its_response_is_committed_waits_for_it(sessions, tmp_path: Path) -> None:
    responses = ResponseWriter(sessions, tmp_path / "responses.journal")
    ratings = RatingWriter(sessions, responses=responses)
    r = row()
    with failing_commits(sessions):
        responses.submit([r])
        rating = asyncio.create_task(ratings.submit(RatingInput(r["id"], rater="a", thumb=1)))
        await asyncio.sleep(0.2)
        assert not rating.done()  # waiting for the response row, not answering 404
    outcome = await asyncio.wait_for(rating, 5.0)
    assert outcome.kind == "created" and outcome.body["response_id"] == r["id"]
    await ratings.close(1.0)
    await responses.close(1.0)


async def test_a_rating_whose_response_cannot_be_committed_is_told_to_retry_not_that_it_is_unknown(
        sessions, tmp_path: Path) -> None:
    responses = ResponseWriter(sessions, tmp_path / "responses.journal")
    ratings = RatingWriter(sessions, responses=responses, response_wait_s=0.2)
    r = row()
    with failing_commits(sessions):
        responses.submit([r])
        outcome = await ratings.submit(RatingInput(r["id"], rater="a", thumb=1))
    assert outcome.kind == "unavailable" and outcome.code == "storage_unavailable"
    assert "not committed yet" in (outcome.message or "")
    await responses.close(5.0)
    outcome = await ratings.submit(RatingInput(r["id"], rater="a", thumb=1))  # the client's retry
    assert outcome.kind == "created"
    await ratings.close(1.0)


async def test_a_row_the_database_rejects_is_dropped_alone_and_holds_up_nothing(sessions, tmp_path: Path) -> None:
    journal = tmp_path / "responses.journal"
    writer = ResponseWriter(sessions, journal)
    good, bad, later = row(completion="a"), {**row(), "prompt_hash": None}, row(completion="c")  # NOT NULL column
    writer.submit([good, bad])
    writer.submit([later])
    assert await writer.settled(None, 5.0)
    assert stored(sessions) == {good["id"]: "a", later["id"]: "c"} and writer.rejected == [bad["id"]]
    assert journal.read_bytes() == b""
    journal.write_bytes(responses_module._journal_line(bad) + responses_module._journal_line(row(completion="d")))
    assert replay_journal(sessions, journal) == 1  # the start-up replay is not stopped by it either
    await writer.close(1.0)
