"""Conversations over HTTP: the caller's chats (loop/feedback/conversations.py), listed for the UI's sidebar,
reopened, continued and saved.

The caller is whoever rates (loop/api/deps.py `rater_for`): the signed-in rater, else, where the loop does not
require tokens, the `rater` query parameter (default `anonymous`). `GET /api/conversations` lists the caller's,
newest first; `POST` makes one; `GET/PUT/DELETE /api/conversations/{id}` read, replace (with `expected_revision`: a
save from a stale tab answers 409 `stale_conversation`) and delete one.

Tests: tests/unit/feedback/test_conversations.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loop.api.deps import rater_for
from loop.api.schemas import MAX_ID, no_nul
from loop.errors import Unavailable
from loop.feedback import conversations
from loop.feedback.writer import RESPONSE_WAIT_S

router = APIRouter(prefix="/api", tags=["conversations"])

MAX_TURNS = 2000
MAX_SIBLINGS = 50
MAX_TEXT = 200_000


class Sibling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=40)
    content: str = Field("", max_length=MAX_TEXT)
    weight_version: int | None = Field(None, ge=0, le=MAX_ID)


class Turn(BaseModel):
    """A user message (`content`), or an assistant turn: its siblings and which one is shown."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | None = Field(None, max_length=MAX_TEXT)
    siblings: list[Sibling] = Field(default_factory=list, max_length=MAX_SIBLINGS)
    shown: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _shape(self) -> "Turn":
        if self.role == "user" and (self.content is None or self.siblings):
            raise ValueError("a user turn has `content` and no `siblings`")
        if self.role == "assistant":
            if not self.siblings:
                raise ValueError("an assistant turn needs at least one sibling (a logged response id)")
            if self.shown >= len(self.siblings):
                raise ValueError(f"`shown` is {self.shown} but the turn has {len(self.siblings)} siblings")
        return self


class ConversationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, min_length=1, max_length=200, description="Default: the first user message.")
    turns: list[Turn] = Field(default_factory=list, max_length=MAX_TURNS)
    expected_revision: int | None = Field(None, ge=1, le=MAX_ID, description=(
        "The revision the screen loaded; a save made since elsewhere makes this one answer 409 `stale_conversation`."))

    @field_validator("title")
    @classmethod
    def _title(cls, value: str | None) -> str | None:
        return no_nul(value)

    def response_ids(self) -> tuple[str, ...]:
        return tuple({s.response_id for t in self.turns for s in t.siblings})

    def plain_turns(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True, exclude={"siblings", "shown"} if t.role == "user" else set())
                for t in self.turns]


async def _settled(request: Request, body: ConversationIn) -> None:
    """Answers served a moment ago may still wait for their commit (loop.feedback.responses): wait for them, as
    ratings do, so a conversation saved right after its answer streamed does not call that answer unknown."""
    if not await request.app.state.loop.response_writer.settled(body.response_ids(), RESPONSE_WAIT_S):
        raise Unavailable("a response this conversation names was served but its row is not committed yet (the "
                          "database is refusing writes); retry", code="storage_unavailable", retry_after_s=1)


Rater = Annotated[str | None, Query(min_length=1, max_length=200, description=(
    "Whose conversations, where the loop does not require tokens and the caller is not signed in."))]


@router.get("/conversations", summary="the caller's conversations, most recently saved first")
async def list_conversations(request: Request, rater: Rater = None, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                             offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> dict[str, Any]:
    who = rater_for(request, rater)
    items, total = await run_in_threadpool(conversations.listing, request.app.state.loop.sessions, who,
                                           limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@router.post("/conversations", status_code=201, summary="a new conversation")
async def create_conversation(body: ConversationIn, request: Request, rater: Rater = None) -> dict[str, Any]:
    who = rater_for(request, rater)
    await _settled(request, body)
    return await run_in_threadpool(conversations.create, request.app.state.loop.sessions, who, body.plain_turns(),
                                   body.title)


@router.get("/conversations/{conversation_id}", summary="one of the caller's conversations, with its turns")
async def get_conversation(conversation_id: str, request: Request, rater: Rater = None) -> dict[str, Any]:
    who = rater_for(request, rater)
    return await run_in_threadpool(conversations.get, request.app.state.loop.sessions, who, conversation_id)


@router.put("/conversations/{conversation_id}", summary="save the conversation's turns (and title)")
async def save_conversation(conversation_id: str, body: ConversationIn, request: Request,
                            rater: Rater = None) -> dict[str, Any]:
    who = rater_for(request, rater)
    await _settled(request, body)
    return await run_in_threadpool(lambda: conversations.save(
        request.app.state.loop.sessions, who, conversation_id, body.plain_turns(), title=body.title,
        expected_revision=body.expected_revision))


@router.delete("/conversations/{conversation_id}", status_code=204, summary="delete one of the caller's conversations")
async def delete_conversation(conversation_id: str, request: Request, rater: Rater = None) -> None:
    who = rater_for(request, rater)
    await run_in_threadpool(conversations.delete, request.app.state.loop.sessions, who, conversation_id)
