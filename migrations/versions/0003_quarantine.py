"""quarantine: feedback a scheduled run's screen held back, until an operator re-queues or drops it

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

from loop.db.models import Id, NulSafeText


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'quarantine',
        sa.Column('id', Id, nullable=False, autoincrement=True),
        sa.Column('run_id', Id, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('scope', NulSafeText(), nullable=False),
        sa.Column('reason', NulSafeText(), nullable=False),
        sa.Column('evidence', sa.JSON(), nullable=False),
        sa.Column('rating_ids', sa.JSON(), nullable=False),
        sa.Column('comparison_ids', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('decided_by', NulSafeText(), nullable=True),
        sa.Column('note', NulSafeText(), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['training_runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_quarantine_run_id', 'quarantine', ['run_id'])
    op.create_index('ix_quarantine_created_at', 'quarantine', ['created_at'])
    op.create_index('ix_quarantine_state', 'quarantine', ['state'])


def downgrade() -> None:
    op.drop_index('ix_quarantine_state', table_name='quarantine')
    op.drop_index('ix_quarantine_created_at', table_name='quarantine')
    op.drop_index('ix_quarantine_run_id', table_name='quarantine')
    op.drop_table('quarantine')
