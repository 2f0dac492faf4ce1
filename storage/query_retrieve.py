"""The Query/Retrieve service: the standard's verbs over the index, for every protocol.

DICOMweb (QIDO-RS, WADO-RS: PS3.18) and the DIMSE node (C-FIND, C-MOVE, C-GET: PS3.4
Annex C) only translate their requests into queries and call these verbs. Each verb takes
the requester's `AccessScope` — never optional: `AccessScope()` is stated for a caller who
may see every site — and the index applies it in SQL, so limits, counts and paging stay
right. Matching and the site policy are written here once; the audit vocabulary both
protocols write is in `storage.audit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from storage.index.repository import (
    AccessScope,
    IndexRepository,
    InstanceQuery,
    InstanceSummary,
    SeriesQuery,
    SeriesSummary,
    StudyQuery,
    StudySummary,
)

#: Unrestricted: a credential that may see every site's studies (the admin token, a key
#: without sites). Stated, never implied by a missing scope.
EVERY_SITE = AccessScope()


@dataclass(frozen=True)
class QueryRetrieve:
    """Search and retrieve within a requester's scope (outside it a study is as if absent)."""

    index: IndexRepository

    def search_for_studies(self, scope: AccessScope, query: StudyQuery) -> list[StudySummary]:
        return self.index.search_studies(dataclasses.replace(query, scope=scope))

    def search_for_series(self, scope: AccessScope, query: SeriesQuery) -> list[SeriesSummary]:
        return self.index.search_series(dataclasses.replace(query, scope=scope))

    def search_for_instances(
        self, scope: AccessScope, query: InstanceQuery
    ) -> list[InstanceSummary]:
        return self.index.search_instances(dataclasses.replace(query, scope=scope))

    def retrieve_instances(
        self,
        scope: AccessScope,
        study_instance_uids: Sequence[str],
        series_instance_uid: str | None = None,
        sop_instance_uids: Sequence[str] = (),
        *,
        limit: int,
    ) -> list[InstanceSummary]:
        """The instances a retrieval names by its unique keys (studies, optionally one
        series of them, optionally some instances), those of the scope only, at most
        `limit` per study."""
        found: list[InstanceSummary] = []
        for study in study_instance_uids:
            if not scope.allows(study, series_instance_uid):
                continue  # a share's other studies or series: not even asked
            found += self.search_for_instances(
                scope,
                InstanceQuery(
                    study_instance_uid=study,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uids=tuple(sop_instance_uids),
                    limit=limit,
                ),
            )
        return found


__all__ = ["EVERY_SITE", "QueryRetrieve"]
