"""responses.weight_version_last: the last weight version a response was generated with

A response that spans an update (the pause keeps in-flight answers and continues them on the new weights) was
generated with two or more versions; `weight_version` stays the first, this column is the last. Rows written
before it existed spanned nothing: their last version is their first.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

from loop.db.models import Id


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('responses', sa.Column('weight_version_last', Id, nullable=True))
    op.execute('UPDATE responses SET weight_version_last = weight_version')
    with op.batch_alter_table('responses') as batch:
        batch.alter_column('weight_version_last', existing_type=Id, nullable=False)
    op.create_index('ix_responses_weight_version_last', 'responses', ['weight_version_last'])


def downgrade() -> None:
    op.drop_index('ix_responses_weight_version_last', table_name='responses')
    with op.batch_alter_table('responses') as batch:
        batch.drop_column('weight_version_last')
