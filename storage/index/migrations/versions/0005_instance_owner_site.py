"""The site that stored each instance (its owner)

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "instances", sa.Column("site_id", sa.String(length=64), nullable=False, server_default="")
    )
    # Until now only the study knew its site: its instances were stored by that site.
    op.execute(
        "UPDATE instances SET site_id = (SELECT studies.site_id FROM studies "
        "WHERE studies.study_instance_uid = instances.study_instance_uid) "
        "WHERE EXISTS (SELECT 1 FROM studies "
        "WHERE studies.study_instance_uid = instances.study_instance_uid)"
    )


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("site_id")
