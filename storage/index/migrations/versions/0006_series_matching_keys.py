"""The series' QIDO-RS required matching keys (PS3.18 Table 10.6.1-5)

Performed Procedure Step Start Date and Time, and the Scheduled Procedure Step ID and
Requested Procedure ID of the Request Attributes Sequence items.

Series indexed before this revision have these columns empty: the index alone does not
hold them, only the stored objects do. `dicom-gateway reindex` (worker/reindex.py)
rebuilds the index from the stored objects and fills them; until then such a series does
not match a non-empty value of these keys (universal matching still finds it).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("performed_procedure_step_start_date", 8),
    ("performed_procedure_step_start_time", 16),
    ("scheduled_procedure_step_ids", 256),
    ("requested_procedure_ids", 256),
)


def upgrade() -> None:
    for name, length in _COLUMNS:
        op.add_column(
            "series", sa.Column(name, sa.String(length=length), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        for name, _length in reversed(_COLUMNS):
            batch.drop_column(name)
