"""A share's permissions as a set (space-separated names, e.g. "download") instead of one
boolean column per permission: a new permission needs no schema change

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD/DROP COLUMN on both databases: on SQLite a batch rebuild of `shares` would drop
    # the old table and cascade to every share's items and sessions (see 0004); SQLite 3.35+
    # drops a column in place.
    op.add_column(
        "shares", sa.Column("permissions", sa.String(256), nullable=False, server_default="")
    )
    op.execute(
        sa.text(
            "UPDATE shares SET permissions = 'download' WHERE allow_download = :yes"
        ).bindparams(yes=True)
    )
    op.drop_column("shares", "allow_download")


def downgrade() -> None:
    op.add_column(
        "shares",
        sa.Column("allow_download", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.execute(
        sa.text(
            "UPDATE shares SET allow_download = :yes "
            "WHERE ' ' || permissions || ' ' LIKE '% download %'"
        ).bindparams(yes=True)
    )
    op.drop_column("shares", "permissions")
