"""Shared route dependencies: the composition root, a database session per request, the admin check, and the
supervised parts a route needs (the trainer, the scheduler), each answering 503 with its reason when that part is
not running in this loop. A route with nothing to validate declares the part (`trainer: TrainerDep`); a route
with a body or parameters calls `trainer_of(state)` / `scheduler_of(state)` in its body instead, because FastAPI
resolves dependencies before it validates, and a bad request must get its 422 whether or not the part runs.

Tests: tests/unit/api/test_runs_api.py, tests/unit/api/test_security.py and every route test.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from loop.api.errors import ApiError
from loop.errors import Unavailable
from loop.scheduler.scheduler import Scheduler
from loop.state import LoopState
from loop.training import Trainer


async def get_state(request: Request) -> LoopState:  # async: no thread hop to read an attribute
    return request.app.state.loop


StateDep = Annotated[LoopState, Depends(get_state)]


def get_db(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def require_admin(state: StateDep, authorization: Annotated[str | None, Header()] = None,
                  x_loop_admin_token: Annotated[str | None, Header()] = None) -> None:
    """Admin routes take `Authorization: Bearer <token>` (or `X-Loop-Admin-Token`)."""
    given = x_loop_admin_token
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if not given:
        raise ApiError("this route needs the admin token: send 'Authorization: Bearer <token>' "
                        "(the token is LOOP_ADMIN_TOKEN, or the file admin_token in the data dir)",
                        status_code=401, code="admin_token_missing", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), state.admin_token.encode()):
        raise ApiError("the admin token is wrong", status_code=403, code="admin_token_wrong")


AdminDep = Depends(require_admin)


def trainer_of(state: LoopState) -> Trainer:
    if state.trainer is None:
        raise Unavailable("training is not running in this loop (started with the worker disabled, or without "
                          "`loop serve` managing vLLM)", code="training_disabled")
    return state.trainer


def scheduler_of(state: LoopState) -> Scheduler:
    if state.scheduler is None:
        raise Unavailable("the scheduler is not running in this loop (start it with `loop serve`)",
                          code="scheduler_unavailable")
    return state.scheduler


async def get_trainer(state: StateDep) -> Trainer:
    return trainer_of(state)


async def get_scheduler(state: StateDep) -> Scheduler:
    return scheduler_of(state)


TrainerDep = Annotated[Trainer, Depends(get_trainer)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
