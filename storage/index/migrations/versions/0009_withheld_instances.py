"""Withheld instances: what a site kept in quarantine, by de-identified UIDs and a reason
category, so a study's recipients learn that part of it is missing

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "withheld_instances",
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("site_id", sa.String(64), nullable=False),
        sa.Column("withheld_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_withheld_instances")),
    )
    op.create_index(
        op.f("ix_withheld_instances_study_instance_uid"),
        "withheld_instances",
        ["study_instance_uid"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_withheld_instances_study_instance_uid"), table_name="withheld_instances")
    op.drop_table("withheld_instances")
