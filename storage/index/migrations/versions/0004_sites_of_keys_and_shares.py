"""API keys and shares limited to several sites

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = ("api_keys", "shares")


def upgrade() -> None:
    # One site id per row becomes a space-separated list (the values carry over as they are).
    # SQLite renames in place (its VARCHAR has no length to widen): a batch rebuild of
    # `shares` would drop the old table and cascade to every share's items and sessions.
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table in TABLES:
        if sqlite:
            op.execute(f"ALTER TABLE {table} RENAME COLUMN site_id TO sites")
        else:
            op.alter_column(
                table,
                "site_id",
                new_column_name="sites",
                existing_type=sa.String(length=64),
                type_=sa.String(length=1024),
                existing_nullable=True,
            )


def downgrade() -> None:
    # One site per row again: a key or share limited to several keeps the first only (a
    # narrower limit, never a wider one).
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table in TABLES:
        # `table` comes from TABLES above, never from input: no injection (bandit B608).
        if sqlite:
            op.execute(
                f"UPDATE {table} SET sites = substr(sites, 1, instr(sites, ' ') - 1) "  # nosec B608
                "WHERE instr(sites, ' ') > 0"
            )
            op.execute(f"ALTER TABLE {table} RENAME COLUMN sites TO site_id")
        else:
            op.execute(
                f"UPDATE {table} SET sites = split_part(sites, ' ', 1) "  # nosec B608
                "WHERE sites LIKE '% %'"
            )
            op.alter_column(
                table,
                "sites",
                new_column_name="site_id",
                existing_type=sa.String(length=1024),
                type_=sa.String(length=64),
                existing_nullable=True,
            )
