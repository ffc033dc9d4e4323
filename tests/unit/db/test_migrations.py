"""Migrations: upgrade to head, downgrade to base, upgrade again — on SQLite and PostgreSQL — and the
migrated schema matches the models (no drift between models.py and migrations/)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from tests.unit.feedback_support import db_url, postgres_schema_url  # noqa: F401 - fixture
from loop.db.models import Base
from loop.db.session import alembic_config, current_revision, downgrade, make_engine, migrate

TABLES = {"responses", "ratings", "comparisons", "weight_versions", "training_runs", "run_feedback", "raters",
          "conversations",
          "scheduler_state"}


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_up_down_up(db_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
    migrate(db_url)
    assert current_revision(db_url) == head
    assert TABLES <= tables(db_url)
    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    assert tables(db_url) == set()
    migrate(db_url)
    assert current_revision(db_url) == head and TABLES <= tables(db_url)


def test_every_step_down_and_up(db_url: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(db_url))
    revisions = [r.revision for r in script.walk_revisions("base", "heads")][::-1]  # oldest first
    for rev in revisions:
        migrate(db_url, rev)
        assert current_revision(db_url) == rev
    for rev in reversed(revisions):
        downgrade(db_url, "-1")
    assert current_revision(db_url) is None


def test_schema_matches_models(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models.py and migrations/ disagree: {diff}"


# --- 0002: 64-bit counters ---------------------------------------------------------------------------------------
BIG = 2**40  # past 32 bits, well inside 64


def _column_types(url: str) -> dict[str, str]:
    engine = make_engine(url)
    try:
        insp = inspect(engine)
        return {f"{t}.{c['name']}": str(c["type"]) for t in ("responses", "weight_versions", "training_runs",
                                                                "run_feedback") for c in insp.get_columns(t)}
    finally:
        engine.dispose()


def _seed(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO weight_versions (version, created_at, kind, status) "
                              "VALUES (3, CURRENT_TIMESTAMP, 'train', 'live')"))
            conn.execute(text("INSERT INTO training_runs (created_at, status, \"trigger\", objective, batch, metrics, "
                              "history, version_before, version_after) VALUES (CURRENT_TIMESTAMP, 'succeeded', "
                              "'manual', 'dpo', '{}', '{}', '[]', 2, 3)"))
    finally:
        engine.dispose()


def test_counters_become_64_bit_and_keep_their_rows(db_url: str) -> None:
    migrate(db_url, "0001")
    _seed(db_url)
    migrate(db_url, "0002")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT version_before, version_after FROM training_runs")).one() == (2, 3)
            conn.execute(text("INSERT INTO weight_versions (version, created_at, kind, parent_version, run_id, "
                              "status) VALUES (:v, CURRENT_TIMESTAMP, 'train', :v, :v, 'live')"), {"v": BIG})
            if engine.dialect.name == "postgresql":  # the id sequence goes past 2**31 - 1 too
                conn.execute(text("SELECT setval(pg_get_serial_sequence('training_runs', 'id'), :v)"), {"v": BIG})
            new_id = conn.execute(text(
                "INSERT INTO training_runs (created_at, status, \"trigger\", objective, batch, metrics, history, "
                "version_before) VALUES (CURRENT_TIMESTAMP, 'queued', 'manual', 'dpo', '{}', '{}', '[]', :v) "
                "RETURNING id"), {"v": BIG}).scalar()
            conn.execute(text("INSERT INTO run_feedback (run_id) VALUES (:r)"), {"r": new_id})
        with engine.connect() as conn:
            assert conn.execute(text("SELECT max(version) FROM weight_versions")).scalar() == BIG
            assert conn.execute(text("SELECT max(run_id) FROM run_feedback")).scalar() == new_id
        if engine.dialect.name == "postgresql":
            assert new_id == BIG + 1
            types = _column_types(db_url)
            for col in ("responses.weight_version", "weight_versions.version", "weight_versions.parent_version",
                        "weight_versions.run_id", "training_runs.id", "training_runs.version_before",
                        "training_runs.version_after", "run_feedback.id", "run_feedback.run_id"):
                assert types[col] == "BIGINT", (col, types[col])
    finally:
        engine.dispose()


def test_downgrade_from_0002_narrows_back_and_keeps_rows_that_fit(db_url: str) -> None:
    migrate(db_url, "0002")
    _seed(db_url)
    downgrade(db_url, "0001")
    assert current_revision(db_url) == "0001"
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_before, version_after FROM training_runs")).one() == (2, 3)
            assert conn.execute(text("SELECT version FROM weight_versions")).scalar() == 3
    finally:
        engine.dispose()
    if db_url.startswith("postgresql"):
        assert _column_types(db_url)["weight_versions.version"] == "INTEGER"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from postgres_schema_url()


@pytest.mark.postgres  # SQLite's INTEGER is 64-bit before and after: nothing narrows there
def test_downgrade_refuses_a_version_that_no_longer_fits_32_bits(postgres_url: str) -> None:
    migrate(postgres_url, "0002")
    engine = make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO weight_versions (version, created_at, kind, status) "
                              "VALUES (:v, CURRENT_TIMESTAMP, 'train', 'live')"), {"v": BIG})
    finally:
        engine.dispose()
    with pytest.raises(Exception, match="out of range"):
        downgrade(postgres_url, "0001")
    assert current_revision(postgres_url) == "0002"  # one transaction: nothing half-done


# --- 0004: the last version a response was generated with ------------------------------------------------------
def test_responses_stored_before_0004_spanned_one_version(db_url: str) -> None:
    migrate(db_url, "0003")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO responses (id, group_id, choice_index, created_at, endpoint, model, weight_version, "
                "request, prompt_hash, completion, prompt_tokens, completion_tokens, latency_ms, stream, truncated) "
                "VALUES ('resp-old', 'grp-old', 0, CURRENT_TIMESTAMP, 'chat', 'm', :v, '{}', 'h', 'hi', 1, 1, 1.0, "
                "false, false)"), {"v": BIG})
        migrate(db_url, "0004")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT weight_version, weight_version_last FROM responses")).one() == (BIG, BIG)
        with pytest.raises(Exception, match="(?i)null|constraint"):  # every row names its last version
            with engine.begin() as conn:
                conn.execute(text("UPDATE responses SET weight_version_last = NULL"))
        downgrade(db_url, "0003")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, weight_version FROM responses")).one() == ("resp-old", BIG)
    finally:
        engine.dispose()
