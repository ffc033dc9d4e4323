"""Conversations: each rater's chats, kept on the server so they can be listed, reopened and continued anywhere.

A conversation is the screen's own record, not a new copy of what was generated: user messages, and per assistant
turn its siblings (the answer and its regenerations, each a logged response id with the text shown) and which one
is shown. Every response id must be a logged response. A conversation belongs to one rater; another rater's id
answers as unknown. Saves are whole-document with optimistic concurrency: `expected_revision` (the revision the
screen loaded) makes a save from a stale tab fail with `stale_conversation` instead of overwriting the other tab's
turns; the compare-and-set is one UPDATE, so two saves at once cannot both win.

Tests: tests/unit/feedback/test_conversations.py (SQLite and PostgreSQL).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from loop.db.models import Conversation, Response
from loop.errors import Conflict, Invalid, NotFound

TITLE_CHARS = 80


def _iso(t: datetime) -> str:
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat()


def _summary(c: Conversation) -> dict[str, Any]:
    return {"id": c.id, "title": c.title, "rater": c.rater, "revision": c.revision, "turns": len(c.turns or []),
            "created_at": _iso(c.created_at), "updated_at": _iso(c.updated_at)}


def _full(c: Conversation) -> dict[str, Any]:
    return {**_summary(c), "turns": list(c.turns or [])}


def default_title(turns: list[dict[str, Any]]) -> str:
    first = next((t.get("content") or "" for t in turns if t.get("role") == "user"), "")
    text = " ".join(str(first).split())
    return (text[:TITLE_CHARS - 1] + "…") if len(text) > TITLE_CHARS else (text or "New conversation")


def _check_responses(s: Session, turns: list[dict[str, Any]]) -> None:
    ids = {sib["response_id"] for t in turns if t.get("role") == "assistant" for sib in t.get("siblings", [])}
    if not ids:
        return
    known = set(s.scalars(select(Response.id).where(Response.id.in_(ids))))
    missing = sorted(ids - known)
    if missing:
        raise Invalid(f"the conversation names responses loop never logged: {', '.join(missing[:5])}"
                      f"{' …' if len(missing) > 5 else ''}", code="unknown_response", param="turns")


def create(sessions: sessionmaker[Session], rater: str, turns: list[dict[str, Any]],
           title: str | None = None) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    with sessions() as s:
        _check_responses(s, turns)
        c = Conversation(id=f"conv-{uuid.uuid4().hex}", rater=rater, title=title or default_title(turns),
                         turns=turns, revision=1, created_at=now, updated_at=now)
        s.add(c)
        s.commit()
        return _full(c)


def _own(s: Session, rater: str, conversation_id: str) -> Conversation:
    c = s.get(Conversation, conversation_id)
    if c is None or c.rater != rater:  # someone else's answers as unknown: ids are not secrets, contents are
        raise NotFound(f"no conversation {conversation_id!r} of {rater!r}", code="conversation_not_found")
    return c


def get(sessions: sessionmaker[Session], rater: str, conversation_id: str) -> dict[str, Any]:
    with sessions() as s:
        return _full(_own(s, rater, conversation_id))


def save(sessions: sessionmaker[Session], rater: str, conversation_id: str, turns: list[dict[str, Any]], *,
         title: str | None = None, expected_revision: int | None = None) -> dict[str, Any]:
    """Replace the turns (and title, when given). With `expected_revision`, only if nobody saved since."""
    with sessions() as s:
        c = _own(s, rater, conversation_id)
        _check_responses(s, turns)
        base = c.revision if expected_revision is None else expected_revision
        stmt = (update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.revision == base)
                .values(turns=turns, title=title or c.title, revision=base + 1,
                        updated_at=datetime.now(timezone.utc)))
        if s.execute(stmt).rowcount != 1:
            s.rollback()
            now = s.scalar(select(Conversation.revision).where(Conversation.id == conversation_id))
            raise Conflict(f"conversation {conversation_id!r} was saved elsewhere since revision {base} (now "
                           f"{now}): reload it, then save again", code="stale_conversation", param="expected_revision")
        s.commit()
        s.expire_all()
        return _full(_own(s, rater, conversation_id))


def delete(sessions: sessionmaker[Session], rater: str, conversation_id: str) -> None:
    with sessions() as s:
        s.delete(_own(s, rater, conversation_id))
        s.commit()


def listing(sessions: sessionmaker[Session], rater: str, *, limit: int = 50,
            offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The rater's conversations, most recently saved first."""
    with sessions() as s:
        where = Conversation.rater == rater
        total = int(s.scalar(select(func.count()).select_from(Conversation).where(where)) or 0)
        rows = s.scalars(select(Conversation).where(where)
                         .order_by(Conversation.updated_at.desc(), Conversation.id).limit(limit).offset(offset))
        return [_summary(c) for c in rows], total
