"""A share's sealed context: the producing site's clinical context, encrypted at the site
under a key that travels only in the link's fragment (the index never holds the key)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('shares') as batch:
        batch.add_column(sa.Column('sealed_context', sa.Text(), nullable=False,
                                   server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('shares') as batch:
        batch.drop_column('sealed_context')
