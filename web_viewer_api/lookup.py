"""Lookup by original identifiers, computed at the producing site.

A RIS knows a study by its accession number (and the patient by a local ID or the INS);
the region knows only pseudonyms. The site's API (or `dicom-gateway lookup`), which holds
the pseudonymization secret, recomputes the keyed pseudonyms and searches the index with
them: only pseudonyms reach the index, and nothing identifying is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storage import AccessScope, IndexRepository, QueryRetrieve, StudyQuery, StudySummary

#: (accession, patient ID, accession issuer, patient ID issuer, site) -> their pseudonyms.
PseudonymLookup = Callable[[str | None, str | None, str, str, str], tuple[str | None, str | None]]

#: Studies one lookup answers at most (per pseudonym searched).
_LIMIT = 1000

#: What a regional API answers where a lookup by original identifiers is asked of it.
COMPUTED_AT_THE_SITE = (
    "lookups by original identifiers are computed at the producing site, which holds the "
    "pseudonymization secret: POST /api/site/lookup on the site's API (identifiers in the "
    "body), or `dicom-gateway lookup` at the site; only pseudonyms reach the regional API"
)


@dataclass(frozen=True)
class OriginalIdentifiers:
    """What the RIS knows (never stored, never logged)."""

    accession_number: str | None = None
    issuer_of_accession_number: str = ""
    patient_id: str | None = None
    issuer_of_patient_id: str = ""


@dataclass(frozen=True)
class SitePseudonyms:
    """The pseudonyms the identifiers take at one site (the accession pseudonym is keyed by
    the producing site; a patient known by the INS has one pseudonym everywhere)."""

    site_id: str
    accession_number: str | None
    patient_id: str | None


@dataclass(frozen=True)
class LookupAnswer:
    pseudonyms: list[SitePseudonyms]
    studies: list[StudySummary]


def lookup_sites(index: IndexRepository, scope: AccessScope) -> list[str]:
    """The producing sites a lookup that names none searches: every site the caller may
    read (its own list), or, for a caller who may read every site, each site the index
    holds studies of (an accession pseudonym is keyed by its producing site, so each is
    computed for each of them)."""
    if scope.site_ids is not None:
        return sorted(scope.site_ids)
    return index.study_site_ids()


def find_studies(
    lookup: PseudonymLookup,
    index: IndexRepository,
    identifiers: OriginalIdentifiers,
    site_ids: Sequence[str],
    scope: AccessScope,
) -> LookupAnswer:
    """The identifiers' pseudonyms at each of `site_ids`, and the indexed studies matching
    them (within `scope`). A patient ID matches a study's patient pseudonym, or the
    pseudonym of the local ID its patient had beside the INS. Raises ValueError when
    neither identifier is given."""
    if not (identifiers.accession_number or identifiers.patient_id):
        raise ValueError("give accession_number and/or patient_id")
    pseudonyms: list[SitePseudonyms] = []
    studies: dict[str, StudySummary] = {}
    searched: set[tuple[str | None, str | None]] = set()
    search = QueryRetrieve(index)
    for site_id in site_ids:
        accession, patient = lookup(
            identifiers.accession_number or None,
            identifiers.patient_id or None,
            identifiers.issuer_of_accession_number,
            identifiers.issuer_of_patient_id,
            site_id,
        )
        pseudonyms.append(SitePseudonyms(site_id, accession, patient))
        if (accession, patient) in searched:  # an INS, or an issuer: one pseudonym everywhere
            continue
        searched.add((accession, patient))
        # Another site's pseudonym never matches: the accession pseudonym is keyed by the site.
        queries = [StudyQuery(accession_number=accession, patient_id=patient, limit=_LIMIT)]
        if patient:
            beside_ins = index.studies_of_local_patient(patient, limit=_LIMIT)
            if beside_ins:
                queries.append(
                    StudyQuery(
                        accession_number=accession,
                        limit=_LIMIT,
                        study_instance_uids=tuple(beside_ins),
                    )
                )
        for query in queries:
            for study in search.search_for_studies(scope, query):
                studies.setdefault(study.study_instance_uid, study)
    return LookupAnswer(pseudonyms, list(studies.values()))


__all__ = [
    "COMPUTED_AT_THE_SITE",
    "LookupAnswer",
    "OriginalIdentifiers",
    "PseudonymLookup",
    "SitePseudonyms",
    "find_studies",
    "lookup_sites",
]
