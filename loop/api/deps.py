"""Shared FastAPI dependencies: the state, a database session per request, the admin check."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from loop.api.errors import ApiError
from loop.state import LoopState


def get_state(request: Request) -> LoopState:
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
