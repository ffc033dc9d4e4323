"""conversations: each rater's chats as the UI shows them, to list, reopen and continue

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

from loop.db.models import Id, NulSafeText


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'conversations',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('rater', sa.String(length=200), nullable=False),
        sa.Column('title', NulSafeText(), nullable=False),
        sa.Column('turns', sa.JSON(), nullable=False),
        sa.Column('revision', Id, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_conversations_rater_updated', 'conversations', ['rater', 'updated_at'])


def downgrade() -> None:
    op.drop_index('ix_conversations_rater_updated', table_name='conversations')
    op.drop_table('conversations')
