"""Rater accounts over HTTP: who am I (`GET /api/me`), and, for admins, list, add, revoke and re-issue a token
(`/api/raters...`). The same operations as `loop raters ...` (loop/cli/raters.py); the domain is loop/raters.py.

A token appears once, in the reply that made it; loop keeps only its hash.

Tests: tests/unit/api/test_accounts_api.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from loop import raters
from loop.api.deps import AdminDep, StateDep, request_caller

router = APIRouter(prefix="/api", tags=["raters"])


class NewRater(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="What this rater's ratings are attributed to.")
    role: raters.Role = Field("rater", description="`admin` may also train, check out and roll back versions.")


@router.get("/me", summary="who this request's token names, and whether this loop requires tokens")
async def me(request: Request, state: StateDep) -> dict[str, Any]:
    caller = request_caller(request)
    return {"rater": caller.name if caller else None, "role": caller.role if caller else None,
            "tokens_required": state.settings.tokens_required}


@router.get("/raters", dependencies=[AdminDep], summary="every account, revoked ones too")
async def list_raters(state: StateDep) -> dict[str, Any]:
    accounts = await run_in_threadpool(raters.listing, state.sessions)
    return {"raters": [a.to_json() for a in accounts]}


@router.post("/raters", status_code=201, dependencies=[AdminDep],
             summary="a new account; its token is in this reply only")
async def add_rater(body: NewRater, state: StateDep) -> dict[str, Any]:
    account, token = await run_in_threadpool(raters.add, state.sessions, body.name, body.role)
    state.accounts.forget()
    return {**account.to_json(), "token": token}


@router.post("/raters/{name}/revoke", dependencies=[AdminDep], summary="the account's token stops working")
async def revoke_rater(name: str, state: StateDep) -> dict[str, Any]:
    account = await run_in_threadpool(raters.revoke, state.sessions, name)
    state.accounts.forget()
    return account.to_json()


@router.post("/raters/{name}/token", dependencies=[AdminDep],
             summary="a new token for an active account (the old one stops working)")
async def new_token(name: str, state: StateDep) -> dict[str, Any]:
    account, token = await run_in_threadpool(raters.new_token_for, state.sessions, name)
    state.accounts.forget()
    return {**account.to_json(), "token": token}
