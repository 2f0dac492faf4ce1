"""The pseudonym of a study's local patient ID when its patient_id is the INS's

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Studies indexed before keep '': `dicom-gateway reindex` cannot restore it for objects
    # stored before their provenance carried it, a new ingest of the study fills it.
    with op.batch_alter_table("studies") as batch:
        batch.add_column(
            sa.Column("local_patient_id", sa.String(length=64), nullable=False, server_default="")
        )
        batch.create_index("ix_studies_local_patient_id", ["local_patient_id"])


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_local_patient_id")
        batch.drop_column("local_patient_id")
