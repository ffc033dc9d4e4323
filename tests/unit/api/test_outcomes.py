"""Feedback stores answer outcomes of a kind, not HTTP statuses; the API is the one place that maps kinds to
statuses (loop/api/routes/feedback.py `_reply`), and every kind has its status, error code and headers there.

Run: .venv/bin/python -m pytest -q tests/unit/api/test_outcomes.py (on PostgreSQL too with LOOP_TEST_POSTGRES_URL)
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import get_args

import pytest
from sqlalchemy import event

from tests.unit.feedback_support import add_response, db_url, sessions  # noqa: F401 - fixtures
from loop.api.errors import http_of
from loop.api.routes.feedback import _reply
from loop.errors import LoopError
from loop.feedback import ComparisonInput, Outcome, RatingInput, write_comparison, write_ratings
from loop.feedback.store import OutcomeKind

# The HTTP contract of each kind: status, error type, Retry-After (None: no header).
HTTP_OF_KIND: dict[str, tuple[int, str | None, str | None]] = {
    "created": (201, None, None), "replayed": (200, None, None), "not_found": (404, "not_found_error", None),
    "conflict": (409, "conflict_error", None), "invalid": (422, "invalid_request_error", None),
    "unavailable": (503, "service_unavailable", "1"), "unknown": (500, "server_error", None)}


def as_http(outcome: Outcome) -> tuple[int, str | None, str | None, dict | None]:
    """(status, error type, Retry-After, body) of an outcome, as the route answers it."""
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace()))  # no metrics: nothing counted
    try:
        response = _reply(outcome, request, "rating")  # type: ignore[arg-type]
    except LoopError as exc:
        status, type_, headers = http_of(exc)
        return status, type_, (headers or {}).get("Retry-After"), None
    return response.status_code, None, response.headers.get("retry-after"), json.loads(response.body)


def test_every_kind_has_its_status_and_the_table_names_every_kind() -> None:
    assert set(get_args(OutcomeKind)) == set(HTTP_OF_KIND)  # a new kind must get a status here and in _reply
    for kind, (status, type_, retry_after) in HTTP_OF_KIND.items():
        body = {"id": 1} if kind in ("created", "replayed") else None
        got = as_http(Outcome(kind, body, message=None if body else f"{kind}: what to do", code="c"))  # type: ignore[arg-type]
        assert got == (status, type_, retry_after, body), kind


def test_outcomes_carry_no_http() -> None:
    assert [f for f in Outcome.__dataclass_fields__] == ["kind", "body", "message", "code"]


def test_rating_outcomes_by_kind(sessions) -> None:  # noqa: F811
    rid = add_response(sessions)
    outcomes = write_ratings(sessions, [
        RatingInput(rid, score=5, idempotency_key="k"), RatingInput(rid, score=5, idempotency_key="k"),
        RatingInput(rid, score=6, idempotency_key="k"), RatingInput("resp-nowhere", score=1)])
    assert [(o.kind, o.code) for o in outcomes] == [
        ("created", None), ("replayed", None), ("conflict", "idempotency_key_reused"),
        ("not_found", "response_not_found")]
    assert outcomes[0].body == outcomes[1].body and outcomes[0].body["score"] == 5
    assert "resp-nowhere" in (outcomes[3].message or "")
    (again,) = write_ratings(sessions, [RatingInput(rid, score=5, idempotency_key="k")])
    assert again.kind == "replayed" and again.body["id"] == outcomes[0].body["id"]


def test_comparison_outcomes_by_kind(sessions) -> None:  # noqa: F811
    a, b = add_response(sessions), add_response(sessions)
    other = add_response(sessions, prompt="Another question?")
    first = write_comparison(sessions, ComparisonInput(a, b, "a", idempotency_key="c"))
    assert first.kind == "created" and first.body["winner"] == "a"
    assert write_comparison(sessions, ComparisonInput(a, b, "a", idempotency_key="c")).kind == "replayed"
    reused = write_comparison(sessions, ComparisonInput(a, b, "b", idempotency_key="c"))
    assert (reused.kind, reused.code) == ("conflict", "idempotency_key_reused")
    missing = write_comparison(sessions, ComparisonInput(a, "resp-nowhere", "tie"))
    assert (missing.kind, missing.code) == ("not_found", "response_not_found")
    different = write_comparison(sessions, ComparisonInput(a, other, "tie"))
    assert (different.kind, different.code) == ("invalid", "different_prompts")


@pytest.mark.parametrize("write", ["rating", "comparison"])
def test_a_commit_that_fails_is_unavailable_with_nothing_stored(sessions, write: str) -> None:  # noqa: F811
    a, b = add_response(sessions), add_response(sessions)

    def refuse(_conn) -> None:  # noqa: ANN001 - SQLAlchemy Connection
        raise OSError(28, "No space left on device (injected)")

    event.listen(sessions.kw["bind"], "commit", refuse)
    try:
        if write == "rating":
            (outcome,) = write_ratings(sessions, [RatingInput(a, score=2)])
        else:
            outcome = write_comparison(sessions, ComparisonInput(a, b, "tie"))
    finally:
        event.remove(sessions.kw["bind"], "commit", refuse)
    assert (outcome.kind, outcome.code, outcome.body) == ("unavailable", "storage_unavailable", None)
    assert f"the {write} was not stored" in (outcome.message or "")
    assert as_http(outcome)[:3] == (503, "service_unavailable", "1")
