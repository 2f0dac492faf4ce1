"""Build each component from the settings: the only place that knows both sides."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import overload

from celery import Celery

from access import SharePolicy, ShareService
from anonymize import (
    DeidentificationPolicy,
    InsIssuers,
    PixelMask,
    PixelPolicy,
    ProfileOption,
    PseudonymKeys,
    known_sop_classes,
    load_certificate,
    load_safe_private,
    pseudonymize_accession_number,
    pseudonymize_patient_id,
)
from dicom_node import (
    CallerCredential,
    CallerPolicy,
    DicomNode,
    IsStored,
    MoveDestination,
    NodeConfig,
    Right,
    TlsConfig,
)
from gateway.library_logs import withhold_library_values
from gateway.settings import METRICS_MULTIPROCESS_VARIABLE, SECRETS_FILE, Settings, SettingsError
from imaging import Codec, DecodeLimits
from spool import (
    BatchClaim,
    Facts,
    ProcessMark,
    Spool,
    close_private_tree,
    read_pending,
    record_retry,
    sweep,
)
from storage import (
    AccessRepository,
    AccessScope,
    FilesystemObjectStore,
    IndexRepository,
    ObjectStore,
    S3ObjectStore,
    StorageError,
    StudyQuery,
    create_index_engine,
    migrate,
)
from web_viewer_api import (
    ApiConfig,
    OidcConfig,
    PseudonymLookup,
    RenderLimits,
    RequestLimits,
    SmtpConfig,
    StowTarget,
    create_app,
    parse_networks,
)
from worker import (
    WORKER_MARK,
    BrokerEpoch,
    IngestPipeline,
    RecoveryLoop,
    StudyCompletion,
    TransientPipelineError,
    Webhook,
    WorkerContext,
    broker_epoch,
    create_celery_app,
    enqueue_completion,
    enqueue_ingest,
    filesystem_broker_options,
)

log = logging.getLogger(__name__)


def configure_logging(settings: Settings, component: str) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom's DEBUG output prints each request's parameters, among them the original
    # (identifying) SOP Instance UIDs of what modalities send: never below INFO.
    pynetdicom_log = logging.getLogger("pynetdicom")
    pynetdicom_log.setLevel(max(logging.INFO, logging.getLogger().getEffectiveLevel()))
    # pydicom quotes invalid values, in records and warnings: texts withheld (library_logs).
    withhold_library_values()


def build_object_store(settings: Settings) -> ObjectStore:
    config = settings.object_store
    if config.backend == "s3":
        s3 = config.s3
        store = S3ObjectStore(
            s3.bucket,
            prefix=s3.prefix,
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            access_key=s3.access_key_id.get_secret_value() if s3.access_key_id else None,
            secret_key=s3.secret_access_key.get_secret_value() if s3.secret_access_key else None,
            server_side_encryption=s3.server_side_encryption,
            kms_key_id=s3.kms_key_id,
            multipart_threshold=s3.multipart_threshold_mb * 1024 * 1024,
        )
        if s3.create_bucket:
            store.ensure_bucket()
        return store
    return FilesystemObjectStore(settings.objects_dir)


def raise_open_file_limit() -> None:
    """Let this process open as many files as the system allows it (the hard limit): the
    node holds a claim (an open file) per study of each open association, STOW-RS one per
    study of each request; a soft limit of 1024 would refuse a migration's thousands."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:  # a container's ceiling: keep what we have
            log.warning("open file limit left at %d (%s)", soft, type(exc).__name__)


def close_site_files(settings: Settings) -> None:
    """At start-up: the spool, quarantine and embedded broker folders hold identified data
    (owner only: folders 0700, files 0600, as they are now created); what an older version
    left by the umask (0755/0644) is tightened, and so is the secrets file."""
    for folder in (settings.spool_dir, settings.quarantine_dir, settings.broker_dir):
        close_private_tree(folder)
    secrets_file = settings.data_dir / SECRETS_FILE
    if secrets_file.is_file() and secrets_file.stat().st_mode & 0o077:
        try:
            secrets_file.chmod(0o600)
        except PermissionError:
            log.warning("%s is readable by other users and not ours to close", secrets_file)


def build_index(settings: Settings, *, run_migrations: bool = True) -> IndexRepository:
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = create_index_engine(settings.effective_database_url)
    if run_migrations:
        migrate(engine)
    return IndexRepository(engine)


def build_celery(settings: Settings, *, with_pipeline: bool) -> Celery:
    transport_options: dict[str, object] = {}
    if settings.effective_broker_url.startswith("filesystem"):
        transport_options = filesystem_broker_options(
            settings.broker_dir, settings.broker_polling_interval
        )
    transport_options.update(settings.broker_transport_options)

    def context_factory() -> WorkerContext:
        return build_worker_context(settings)

    return create_celery_app(
        settings.effective_broker_url,
        site_id=settings.site_id,
        transport_options=transport_options,
        context_factory=context_factory if with_pipeline else None,
    )


def build_recovery(settings: Settings, celery_app: Celery) -> RecoveryLoop:
    """The worker's recovery loop (`worker.recovery`), for its main process: its own index
    connections (none kept open: the pool's processes are forked from this one), the site
    spools it processes, and the broker's identity."""
    store = build_object_store(settings)
    index = IndexRepository(create_index_engine(settings.effective_database_url, pooled=False))
    sites = tuple(settings.sites)
    quiet = settings.worker.study_quiet_seconds

    def dependencies() -> None:
        index.check()
        store.check()

    def send_batch(site_id: str, batch_id: str) -> None:
        enqueue_ingest(celery_app, site_id, batch_id)

    return RecoveryLoop(
        spools=[Spool(settings.spool_dir, site) for site in sites],
        send_batch=send_batch,
        send_completion=lambda: enqueue_completion(celery_app, settings.site_id),
        completion_due=lambda: index.completion_due(quiet, sites),
        dependencies=dependencies,
        broker=lambda: broker_epoch(celery_app),
        spool_root=settings.spool_dir,
        site_id=settings.site_id,
        interval=settings.worker.recovery_interval_seconds,
    )


def build_worker_context(settings: Settings) -> WorkerContext:
    pipeline = build_pipeline(settings)
    webhooks = tuple(Webhook(w.url, w.secret.get_secret_value()) for w in settings.worker.webhooks)
    completion = StudyCompletion(
        store=pipeline.store,
        index=pipeline.index,
        site_id=settings.site_id,
        webhooks=webhooks,
        retrieve_url_base=settings.effective_public_url + "/dicom-web",
        site_ids=tuple(settings.sites),
    )
    return WorkerContext(
        pipeline=pipeline,
        completion=completion,
        site_id=settings.site_id,
        quiet_seconds=settings.worker.study_quiet_seconds,
        webhooks=webhooks,
    )


def ins_issuers(settings: Settings) -> InsIssuers:
    """The INS assigning authorities this deployment recognises (settings INS__*)."""
    return InsIssuers(
        oids=frozenset(settings.ins.oids), namespaces=frozenset(settings.ins.namespaces)
    )


@overload
def pseudonym_keys(settings: Settings) -> PseudonymKeys: ...
@overload
def pseudonym_keys(settings: Settings, *, required: bool) -> PseudonymKeys | None: ...
def pseudonym_keys(settings: Settings, *, required: bool = True) -> PseudonymKeys | None:
    """The keys of this deployment's pseudonymization secret; without the secret, None
    (unless `required`: then the SettingsError says why)."""
    try:
        return PseudonymKeys(settings.pseudonym_secret_value().encode())
    except SettingsError:
        if required:
            raise
        return None


def build_policy(settings: Settings) -> DeidentificationPolicy:
    """The site's de-identification policy from its settings (at the region, without keys:
    it holds no secret, and its worker takes only objects of the domain)."""
    deid = settings.deid
    certificate = None
    if deid.recipient_certificate is not None:
        try:
            certificate = load_certificate(deid.recipient_certificate.read_bytes())
        except (OSError, ValueError) as exc:
            raise SettingsError(f"recipient certificate unusable: {exc}") from exc
    masks = tuple(
        PixelMask(
            modality=m.modality,
            rows=m.rows,
            columns=m.columns,
            rectangles=tuple(m.rectangles),
            manufacturer=m.manufacturer,
        )
        for m in deid.pixel_masks
    )
    safe_private = load_safe_private()
    if deid.retain_private_bulk:
        safe_private = dataclasses.replace(safe_private, retain_bulk=True)
    try:
        return DeidentificationPolicy(
            keys=None if settings.http.role == "region" else pseudonym_keys(settings),
            site_id=settings.site_id,
            ins_issuers=ins_issuers(settings),
            options=frozenset(ProfileOption.from_name(n) for n in deid.options),
            cleaned_descriptors=(
                None
                if [d.lower() for d in deid.cleaned_descriptors] == ["all"]
                else frozenset(deid.cleaned_descriptors)
            ),
            safe_private=safe_private,
            pixel_policy=PixelPolicy(masks=masks),
            recipient_certificate=certificate,
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def check_write_once(settings: Settings) -> None:
    """Refuse to run a worker on an S3 server where `create` would replace objects."""
    store = build_object_store(settings)
    if isinstance(store, S3ObjectStore):
        try:
            store.check_write_once()
        except StorageError as exc:
            raise SettingsError(str(exc)) from exc


def decode_limits(settings: Settings) -> DecodeLimits:
    """LIMITS__*: the largest decoded pixel data an instance may declare."""
    return DecodeLimits.from_mib(
        settings.limits.max_decoded_instance_mb, settings.limits.max_decoded_frame_mb
    )


def build_pipeline(settings: Settings, index: IndexRepository | None = None) -> IngestPipeline:
    policy = build_policy(settings)
    index = index or build_index(settings, run_migrations=False)
    return IngestPipeline(
        store=build_object_store(settings),
        index=index,
        policy=policy,
        spool_root=settings.spool_dir,
        quarantine_root=settings.quarantine_dir,
        codec=None if settings.worker.compression == "none" else Codec(settings.worker.compression),
        audit=AccessRepository(index.engine).append_audit,
        region=settings.http.role == "region",
        decode_limits=decode_limits(settings),
    )


def _tls(settings: Settings) -> TlsConfig | None:
    dicom = settings.dicom
    if dicom.tls_certificate is None and dicom.tls_private_key is None:
        return None
    if dicom.tls_certificate is None or dicom.tls_private_key is None:
        raise SettingsError(
            "DICOM TLS needs both DICOM__TLS_CERTIFICATE and DICOM__TLS_PRIVATE_KEY"
        )
    if dicom.tls_require_client_certificate and dicom.tls_ca_certificates is None:
        raise SettingsError(
            "DICOM__TLS_REQUIRE_CLIENT_CERTIFICATE needs DICOM__TLS_CA_CERTIFICATES"
        )
    return TlsConfig(
        dicom.tls_certificate,
        dicom.tls_private_key,
        dicom.tls_ca_certificates,
        dicom.tls_require_client_certificate,
    )


def caller_policy(settings: Settings) -> CallerPolicy:
    """Who may associate with the node, and each caller's sites and rights."""
    dicom = settings.dicom
    missing = [
        name
        for name, value in (
            ("DICOM__TLS_CERTIFICATE", dicom.tls_certificate),
            ("DICOM__TLS_CA_CERTIFICATES", dicom.tls_ca_certificates),
        )
        if value is None
    ]
    if missing and any(c.certificate_subject for c in dicom.callers.values()):
        raise SettingsError(
            f"DICOM__CALLERS: a certificate_subject needs DICOM over TLS with "
            f"client certificates verified: set {' and '.join(missing)}"
        )
    for title, caller in dicom.callers.items():
        unknown = set(caller.move_destinations or ()) - set(dicom.move_destinations)
        if unknown:
            raise SettingsError(
                f"DICOM__CALLERS__{title}: move destinations not in "
                f"DICOM__MOVE_DESTINATIONS: {', '.join(sorted(unknown))}"
            )
    callers = {
        title: CallerCredential(
            site_ids=None if caller.sites == ["*"] else frozenset(caller.sites),
            rights=frozenset(Right(r) for r in caller.rights),
            certificate_subject=caller.certificate_subject,
            move_destinations=(
                frozenset(d.strip() for d in caller.move_destinations)
                if caller.move_destinations is not None
                else None
            ),
        )
        for title, caller in dicom.callers.items()
    }
    return CallerPolicy.build(
        dicom.allowed_networks,
        dicom.allowed_calling_ae_titles,
        callers,
        dicom.unlisted_caller.rights,
    )


def build_node(settings: Settings, celery_app: Celery) -> DicomNode:
    config = NodeConfig(
        ae_title=settings.dicom.ae_title,
        host=settings.host,
        port=settings.dicom.port,
        site_id=settings.site_id,
        spool_root=settings.spool_dir,
        policy=caller_policy(settings),
        max_pdu_size=settings.dicom.max_pdu_size,
        maximum_associations=settings.dicom.max_associations,
        max_associations_per_address=settings.dicom.max_associations_per_address,
        association_request_timeout=settings.dicom.association_request_timeout_seconds,
        network_timeout=settings.dicom.network_timeout_seconds,
        batch_size=settings.dicom.batch_size,
        backlog_limit=settings.dicom.backlog_limit,
        move_destinations={
            ae.strip(): MoveDestination(ae.strip(), d.host, d.port)
            for ae, d in settings.dicom.move_destinations.items()
        },
        tls=_tls(settings),
        metrics_port=settings.dicom.metrics_port,
        calling_ae_sites=settings.dicom.calling_ae_sites,
        decode_limits=decode_limits(settings),
    )

    epoch = BrokerEpoch(celery_app)

    def enqueue(site_id: str, batch_id: str) -> str:
        sent_to = epoch()  # before sending: recorded with the batch
        enqueue_ingest(celery_app, site_id, batch_id)
        return sent_to

    # The node answers C-FIND/C-MOVE/C-GET from the same (de-identified) archive, and
    # Storage Commitment by finding the pseudonymized UID of an instance in the index,
    # among the caller's site's studies only.
    index = build_index(settings, run_migrations=False)
    keys = pseudonym_keys(settings, required=False)
    archived = archived_as(index, keys) if keys is not None else None
    return DicomNode(
        config,
        enqueue,
        index,
        build_object_store(settings),
        archived,
        pseudonymize_uid=keys.uid if keys is not None else None,
    )


def archived_as(index: IndexRepository, keys: PseudonymKeys) -> IsStored:
    """Storage Commitment's archive check: is the instance of this SOP Instance UID as sent
    indexed (under its keyed pseudonym, or its own UID for a write-back) as stored by one
    of these sites (the instance's owner, not its study's: a site's write into another
    site's study is its own)?"""

    def archived(original_uid: str, site_ids: frozenset[str]) -> bool:
        # Under its keyed pseudonym (an identified instance), or as sent: an object of the
        # domain written back keeps its UIDs (so does Retain UIDs).
        return any(
            index.instance_site(uid) in site_ids for uid in (keys.uid(original_uid), original_uid)
        )

    return archived


def freeze_loaded_objects(*, worker: bool = False) -> None:
    """Exempt what a component loads at start (code, settings; for the worker, the
    standard's IOD tables, loaded here rather than by the first instance of each pool
    process) from the cyclic garbage collector. A full collection over the loaded worker
    walks about 450,000 objects (200 ms of CPU); after this, collections walk only what
    requests and instances create. Before the worker forks its pool, frozen objects are not
    written by the collector either, so the pool processes keep sharing their pages."""
    if worker:
        known_sop_classes()
    gc.freeze()


def ready_file(settings: Settings, component: str) -> Path:
    return settings.run_dir / f"{component}.ready"


def mark_ready(settings: Settings, component: str) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    ready_file(settings, component).write_text(str(os.getpid()))


def record_api_url(settings: Settings) -> None:
    """Write where this data folder's API answers (its port as started, `--http-port`
    included), for the CLI's share links."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    (settings.run_dir / "api.url").write_text(settings.effective_public_url)


def share_base_url(settings: Settings) -> str:
    """The base of share links: `HTTP__PUBLIC_URL`, else the URL the API of this data
    folder recorded when it started, else the settings' own address and port."""
    if settings.http.public_url:
        return settings.effective_public_url
    try:
        recorded = (settings.run_dir / "api.url").read_text().strip()
    except OSError:
        recorded = ""
    return recorded or settings.effective_public_url


def clear_ready(settings: Settings, component: str) -> None:
    ready_file(settings, component).unlink(missing_ok=True)


def _component_probe(settings: Settings, component: str):  # type: ignore[no-untyped-def]
    def probe() -> None:
        path = ready_file(settings, component)
        pid = int(path.read_text())  # FileNotFoundError while starting
        os.kill(pid, 0)  # ProcessLookupError when it died

    return probe


def api_metrics_dir(settings: Settings) -> Path:
    """Where several `dicom-gateway api` processes of one data directory write metrics."""
    return settings.run_dir / "api-metrics"


def api_from_environment():  # type: ignore[no-untyped-def]
    """The API of one of several `dicom-gateway api` processes (uvicorn's app factory):
    settings from the environment, as the first process read them; metrics summed over
    the processes (the first one set prometheus_client's folder before starting them)."""
    settings = Settings()
    configure_logging(settings, "api")
    folder = os.environ.get(METRICS_MULTIPROCESS_VARIABLE)
    return build_api(settings, metrics_multiprocess_dir=Path(folder) if folder else None)


def build_api(  # type: ignore[no-untyped-def]
    settings: Settings,
    metrics_multiprocess_dir: Path | None = None,
):
    admin_token = settings.admin_token_value()
    settings.check_role()  # the secret at a site's API, never at the regional one
    region = settings.http.role == "region"
    index = build_index(settings)
    probes = {name: _component_probe(settings, name) for name in settings.supervised_components}
    sender = build_celery(settings, with_pipeline=False)

    def broker() -> None:
        """STOW-RS hands batches to the worker through the broker: it must be reachable."""
        with sender.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    probes["broker"] = broker

    epoch = BrokerEpoch(sender)

    def to_the_worker(site_id: str, batch_id: str) -> str:
        sent_to = epoch()  # before sending: recorded with the batch
        enqueue_ingest(sender, site_id, batch_id)
        return sent_to

    # At the region, write-backs are processed by the API process that spooled them.
    enqueue = regional_write_back(settings, index) if region else to_the_worker

    def study_patient(study_instance_uid: str, scope: AccessScope) -> str | None:
        found = index.search_studies(
            StudyQuery(study_instance_uids=(study_instance_uid,), limit=1, scope=scope)
        )
        return found[0].patient_id if found else None

    limits = decode_limits(settings)
    stow = StowTarget(
        Spool(settings.spool_dir, settings.site_id),
        enqueue,
        settings.http.max_stow_mb * 1024 * 1024,
        study_patient=study_patient if region else None,
        reply_seconds=settings.http.stow_reply_seconds,
        decode_limits=limits,
        max_parts=settings.http.max_stow_parts,
        # At a site, a worker must be reading this spool (its mark on it): else 503.
        processed=None
        if region
        else lambda: ProcessMark.any_alive(settings.spool_dir, WORKER_MARK),
    )
    return create_app(
        ApiConfig(
            admin_token=admin_token,
            readiness_probes=probes,
            quarantine_dir=settings.quarantine_dir,
            public_url=settings.effective_public_url,
            stow=stow,
            cors_origins=tuple(settings.http.cors_origins),
            shares=share_policy(settings),
            oidc=oidc_config(settings),
            smtp=smtp_config(settings),
            lookup=None if region else build_lookup(settings),
            role=settings.http.role,
            default_site=settings.site_id,
            auth_failure_limit=settings.auth.failure_limit,
            trusted_proxies=parse_networks(settings.http.trusted_proxies),
            failure_window_seconds=settings.auth.failure_window_seconds,
            metrics_multiprocess_dir=metrics_multiprocess_dir,
            inline_read_budget_seconds=settings.http.inline_read_budget_ms / 1000,
            decode_limits=limits,
            request_limits=RequestLimits(
                max_url_bytes=settings.http.max_url_bytes,
                max_header_bytes=settings.http.max_header_bytes,
                max_single_header_bytes=settings.http.max_header_bytes // 2,
            ),
            rendering=RenderLimits(
                max_frame_megapixels=settings.http.render_max_megapixels,
                max_frame_bytes=settings.http.render_max_frame_mb * 1024 * 1024,
                cache_bytes=settings.http.render_cache_mb * 1024 * 1024,
            ),
        ),
        index,
        build_object_store(settings),
    )


def regional_write_back(
    settings: Settings, index: IndexRepository
) -> Callable[[str, str], str | None]:
    """How the regional API processes the write-backs it spooled: in its own process (the
    region runs no worker, and each regional host has its own spool), with the region's
    pipeline — no secret, objects of the domain only. Indexing a write-back makes its
    study's completion pending (`completion_due_at`): the owning site's worker completes it
    (series metadata, thumbnails, KOS, webhook) once it is quiet.

    The spool is looked after as a worker's is (`spool.recovery`), every
    `WORKER__RECOVERY_INTERVAL_SECONDS`: batches a previous process left (it died before
    processing them), and those whose processing failed on the index or the object store
    once these answer again."""
    pipeline = build_pipeline(settings, index)
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="write-back")
    write_once_checked = threading.Event()  # at the first write-back: the API starts without S3

    def process(site_id: str, batch_id: str) -> None:
        try:
            if not write_once_checked.is_set():
                check_write_once(settings)  # stored instances are never replaced
                write_once_checked.set()
        except Exception as exc:  # noqa: BLE001 - S3 unreachable or unfit: recorded, retried
            log.error("write-back batch %s not processed (%s)", batch_id, type(exc).__name__)
            claim = BatchClaim.acquire(pipeline.batch_dir(site_id, batch_id), wait=True)
            if claim is not None:
                with claim:
                    record_retry(claim.directory, read_pending(claim.directory), type(exc).__name__)
            return
        try:
            pipeline.ingest_batch(site_id, batch_id)
        except TransientPipelineError as exc:  # recorded in the batch: the sweep retries it
            log.warning("write-back batch %s waits for a retry (%s)", batch_id, exc.reason)
        except Exception as exc:  # noqa: BLE001 - recorded in the batch (retry); logged here
            log.error("write-back batch %s failed (%s)", batch_id, type(exc).__name__)

    # This process's queue is its executor: what it was given is gone when it dies. Its
    # mark says whether it lives (to the other API processes of this host too).
    this_process = ProcessMark(settings.spool_dir, "write-back")

    def enqueue(site_id: str, batch_id: str) -> str:
        executor.submit(process, site_id, batch_id)
        return this_process.name

    def queue_alive(name: str) -> bool:
        return ProcessMark.alive(settings.spool_dir, name)

    spool = Spool(settings.spool_dir, settings.site_id)

    def dependencies_up() -> bool:
        try:
            index.check()
            pipeline.store.check()
        except Exception:  # noqa: BLE001 - any failure: retries wait
            return False
        return True

    def sweeping() -> None:
        up_before = True
        while True:
            up = dependencies_up()
            facts = Facts(
                queue_alive=queue_alive,
                dependencies_up=up,
                dependencies_returned=up and not up_before,
            )
            up_before = up
            try:
                sweep(spool, lambda batch: enqueue(settings.site_id, batch), facts)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                log.error("write-back sweep failed (%s)", type(exc).__name__)
            time.sleep(settings.worker.recovery_interval_seconds)

    threading.Thread(target=sweeping, name="write-back-sweep", daemon=True).start()
    return enqueue


def share_policy(settings: Settings) -> SharePolicy:
    return SharePolicy(
        max_expiry=dt.timedelta(days=settings.shares.max_expiry_days),
        session_lifetime=dt.timedelta(minutes=settings.shares.session_minutes),
        pin_lock_after=settings.shares.pin_lock_after,
        min_pin_length=settings.shares.min_pin_length,
    )


def oidc_config(settings: Settings) -> OidcConfig | None:
    oidc = settings.auth.oidc
    if oidc is None:
        return None
    return OidcConfig(
        issuer=oidc.issuer,
        audience=oidc.audience,
        jwks_url=oidc.jwks_url,
        algorithms=tuple(oidc.algorithms),
        scope_claim=oidc.scope_claim,
        scope_map={k: tuple(v) for k, v in oidc.scope_map.items()},
        subject_claim=oidc.subject_claim,
        site_claim=oidc.site_claim,
        leeway_seconds=oidc.leeway_seconds,
    )


def smtp_config(settings: Settings) -> SmtpConfig | None:
    smtp = settings.smtp
    if smtp is None:
        return None
    return SmtpConfig(
        host=smtp.host,
        port=smtp.port,
        sender=smtp.sender,
        starttls=smtp.starttls,
        use_ssl=smtp.use_ssl,
        username=smtp.username,
        password=smtp.password.get_secret_value() if smtp.password else None,
        timeout_seconds=smtp.timeout_seconds,
    )


def build_lookup(settings: Settings, *, required: bool = False) -> PseudonymLookup | None:
    """Original identifiers -> pseudonyms, with this deployment's secret and INS issuers
    (None without the secret, unless `required`: then the SettingsError says why)."""
    keys = pseudonym_keys(settings, required=required)
    if keys is None:
        return None  # an API without the secret cannot look up (and says so: 503)
    issuers = ins_issuers(settings)

    def lookup(
        accession: str | None,
        patient_id: str | None,
        accession_issuer: str,
        patient_issuer: str,
        site_id: str,
    ) -> tuple[str | None, str | None]:
        return (
            pseudonymize_accession_number(keys, accession, site_id=site_id, issuer=accession_issuer)
            if accession
            else None,
            pseudonymize_patient_id(
                keys, patient_id, site_id=site_id, issuer=patient_issuer, ins_issuers=issuers
            )
            if patient_id
            else None,
        )

    return lookup


def build_share_service(settings: Settings) -> ShareService:
    """The share service on the configured index, for the CLI."""
    index = build_index(settings)
    return ShareService(AccessRepository(index.engine), index, share_policy(settings))
