"""The object store's layout: every key the gateway writes, built here and nowhere else.

    studies/<study>/owner.json                                 the study's write-once owner
    studies/<study>/manifest-kos.dcm                           its KOS manifest (XDS-I.b)
    studies/<study>/series/<series>/metadata.json              the series' DICOM JSON
    studies/<study>/series/<series>/thumbnail.png              the series' thumbnail
    studies/<study>/series/<series>/instances/<sop>.dcm        one de-identified instance
    studies/<study>/series/<series>/instances/<sop>.json       its DICOM JSON (no bulk data)

UIDs are de-identified (the domain's); `join_key` refuses a segment that would leave its
prefix.
"""

from __future__ import annotations

import re

from storage.objects import join_key

#: The prefix of everything a study holds.
STUDIES_PREFIX = "studies/"
_INSTANCE_OBJECT = re.compile(r"^studies/[^/]+/series/[^/]+/instances/[^/]+\.dcm$")


def study_owner_key(study_instance_uid: str) -> str:
    return join_key("studies", study_instance_uid, "owner.json")


def manifest_key(study_instance_uid: str) -> str:
    return join_key("studies", study_instance_uid, "manifest-kos.dcm")


def series_key(study_instance_uid: str, series_instance_uid: str, name: str) -> str:
    """An object of the series itself (`metadata.json`, `thumbnail.png`)."""
    return join_key("studies", study_instance_uid, "series", series_instance_uid, name)


def series_metadata_key(study_instance_uid: str, series_instance_uid: str) -> str:
    return series_key(study_instance_uid, series_instance_uid, "metadata.json")


def series_thumbnail_key(study_instance_uid: str, series_instance_uid: str) -> str:
    return series_key(study_instance_uid, series_instance_uid, "thumbnail.png")


def instance_key(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> str:
    """The object key of one de-identified instance."""
    return join_key(
        "studies",
        study_instance_uid,
        "series",
        series_instance_uid,
        "instances",
        f"{sop_instance_uid}.dcm",
    )


def instance_metadata_key(
    study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
) -> str:
    """The instance's DICOM JSON, written at ingest beside it."""
    return join_key(
        "studies",
        study_instance_uid,
        "series",
        series_instance_uid,
        "instances",
        f"{sop_instance_uid}.json",
    )


def is_instance_key(key: str) -> bool:
    """An instance object's key (not metadata, a thumbnail, a manifest or an owner)."""
    return _INSTANCE_OBJECT.match(key) is not None
