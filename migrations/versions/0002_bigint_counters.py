"""64-bit counters: weight versions, run ids and run_feedback ids as BIGINT

The weight version grows by one with every update, restore and rollback, and run ids with every run; 0001 made
them INTEGER, which is 32-bit on PostgreSQL (a version or id past 2**31 - 1 failed to store) while ratings and
comparisons were already BIGINT. SQLite's INTEGER is 64-bit already and an INTEGER PRIMARY KEY must stay INTEGER
to be the rowid, so SQLite needs no change (models.py: `Id`). On PostgreSQL the id columns' sequences (SERIAL,
created `AS integer`) are widened too, or they would stop at 2**31 - 1 themselves.

Downgrade narrows them again; it fails (and changes nothing: one transaction) if a stored value no longer fits.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# (table, column, nullable); referenced keys before the columns that reference them
COLUMNS = [
    ("responses", "weight_version", False),
    ("weight_versions", "version", False),
    ("weight_versions", "parent_version", True),
    ("weight_versions", "run_id", True),
    ("training_runs", "id", False),
    ("training_runs", "version_before", True),
    ("training_runs", "version_after", True),
    ("run_feedback", "id", False),
    ("run_feedback", "run_id", False),
]
SERIAL = [("training_runs", "id"), ("run_feedback", "id")]


def _retype(to_type: sa.types.TypeEngine, from_type: sa.types.TypeEngine, sequence_as: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        return
    columns = COLUMNS if isinstance(to_type, sa.BigInteger) else COLUMNS[::-1]
    for table, column, nullable in columns:
        op.alter_column(table, column, type_=to_type, existing_type=from_type, existing_nullable=nullable)
    if bind.dialect.name == "postgresql":
        for table, column in SERIAL:
            seq = bind.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table, "c": column}).scalar()
            if seq is not None:
                op.execute(f"ALTER SEQUENCE {seq} AS {sequence_as}")


def upgrade() -> None:
    _retype(sa.BigInteger(), sa.Integer(), "bigint")


def downgrade() -> None:
    _retype(sa.Integer(), sa.BigInteger(), "integer")
