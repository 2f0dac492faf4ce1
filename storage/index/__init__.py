"""The metadata index: SQLAlchemy models, Alembic migrations, and the repository."""

from storage.index.bounded import BoundedReads
from storage.index.engine import create_index_engine, downgrade, migrate
from storage.index.repository import (
    MAX_FUZZY_WORDS,
    WITHHELD_REASONS,
    AccessScope,
    DateRange,
    IndexRepository,
    InstanceQuery,
    InstanceRecord,
    InstanceSummary,
    Ownership,
    SeriesQuery,
    SeriesSummary,
    StudyQuery,
    StudySummary,
    TimeRange,
    WithheldRecord,
    WithheldSummary,
    fuzzy_name_words,
)

__all__ = [
    "MAX_FUZZY_WORDS",
    "WITHHELD_REASONS",
    "AccessScope",
    "BoundedReads",
    "DateRange",
    "IndexRepository",
    "InstanceQuery",
    "InstanceRecord",
    "InstanceSummary",
    "Ownership",
    "SeriesQuery",
    "SeriesSummary",
    "StudyQuery",
    "StudySummary",
    "TimeRange",
    "WithheldRecord",
    "WithheldSummary",
    "create_index_engine",
    "downgrade",
    "fuzzy_name_words",
    "migrate",
]
