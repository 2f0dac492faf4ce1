"""Index tables: one row per study, series and instance (de-identified values only)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class _Timestamps:
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Patient(_Timestamps, Base):
    """A pseudonymous patient: the same pseudonym at every site when the INS is known."""

    __tablename__ = "patients"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")


class Study(_Timestamps, Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("patients.patient_id"), index=True, default=""
    )
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), index=True, default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), index=True, default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    specific_character_set: Mapped[str] = mapped_column(String(128), default="")
    site_id: Mapped[str] = mapped_column(String(64), default="")
    #: When patient_id is the INS's pseudonym: the pseudonym of the patient's local ID at
    #: the producing site (keyed like any, never the original), for lookups by that ID.
    local_patient_id: Mapped[str] = mapped_column(
        String(64), index=True, default="", server_default=""
    )
    #: When the completion step (thumbnails, KOS manifest, webhook) last ran, and for how
    #: many instances: a later arrival makes the study due again.
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_instance_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The completion step is pending: set when an instance of the study is indexed, due
    #: once the study has been quiet from then on; cleared when it ran for that content
    #: (a failed run sets it later: retried).
    completion_due_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, index=True
    )
    #: Failed completion runs since the last one that succeeded, and the last failure's
    #: exception type (never a value).
    completion_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    completion_error: Mapped[str] = mapped_column(String(64), default="", server_default="")


class Series(_Timestamps, Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("studies.study_instance_uid", ondelete="CASCADE"), index=True
    )
    modality: Mapped[str] = mapped_column(String(16), index=True, default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    #: QIDO-RS required matching keys of the series (PS3.18 Table 10.6.1-5), as stored.
    performed_procedure_step_start_date: Mapped[str] = mapped_column(
        String(8), default="", server_default=""
    )
    performed_procedure_step_start_time: Mapped[str] = mapped_column(
        String(16), default="", server_default=""
    )
    #: ScheduledProcedureStepID and RequestedProcedureID of its RequestAttributesSequence
    #: items, backslash-joined.
    scheduled_procedure_step_ids: Mapped[str] = mapped_column(
        String(256), default="", server_default=""
    )
    requested_procedure_ids: Mapped[str] = mapped_column(String(256), default="", server_default="")


class Instance(_Timestamps, Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid", ondelete="CASCADE"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    source_transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    compression: Mapped[str] = mapped_column(String(32), default="")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    object_key: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    #: The site that stored it first: its owner (see docs/admin/security/trust-model.md).
    site_id: Mapped[str] = mapped_column(String(64), default="", server_default="")


class WithheldInstance(Base):
    """An instance of a study that its site received and kept in quarantine (its pixels may
    show identity, it is too large, it could not be de-identified): the study's recipients
    are told that part of it is missing, and why. De-identified UIDs and a reason category
    only. Not index data: no stored object holds it, so `reindex` keeps it."""

    __tablename__ = "withheld_instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    #: pixels_may_identify, too_large, not_deidentifiable (see `WITHHELD_REASONS`).
    reason: Mapped[str] = mapped_column(String(32))
    site_id: Mapped[str] = mapped_column(String(64), default="")
    withheld_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


# Access control and audit: not index data — `reindex` never touches these tables. ----------
class ApiKey(Base):
    """An API key: only the SHA-256 of its secret is kept."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), default="")
    #: Space-separated scopes among read, write, share, admin.
    scopes: Mapped[str] = mapped_column(String(64))
    #: Space-separated site ids: when set, the key sees only the studies these sites
    #: produced (and shares of those only).
    sites: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Share(Base):
    """A share link: the token is kept only as its SHA-256."""

    __tablename__ = "shares"

    share_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(256), default="")
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: scrypt$N$r$p$salt$hash, or NULL when the share has no PIN.
    pin_hash: Mapped[str | None] = mapped_column(String(256), nullable=True)
    pin_failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    max_uses: Mapped[int | None] = mapped_column(Integer, nullable=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    #: What the share allows beyond viewing, space-separated (`access.Permission` names).
    permissions: Mapped[str] = mapped_column(String(256), default="", server_default="")
    recipient: Mapped[str] = mapped_column(String(256), default="")
    recipient_email: Mapped[str] = mapped_column(String(256), default="")
    note: Mapped[str] = mapped_column(Text, default="")
    #: The sites its creator was limited to (space-separated), NULL for an unlimited one.
    sites: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    #: The producing site's clinical context, encrypted at the site (`v1.<iv>.<ciphertext>`,
    #: AES-256-GCM); the key is only in the link's fragment, never sent to any server.
    sealed_context: Mapped[str] = mapped_column(Text, default="", server_default="")


class ShareItem(Base):
    """One study (or one series of it) in a share's scope."""

    __tablename__ = "share_items"

    share_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("shares.share_id", ondelete="CASCADE"), primary_key=True
    )
    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: "" for the whole study.
    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True, default="")


class ShareSession(Base):
    """A viewer session opened on a share (after the PIN, when there is one)."""

    __tablename__ = "share_sessions"

    session_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    share_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("shares.share_id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """One audited event, append-only; fields follow the DICOM audit message (PS3.15 A.5)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_address_action_at", "address", "action", "at"),
        Index("ix_audit_events_share_id_at", "share_id", "at"),
    )

    event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    #: Our name for the event (share.create, dicomweb.retrieve, auth.failure, ...).
    action: Mapped[str] = mapped_column(String(64), index=True)
    #: EventID (DCM code value, e.g. 110103 DICOM Instances Accessed) and EventActionCode.
    event_code: Mapped[str] = mapped_column(String(16))
    event_action: Mapped[str] = mapped_column(String(1))
    #: EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure.
    outcome: Mapped[int] = mapped_column(Integer)
    #: ActiveParticipant UserID: "admin", "key:<id>", "oidc:<sub>", "share:<id>", "anonymous".
    actor: Mapped[str] = mapped_column(String(300), index=True)
    address: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(512), default="")
    #: What was touched: the request path (share tokens replaced by the share id).
    resource: Mapped[str] = mapped_column(String(1024), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    share_id: Mapped[str] = mapped_column(String(32), default="")
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
