"""The metadata index: SQLAlchemy models, Alembic migrations, and the repository."""

from storage.index.engine import create_index_engine, downgrade, migrate
from storage.index.repository import (
    DateRange,
    IndexRepository,
    InstanceQuery,
    InstanceRecord,
    InstanceSummary,
    SeriesQuery,
    SeriesSummary,
    StudyQuery,
    StudySummary,
)

__all__ = [
    "DateRange",
    "IndexRepository",
    "InstanceQuery",
    "InstanceRecord",
    "InstanceSummary",
    "SeriesQuery",
    "SeriesSummary",
    "StudyQuery",
    "StudySummary",
    "create_index_engine",
    "downgrade",
    "migrate",
]
