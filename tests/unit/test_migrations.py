"""Migrations: upgrade to head, downgrade to base, upgrade again — on SQLite and PostgreSQL — and the
migrated schema matches the models (no drift between models.py and migrations/)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from feedback_support import db_url  # noqa: F401 - fixture
from loop.db.models import Base
from loop.db.session import alembic_config, current_revision, downgrade, make_engine, migrate

TABLES = {"responses", "ratings", "comparisons", "weight_versions", "training_runs", "run_feedback",
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
