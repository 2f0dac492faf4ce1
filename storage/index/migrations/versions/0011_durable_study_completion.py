"""Durable study completion: a study's completion step recorded as pending when an
instance is indexed (`completion_due_at`), with its failed attempts and last error

Revision ID: 0011
Revises: 0010
"""

import datetime as dt

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
    # Studies whose completion has not run for their current content are due now. The time
    # is bound through the column's type, as the application writes it: on SQLite a
    # CURRENT_TIMESTAMP ("... 13:10:39") would never equal what is read back and compared
    # ("... 13:10:39.000000"), and such a study would never stop being due.
    studies = sa.table(
        "studies",
        sa.column("study_instance_uid", sa.String),
        sa.column("completed_instance_count", sa.Integer),
        sa.column("completion_due_at", sa.DateTime(timezone=True)),
    )
    instances = sa.table("instances", sa.column("study_instance_uid", sa.String))
    count = (
        sa.select(sa.func.count())
        .where(instances.c.study_instance_uid == studies.c.study_instance_uid)
        .scalar_subquery()
    )
    op.execute(
        studies.update()
        .where(
            sa.or_(
                studies.c.completed_instance_count.is_(None),
                studies.c.completed_instance_count != count,
            )
        )
        .values(completion_due_at=dt.datetime.now(dt.UTC))
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_studies_completion_due_at"), table_name="studies")
    with op.batch_alter_table("studies", recreate="never") as batch_op:
        batch_op.drop_column("completion_error")
        batch_op.drop_column("completion_attempts")
        batch_op.drop_column("completion_due_at")
