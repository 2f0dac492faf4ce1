"""Durable study completion: a study's completion step recorded as pending when an
instance is indexed (`completion_due_at`), with its failed attempts and last error

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


# On SQLite, never the batch mode's table copy: dropping the old `studies` would cascade
# (foreign keys are on) to every series and instance. Columns are added and dropped in
# place (ALTER TABLE ... ADD/DROP COLUMN; SQLite 3.35 and later).


def upgrade() -> None:
    with op.batch_alter_table("studies", recreate="never") as batch_op:
        batch_op.add_column(
            sa.Column("completion_due_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("completion_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("completion_error", sa.String(64), server_default="", nullable=False)
        )
    op.create_index(op.f("ix_studies_completion_due_at"), "studies", ["completion_due_at"])
    # Studies whose completion has not run for their current content are due now.
    op.execute(
        sa.text(
            "UPDATE studies SET completion_due_at = CURRENT_TIMESTAMP "
            "WHERE completed_instance_count IS NULL OR completed_instance_count <> "
            "(SELECT count(*) FROM instances "
            "WHERE instances.study_instance_uid = studies.study_instance_uid)"
        )
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_studies_completion_due_at"), table_name="studies")
    with op.batch_alter_table("studies", recreate="never") as batch_op:
        batch_op.drop_column("completion_error")
        batch_op.drop_column("completion_attempts")
        batch_op.drop_column("completion_due_at")
