"""Shared route dependencies: the composition root, a database session per request, the caller (who sent a
request, by token: loop/raters.py) with the admin check and the name a rating is attributed to, and the
supervised parts a route needs (the trainer, the scheduler), each answering 503 with its reason when that part is
not running in this loop. A route with nothing to validate declares the part (`trainer: TrainerDep`); a route
with a body or parameters calls `trainer_of(state)` / `scheduler_of(state)` in its body instead, because FastAPI
resolves dependencies before it validates, and a bad request must get its 422 whether or not the part runs.

Tests: tests/unit/api/test_runs_api.py, tests/unit/api/test_security.py, tests/unit/api/test_accounts_api.py and
every route test.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a rater account, an admin account, or the admin token (name "admin")."""

    name: str
    role: str


def bearer(authorization: str | None, x_loop_admin_token: str | None = None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return x_loop_admin_token or None


def caller_of(state: LoopState, token: str | None) -> Caller | None:
    """The caller a token names; None without a token; 401 `token_wrong` for an unknown or revoked one."""
    if token is None:
        return None
    if hmac.compare_digest(token.encode(), state.admin_token.encode()):
        return Caller("admin", "admin")
    account = state.accounts.by_token(token)
    if account is None:
        raise ApiError("this token is neither a rater's nor the admin token (unknown, or its account was revoked): "
                        "ask an admin for one (`loop raters add NAME`)", status_code=401, code="token_wrong",
                        headers={"WWW-Authenticate": "Bearer"})
    return Caller(account.name, account.role)


def request_caller(request: Request) -> Caller | None:
    """The request's caller (read once per request: the gate or the route that asks first keeps it)."""
    if "loop_caller" not in request.scope:
        request.scope["loop_caller"] = caller_of(request.app.state.loop, bearer(
            request.headers.get("authorization"), request.headers.get("x-loop-admin-token")))
    return request.scope["loop_caller"]


async def require_caller(request: Request) -> None:
    """With tokens required (`rater_auth`), every /api and /v1 route needs a rater's or the admin token (async: no
    thread hop on the proxy's path; the accounts are read from the database at most every few seconds)."""
    _need_caller(request)


def _need_caller(request: Request) -> None:
    if request_caller(request) is None:
        raise ApiError("this loop requires a token: send 'Authorization: Bearer <token>' with your rater token "
                        "(an admin makes one with `loop raters add NAME`) or the admin token",
                        status_code=401, code="token_missing", headers={"WWW-Authenticate": "Bearer"})


def rater_for(request: Request, claimed: str | None) -> str:
    """The name a rating or comparison is attributed to: the signed-in caller's (a rater's body naming someone else
    is refused; an admin may name a rater who has no account), else, where tokens are not required, the name the
    body gives (default "anonymous") unless it is an account's, which only its token may use."""
    caller = request_caller(request)
    state: LoopState = request.app.state.loop
    if caller is not None:
        if claimed is None or claimed == caller.name:
            return caller.name
        if caller.role == "admin" and not state.accounts.is_account(claimed):
            return claimed  # an operator filing feedback for a named rater without an account (imports, benches)
        raise ApiError(f"this token belongs to {caller.name!r} but the body names the rater {claimed!r}: leave "
                        "`rater` out (the token says who rates)" if caller.role != "admin" else
                        f"{claimed!r} is an account's name: only its own token rates as it", status_code=403,
                        code="rater_mismatch" if caller.role != "admin" else "rater_is_account", param="rater")
    if state.settings.tokens_required:
        _need_caller(request)
    name = claimed or "anonymous"
    if state.accounts.is_account(name) or name == "admin":
        raise ApiError(f"{name!r} is an account's name: sign in with its token ('Authorization: Bearer <token>') "
                        "to rate as it", status_code=403, code="rater_is_account", param="rater")
    return name


def require_admin(state: StateDep, authorization: Annotated[str | None, Header()] = None,
                  x_loop_admin_token: Annotated[str | None, Header()] = None) -> None:
    """Admin routes take `Authorization: Bearer <token>` (or `X-Loop-Admin-Token`): the admin token, or the token
    of an account with the role admin."""
    given = bearer(authorization, x_loop_admin_token)
    if not given:
        raise ApiError("this route needs the admin token: send 'Authorization: Bearer <token>' "
                        "(the token is LOOP_ADMIN_TOKEN, or the file admin_token in the data dir, or an admin "
                        "account's token)", status_code=401, code="admin_token_missing",
                        headers={"WWW-Authenticate": "Bearer"})
    if hmac.compare_digest(given.encode(), state.admin_token.encode()):
        return
    account = state.accounts.by_token(given)
    if account is None or account.role != "admin":
        raise ApiError("the admin token is wrong" if account is None else
                        f"{account.name!r} is a rater; this route needs the admin token or an admin account",
                        status_code=403, code="admin_token_wrong")


AdminDep = Depends(require_admin)


def trainer_of(state: LoopState) -> Trainer:
    lock = getattr(state, "trainer_lock", None)
    if state.trainer is None and lock is not None and not lock.held:
        raise Unavailable(f"another loop process trains on this database ({state.trainer_holder or 'holder unknown'});"
                          " this one serves chat and ratings and takes training over if that process goes",
                          code="trainer_elsewhere")
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
