"""patients, compression, study completion

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("patient_name", sa.String(length=324), nullable=False),
        sa.Column("patient_birth_date", sa.String(length=8), nullable=False),
        sa.Column("patient_sex", sa.String(length=16), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("patient_id", name=op.f("pk_patients")),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "source_transfer_syntax_uid",
                sa.String(length=64),
                nullable=False,
                server_default="",
            )
        )
        batch_op.add_column(
            sa.Column("compression", sa.String(length=32), nullable=False, server_default="")
        )

    # Every existing study's patient becomes a patient row before the foreign key exists.
    op.execute(
        "INSERT INTO patients (patient_id, patient_name, patient_birth_date, patient_sex) "
        "SELECT patient_id, MAX(patient_name), MAX(patient_birth_date), MAX(patient_sex) "
        "FROM studies GROUP BY patient_id"
    )

    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("completed_instance_count", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_studies_patient_id_patients"), "patients", ["patient_id"], ["patient_id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_studies_patient_id_patients"), type_="foreignkey")
        batch_op.drop_column("completed_instance_count")
        batch_op.drop_column("completed_at")

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("compression")
        batch_op.drop_column("source_transfer_syntax_uid")

    op.drop_table("patients")
