"""All configuration, in one pydantic-settings class.

Every setting is an environment variable `DICOM_GATEWAY_<NAME>`, nested with `__`
(e.g. `DICOM_GATEWAY_DICOM__PORT=104`, `DICOM_GATEWAY_OBJECT_STORE__S3__BUCKET=images`).
Secrets are never defaulted in code: `serve` generates them into the data directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRETS_FILE = "secrets.json"
_WEAK_SECRETS = {"changeme", "change-me", "secret", "password", "admin", "test", "default"}
#: Placeholders of example configurations (deploy/config/*.env): a copied example must not
#: run with a publicly known secret.
_PLACEHOLDER = re.compile(r"change[-_]?me|replace[-_]?me|your[-_]?secret|example", re.IGNORECASE)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


#: prometheus_client's own variable: set when it is imported, its counters write to files
#: in that folder (only the workers of `dicom-gateway api` with HTTP__WORKERS > 1).
METRICS_MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class SettingsError(ValueError):
    """The configuration cannot run (missing or weak secret, bad value)."""


class MoveDestinationSettings(BaseModel):
    host: str
    port: int = Field(ge=1, le=65535)


#: What a DIMSE caller may ask of a node (dicom_node.Right).
DicomRight = Literal["store", "find", "move", "get", "commit"]
_ALL_DICOM_RIGHTS: list[DicomRight] = ["store", "find", "move", "get", "commit"]


class DicomCallerSettings(BaseModel):
    """A calling AE's credentials: the sites whose studies it may query and retrieve
    (["*"]: every site), its rights and, with TLS, the certificate it must present."""

    sites: list[str] = Field(min_length=1)
    rights: list[DicomRight] = Field(default_factory=lambda: list(_ALL_DICOM_RIGHTS))
    #: RFC 4514 subject of its client certificate, e.g. "CN=pacs-a,O=Hospital A": the AE
    #: title is then honoured only on TLS with that (CA-verified) certificate.
    certificate_subject: str | None = None
    #: C-MOVE destinations it may name (AE titles of `move_destinations`); None: any.
    move_destinations: list[str] | None = None

    @field_validator("sites")
    @classmethod
    def _sites(cls, value: list[str]) -> list[str]:
        if "*" in value:
            if len(value) > 1:
                raise ValueError("sites: ['*'] (every site) or a list of site ids, not both")
            return value
        for site in value:
            if not _SAFE_NAME.match(site):
                raise ValueError(f"sites: {site!r} is not a site id (letters, digits, '-', '_')")
        return value


class UnlistedCallerSettings(BaseModel):
    """What a calling AE not in `callers` may do, always within the one site its C-STOREs
    are filed under (`calling_ae_sites`, else SITE_ID)."""

    rights: list[DicomRight] = Field(default_factory=lambda: list(_ALL_DICOM_RIGHTS))


class DicomSettings(BaseModel):
    port: int = Field(11112, ge=0, le=65535)
    ae_title: str = "DICOMGATEWAY"
    allowed_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    max_pdu_size: int = Field(262_144, ge=0)
    max_associations: int = Field(32, ge=1)
    #: Connections one client address may hold at once (keeps slots for everyone else).
    max_associations_per_address: int = Field(8, ge=1)
    #: ARTIM: seconds a new connection has to send its A-ASSOCIATE-RQ (and finish TLS).
    association_request_timeout_seconds: float = Field(10.0, gt=0, le=300)
    network_timeout_seconds: float = Field(60.0, gt=0)
    #: A study's instances are handed to the worker every N (small: the worker's processes
    #: share a long association's study at once, and the first instances are searchable sooner).
    batch_size: int = Field(10, ge=0)
    #: Flow control: once the spool holds this many instances, C-STORE answers wait (up to
    #: 2 s each) while the worker drains it, so senders go at the worker's pace and what is
    #: sent stays searchable within seconds; never while the worker is stopped. 0: off.
    backlog_limit: int = Field(1000, ge=0)
    #: C-MOVE destinations: AE title -> {host, port} (a regional PACS pulling studies).
    move_destinations: dict[str, MoveDestinationSettings] = Field(default_factory=dict)
    #: DICOM over TLS: certificate and key (PEM) turn it on; a CA file verifies clients.
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None
    tls_require_client_certificate: bool = False
    #: Serve the node's Prometheus metrics on this port (None: not served).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    #: Calling AE title -> site: a node receiving for several sites files each caller's
    #: studies under its site (spool, queue, pseudonym qualifier of local IDs, index).
    calling_ae_sites: dict[str, str] = Field(default_factory=dict)
    #: Calling AE title -> its sites and rights (C-FIND/C-MOVE/C-GET see only those sites'
    #: studies, as a site-restricted API key does on QIDO).
    callers: dict[str, DicomCallerSettings] = Field(default_factory=dict)
    #: Rights of a calling AE not listed in `callers`, within its own site only.
    unlisted_caller: UnlistedCallerSettings = Field(default_factory=UnlistedCallerSettings)

    @field_validator("calling_ae_sites")
    @classmethod
    def _calling_ae_sites(cls, value: dict[str, str]) -> dict[str, str]:
        for site in value.values():
            if not _SAFE_NAME.match(site):
                raise ValueError(
                    f"calling_ae_sites: {site!r} is not a site id (letters, digits, '-', '_')"
                )
        return value

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16 or "\\" in value or not value.isascii():
            raise ValueError("AE title: 1 to 16 ASCII characters, no backslash")
        return value


class HttpSettings(BaseModel):
    port: int = Field(8000, ge=0, le=65535)
    #: The address users reach the API at (in KOS manifests and links); default from host/port.
    public_url: str | None = None
    #: Largest STOW-RS request body accepted (413 above).
    max_stow_mb: int = Field(2048, ge=1)
    #: Most parts in one STOW-RS request (413 above): instances, DICOM JSON and bulk data.
    max_stow_parts: int = Field(10_000, ge=1, le=1_000_000)
    #: Longest URL (path and query string, as sent) served; 414 above.
    max_url_bytes: int = Field(8 * 1024, ge=1024, le=1024 * 1024)
    #: Most bytes of all request header fields together (one field: half of it); 431 above.
    max_header_bytes: int = Field(16 * 1024, ge=2048, le=1024 * 1024)
    #: How long a STOW-RS answer waits for the worker to store and index the instances
    #: (read-your-writes); past it, the answer lists them as accepted, still processed.
    stow_reply_seconds: float = Field(60.0, gt=0, le=3600)
    #: Browser origins allowed to call the API (CORS), e.g. a viewer on another host.
    cors_origins: list[str] = Field(default_factory=list)
    #: API processes `dicom-gateway api` runs on this host (uvicorn workers sharing the
    #: port): Python answers one request at a time per process, so one per core.
    workers: int = Field(1, ge=1, le=64)
    #: Time a QIDO-RS search or an API key lookup may spend in SQLite on the event loop,
    #: where it skips two thread hand-offs; beyond it, or with the index locked, it moves to
    #: a worker thread. SQLite index only; 0 sends every one to a worker thread.
    inline_read_budget_ms: float = Field(5.0, ge=0, le=100)
    #: Where this API process runs. "site": at a producing site, holding the pseudonymization
    #: secret — it takes identified uploads (STOW-RS, de-identified by the site's worker) and
    #: answers lookups by original identifiers. "region": the shared regional API — it must
    #: run without the secret, and STOW-RS takes only objects already of the domain.
    role: Literal["site", "region"] = "site"
    #: Reverse proxies (addresses or networks, e.g. ["10.0.0.5", "10.1.0.0/24"]) whose
    #: X-Forwarded-For names the client. Default: none, not even loopback — the TCP peer
    #: is the client, and a client's own X-Forwarded-For is ignored.
    trusted_proxies: list[str] = Field(default_factory=list)
    #: Largest frame a rendered or thumbnail request decodes, in megapixels (Rows x
    #: Columns); an instance declaring a larger one is refused (422) before any decoding.
    render_max_megapixels: float = Field(64.0, gt=0, le=1024)
    #: ... and its decoded size (x Samples per Pixel x Bits Allocated / 8), in MiB: the
    #: decoders peak at about four times it.
    render_max_frame_mb: int = Field(80, ge=1, le=4096)
    #: Memory the API keeps rendered images in (per process, least recently used dropped),
    #: so that a frame asked for again is not decoded again; 0: no cache.
    render_cache_mb: int = Field(64, ge=0, le=4096)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: not an address or network: {entry[:60]!r}"
                ) from None
        return value


class S3Settings(BaseModel):
    endpoint_url: str | None = None
    bucket: str = "dicom-gateway"
    prefix: str = ""
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    create_bucket: bool = False
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    multipart_threshold_mb: int = Field(64, ge=5)


class ObjectStoreSettings(BaseModel):
    backend: Literal["filesystem", "s3"] = "filesystem"
    path: Path | None = None
    s3: S3Settings = Field(default_factory=S3Settings)


class WebhookSettings(BaseModel):
    url: str
    secret: SecretStr


class WorkerSettings(BaseModel):
    concurrency: int | None = Field(None, ge=1)
    pool: Literal["prefork", "threads", "solo"] = "prefork"
    #: Lossless syntax stored: HTJ2K by default (fastest verified; docs/admin/storage.md); never lossy.
    compression: Literal["jpeg-ls", "jpeg-2000", "htj2k", "none"] = "htj2k"
    #: A study unchanged this long is complete: metadata, thumbnails, KOS, webhook.
    study_quiet_seconds: float = Field(60.0, ge=0)
    #: How often each worker looks for batches and completions whose task is gone (a
    #: worker killed, a broker restarted, a retry due): the most a recovery waits.
    recovery_interval_seconds: float = Field(2.0, gt=0, le=300)
    webhooks: list[WebhookSettings] = Field(default_factory=list)


class LimitsSettings(BaseModel):
    """Largest decoded pixel data accepted (Rows x Columns x Number of Frames x Samples per
    Pixel x Bits Allocated), checked before anything is decoded: above it the node refuses
    the instance (0xA700), STOW-RS lists it failed, the worker quarantines it, and
    WADO-RS answers 406 to what would decode it (the stored form is still served). Deflated data sets are inflated no further."""

    max_decoded_instance_mb: int = Field(1024, ge=1, le=1024 * 1024)
    max_decoded_frame_mb: int = Field(256, ge=1, le=1024 * 1024)


class PixelMaskSettings(BaseModel):
    """Rectangles (x, y, width, height) blacked out on instances of one device and size."""

    modality: str
    rows: int = Field(gt=0)
    columns: int = Field(gt=0)
    rectangles: list[tuple[int, int, int, int]] = Field(min_length=1)
    manufacturer: str | None = None


def _default_cleaned_descriptors() -> list[str]:
    from anonymize import READING_DESCRIPTORS

    return sorted(READING_DESCRIPTORS)


class DeidSettings(BaseModel):
    """The site's de-identification profile (PS3.15 options, pixel masks, reversibility)."""

    options: list[str] = Field(
        default_factory=lambda: ["retain_longitudinal_modified_dates", "clean_descriptors"]
    )
    #: The descriptors `clean_descriptors` keeps, cleaned (DICOM keywords); ["all"] for the
    #: option's whole column (comments, history, occupation... too).
    cleaned_descriptors: list[str] = Field(default_factory=_default_cleaned_descriptors)
    pixel_masks: list[PixelMaskSettings] = Field(default_factory=list)
    retain_private_bulk: bool = False
    recipient_certificate: Path | None = None

    @field_validator("options")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        from anonymize import ProfileOption

        for name in value:
            ProfileOption.from_name(name)  # raises ValueError listing the known names
        return value


def _default_ins_oids() -> list[str]:
    from anonymize import DEFAULT_INS_ISSUER_OIDS

    return sorted(DEFAULT_INS_ISSUER_OIDS)


def _default_ins_namespaces() -> list[str]:
    from anonymize import DEFAULT_INS_NAMESPACES

    return sorted(DEFAULT_INS_NAMESPACES)


class InsSettings(BaseModel):
    """Who issues the INS (national health identifier): an ID they issue, INS-shaped (15
    characters with a valid key), gives the patient one pseudonym at every site."""

    #: OIDs of the INS assigning authorities, matched in IssuerOfPatientID and in
    #: IssuerOfPatientIDQualifiersSequence > UniversalEntityID.
    oids: list[str] = Field(default_factory=_default_ins_oids)
    #: Namespaces naming them in IssuerOfPatientID (an issuer written without any OID).
    namespaces: list[str] = Field(default_factory=_default_ins_namespaces)

    @field_validator("oids")
    @classmethod
    def _oids(cls, value: list[str]) -> list[str]:
        from anonymize import is_oid

        for oid in value:
            if not is_oid(oid):
                raise ValueError(
                    f"INS__OIDS: {oid!r} is not an OID (a namespace such as "
                    "ASIP-SANTE-INS-NIR goes in INS__NAMESPACES)"
                )
        return value

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        for namespace in value:
            if not namespace.strip() or len(namespace) > 64:
                raise ValueError(
                    f"INS__NAMESPACES: {namespace!r} is not an IssuerOfPatientID (1-64 characters)"
                )
        return value


class OidcSettings(BaseModel):
    """OIDC bearer tokens (e.g. Pro Santé Connect, a hospital's Keycloak)."""

    issuer: str
    audience: str
    #: Default: the issuer's /.well-known/openid-configuration names it.
    jwks_url: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256"])
    #: Claim with the user's roles/scopes; dotted path for nested claims.
    scope_claim: str = "scope"
    #: Claim value -> our scopes (read, write, share, admin).
    scope_map: dict[str, list[str]] = Field(default_factory=dict)
    subject_claim: str = "sub"
    site_claim: str | None = None
    leeway_seconds: int = Field(30, ge=0, le=300)


class SmtpSettings(BaseModel):
    host: str
    port: int = Field(587, ge=1, le=65535)
    sender: str = "dicom-gateway@localhost"
    starttls: bool = True
    use_ssl: bool = False
    username: str | None = None
    password: SecretStr | None = None
    timeout_seconds: float = Field(15.0, gt=0)


class ShareSettings(BaseModel):
    """Share link limits."""

    max_expiry_days: float = Field(30.0, gt=0)
    session_minutes: float = Field(30.0, gt=0)
    pin_lock_after: int = Field(5, ge=1)
    min_pin_length: int = Field(4, ge=1)


class AuthSettings(BaseModel):
    oidc: OidcSettings | None = None
    #: Failures within the window before 429, counted against what failed: bearer tokens
    #: that open nothing and unknown share links per client address, wrong secrets per API
    #: key id. A valid credential or share link is served whatever was counted. (Wrong PINs
    #: lock their share: SHARES__PIN_LOCK_AFTER.)
    failure_limit: int = Field(20, ge=1)
    failure_window_seconds: float = Field(900.0, gt=0)


class Settings(BaseSettings):
    """The effective configuration of a gateway process."""

    model_config = SettingsConfigDict(
        env_prefix="DICOM_GATEWAY_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    site_id: str = "site1"
    log_level: str = "INFO"
    broker_url: str | None = None
    broker_polling_interval: float = Field(0.05, gt=0)
    broker_transport_options: dict[str, Any] = Field(default_factory=dict)
    database_url: str | None = None
    pseudonym_secret: SecretStr | None = None
    admin_token: SecretStr | None = None
    ins: InsSettings = Field(default_factory=InsSettings)
    #: Deprecated (INS__OIDS and INS__NAMESPACES replace it): the issuers IssuerOfPatientID
    #: was compared with; its OIDs count as INS__OIDS, its other values as INS__NAMESPACES.
    ins_issuer_oids: list[str] | None = None
    supervised_components: list[str] = Field(default_factory=list)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    deid: DeidSettings = Field(default_factory=DeidSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    shares: ShareSettings = Field(default_factory=ShareSettings)
    smtp: SmtpSettings | None = None

    @field_validator("site_id")
    @classmethod
    def _site_id(cls, value: str) -> str:
        if not _SAFE_NAME.match(value):
            raise ValueError("site_id: letters, digits, '-' and '_' only (1-64)")
        return value

    @model_validator(mode="after")
    def _deprecated_ins_issuer_oids(self) -> Settings:
        old = self.ins_issuer_oids
        if old is None:
            return self
        if "ins" in self.model_fields_set:
            raise ValueError(
                "INS_ISSUER_OIDS is deprecated and INS__* replaces it: set only "
                "DICOM_GATEWAY_INS__OIDS and DICOM_GATEWAY_INS__NAMESPACES"
            )
        warnings.warn(
            "DICOM_GATEWAY_INS_ISSUER_OIDS is deprecated: use "
            "DICOM_GATEWAY_INS__OIDS and DICOM_GATEWAY_INS__NAMESPACES",
            DeprecationWarning,
            stacklevel=2,
        )
        from anonymize import is_oid

        self.ins = InsSettings(
            oids=[v for v in old if is_oid(v)], namespaces=[v for v in old if not is_oid(v)]
        )
        self.ins_issuer_oids = None
        return self

    # Derived locations -------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        """This deployment's site and those its node receives for (calling AE mapping)."""
        return sorted({self.site_id, *self.dicom.calling_ae_sites.values()})

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def objects_dir(self) -> Path:
        return self.object_store.path or self.data_dir / "objects"

    @property
    def effective_public_url(self) -> str:
        if self.http.public_url:
            return self.http.public_url.rstrip("/")
        # a comparison, not a bind: a wildcard address is reached through loopback
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # nosec B104
        return f"http://{host}:{self.http.port}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"

    # Secrets -----------------------------------------------------------------------
    def _stored_secrets(self) -> dict[str, str]:
        path = self.data_dir / SECRETS_FILE
        if not path.is_file():
            return {}
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded

    def ensure_generated_secrets(self) -> None:
        """For `serve`: create the data dir's secrets file if absent (mode 0600; a data dir
        created here is 0700)."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        stored = self._stored_secrets()
        changed = False
        for name in ("pseudonym_secret", "admin_token"):
            if name not in stored:
                stored[name] = secrets.token_urlsafe(32)
                changed = True
        if changed:
            path = self.data_dir / SECRETS_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # a file written by hand keeps its mode otherwise
            with os.fdopen(fd, "w") as handle:
                json.dump(stored, handle)

    def _secret(self, name: str, env_name: str) -> str:
        configured: SecretStr | None = getattr(self, name)
        value = configured.get_secret_value() if configured else self._stored_secrets().get(name)
        if not value:
            raise SettingsError(
                f"{env_name} is not set (and {self.data_dir / SECRETS_FILE} has none): "
                "set it, or run `dicom-gateway serve` once to generate one"
            )
        if value.lower() in _WEAK_SECRETS or len(value) < 16:
            raise SettingsError(f"{env_name} is too weak: use at least 16 random characters")
        if _PLACEHOLDER.search(value):
            raise SettingsError(
                f"{env_name} is still the example's placeholder: "
                "generate one (e.g. `openssl rand -base64 33`)"
            )
        return value

    def pseudonym_secret_value(self) -> str:
        return self._secret("pseudonym_secret", "DICOM_GATEWAY_PSEUDONYM_SECRET")

    def has_pseudonym_secret(self) -> bool:
        """Whether a pseudonymization secret is configured or stored in the data directory
        (whatever its quality: a regional API must hold none at all)."""
        return bool(self.pseudonym_secret and self.pseudonym_secret.get_secret_value()) or bool(
            self._stored_secrets().get("pseudonym_secret")
        )

    def check_role(self) -> None:
        """Refuse a regional API that holds the pseudonymization secret: with it, whoever
        holds the API host could recompute the pseudonyms of known identifiers. And a
        site's API without it: an API missing the secret is a regional one that forgot to
        say so, and would take identified uploads at the region."""
        if self.http.role == "site":
            try:
                self.pseudonym_secret_value()
            except SettingsError as exc:
                raise SettingsError(
                    f"HTTP__ROLE=site (the default): a site's API holds the pseudonymization "
                    f"secret — {exc}. The regional API runs without it: set "
                    "DICOM_GATEWAY_HTTP__ROLE=region"
                ) from exc
            return
        if self.has_pseudonym_secret():
            where = (
                "DICOM_GATEWAY_PSEUDONYM_SECRET is set"
                if self.pseudonym_secret
                else f"{self.data_dir / SECRETS_FILE} holds a pseudonym_secret"
            )
            raise SettingsError(
                f"HTTP__ROLE=region: {where}, but the regional API must run without the "
                "pseudonymization secret (lookups by original identifiers are computed at the "
                "producing site: `dicom-gateway lookup`, or POST /api/site/lookup on a site's API)"
            )

    def admin_token_value(self) -> str:
        return self._secret("admin_token", "DICOM_GATEWAY_ADMIN_TOKEN")

    def masked(self) -> dict[str, Any]:
        """The effective settings as JSON-able data, every secret masked."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        data["effective"] = {
            "broker_url": _mask_url(self.effective_broker_url),
            "database_url": _mask_url(self.effective_database_url),
            "objects_dir": str(self.objects_dir),
            "spool_dir": str(self.spool_dir),
        }
        for key in ("broker_url", "database_url"):
            if data.get(key):
                data[key] = _mask_url(data[key])
        return data


def _mask_url(url: str) -> str:
    """Hide the password of a URL like scheme://user:password@host/db."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1**********@", url)
