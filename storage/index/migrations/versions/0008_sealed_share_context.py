"""A share's sealed context: the producing site's clinical context, encrypted at the site
under a key that travels only in the link's fragment (the index never holds the key)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: on SQLite, a batch rebuild of `shares` would drop
    # the old table and cascade to every share's items and sessions (see 0004).
    op.add_column(
        "shares", sa.Column("sealed_context", sa.Text(), nullable=False, server_default="")
    )


def downgrade() -> None:
    # SQLite 3.35+ drops a column in place (no rebuild, no cascade).
    op.drop_column("shares", "sealed_context")
