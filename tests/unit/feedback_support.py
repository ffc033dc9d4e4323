"""Fixtures for the feedback tests: a real database (SQLite file, or PostgreSQL), the feedback routes over real
ASGI HTTP (httpx), and a helper to seed `responses` rows as the proxy would.

`db_url` is parametrised over both backends. The PostgreSQL leg reads LOOP_TEST_POSTGRES_URL (`.ci/postgres.sh`
prints one); each test gets its own schema, dropped afterwards. Without the variable the leg fails in CI
(CI=true) and is skipped on a developer machine, so CI can never silently stop testing PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from loop.api.errors import install_error_handlers
from loop.state import LoopState
from loop.config import Settings
from loop.db.models import Response
from loop.db.session import make_engine, make_sessionmaker, migrate
from loop.metrics import Metrics

ADMIN = "t" * 32


def postgres_base_url() -> str:
    url = os.environ.get("LOOP_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("LOOP_TEST_POSTGRES_URL is not set: CI must test PostgreSQL "
                        "(export LOOP_TEST_POSTGRES_URL=\"$(.ci/postgres.sh)\")")
        pytest.skip("LOOP_TEST_POSTGRES_URL is not set (run .ci/postgres.sh to get one)")
    return url


def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections live in a fresh schema (search_path), dropped when the test ends."""
    base = postgres_base_url()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'loop.db'}"
    else:
        yield from postgres_schema_url()


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    migrate(db_url)
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def feedback_app(settings: Settings, sessions: sessionmaker[Session]) -> FastAPI:
    """The feedback routers on a bare app (no vLLM, no proxy): what these tests are about, nothing else."""
    from loop.api.routes import export, feedback, history, stats

    app = FastAPI()
    install_error_handlers(app)
    for router in (feedback.router, history.router, export.router, stats.router):
        app.include_router(router)
    app.state.metrics = Metrics()
    app.state.loop = LoopState(settings=settings, engine=sessions.kw["bind"], sessions=sessions,
                               admin_token=ADMIN, vllm=None)  # type: ignore[arg-type]
    return app


@pytest.fixture
def app(sessions: sessionmaker[Session], db_url: str, tmp_path: Path) -> FastAPI:
    return feedback_app(Settings(data_dir=tmp_path, database_url=db_url), sessions)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loop") as c:
        yield c


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def add_response(sessions: sessionmaker[Session], *, prompt: str = "What is 2+2?", completion: str = "4",
                 model: str = "SmolLM2-135M-Instruct", weight_version: int = 0, created_at: datetime | None = None,
                 endpoint: str = "chat", rid: str | None = None) -> str:
    """Insert one response row as the proxy stores it; returns its id."""
    rid = rid or f"resp-{uuid.uuid4().hex}"
    messages = [{"role": "user", "content": prompt}] if endpoint == "chat" else None
    with sessions() as s, s.begin():
        s.add(Response(id=rid, group_id=f"grp-{uuid.uuid4().hex}", choice_index=0,
                       created_at=created_at or datetime.now(timezone.utc), endpoint=endpoint, model=model,
                       weight_version=weight_version, request={"messages": messages} if messages else {"prompt": prompt},
                       messages=messages, prompt_text=None if messages else prompt,
                       prompt_hash=prompt_hash(messages or [{"raw": prompt}]), completion=completion,
                       prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5], completion_logprobs=[-0.1, -0.2],
                       finish_reason="stop", prompt_tokens=3, completion_tokens=2, latency_ms=12.5))
    return rid
