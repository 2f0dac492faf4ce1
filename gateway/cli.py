"""`dicom-gateway`: the command line (typer)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from gateway.settings import METRICS_MULTIPROCESS_VARIABLE, Settings, SettingsError

app = typer.Typer(
    help="dicom-gateway: DICOM in, de-identified, stored, shared over DICOMweb.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
log = logging.getLogger("gateway")


def _settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the flags given on the command line on top."""
    try:
        base = Settings()
        data = base.model_dump()
        for key, value in overrides.items():
            if value is None:
                continue
            target = data
            *parents, leaf = key.split("__")
            for parent in parents:
                target = target[parent]
            target[leaf] = value
        return Settings.model_validate(data)
    except ValidationError as exc:
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(2)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data directory")]
Host = Annotated[str | None, typer.Option("--host", help="address to bind (default 127.0.0.1)")]
DicomPort = Annotated[int | None, typer.Option("--dicom-port", help="DICOM port (default 11112)")]
HttpPort = Annotated[int | None, typer.Option("--http-port", help="HTTP port (default 8000)")]
AeTitle = Annotated[str | None, typer.Option("--ae-title", help="AE title (default DICOMGATEWAY)")]


@app.command()
def serve(
    data_dir: DataDir = None,
    host: Host = None,
    dicom_port: DicomPort = None,
    http_port: HttpPort = None,
    ae_title: AeTitle = None,
) -> None:
    """Node + worker + API in one supervisor, on embedded defaults (SQLite, files, filesystem broker)."""
    from gateway.supervisor import AlreadyServing, Supervisor

    settings = _settings(
        data_dir=data_dir,
        host=host,
        dicom__port=dicom_port,
        http__port=http_port,
        dicom__ae_title=ae_title,
    )
    settings.ensure_generated_secrets()
    try:
        code = Supervisor(settings).run()
    except (SettingsError, AlreadyServing) as exc:
        raise _fail(exc) from exc
    raise typer.Exit(code)


@app.command()
def node(
    data_dir: DataDir = None,
    host: Host = None,
    dicom_port: DicomPort = None,
    ae_title: AeTitle = None,
) -> None:
    """Run the DICOM node (C-ECHO, C-STORE into the spool) alone."""
    from gateway import components

    settings = _settings(
        data_dir=data_dir, host=host, dicom__port=dicom_port, dicom__ae_title=ae_title
    )
    components.configure_logging(settings, "node")
    components.close_site_files(settings)
    components.raise_open_file_limit()
    celery_app = components.build_celery(settings, with_pipeline=False)
    dicom_node = components.build_node(settings, celery_app)
    try:
        dicom_node.start()
    except OSError as exc:
        raise _fail(exc) from exc
    components.freeze_loaded_objects()
    components.mark_ready(settings, "node")
    try:
        _wait_for_signal()
    finally:
        components.clear_ready(settings, "node")
        dicom_node.stop()


@app.command()
def worker(
    data_dir: DataDir = None,
    concurrency: Annotated[int | None, typer.Option(help="worker processes")] = None,
) -> None:
    """Run a Celery worker for the ingest pipeline alone."""
    from celery.signals import task_received, worker_ready, worker_shutdown

    from gateway import components
    from spool import ProcessMark
    from worker import WORKER_MARK, ingest_queue, record_reserved, task_directory

    settings = _settings(data_dir=data_dir, worker__concurrency=concurrency)
    components.configure_logging(settings, "worker")
    components.close_site_files(settings)
    components.raise_open_file_limit()
    try:
        settings.check_role()  # the region's worker runs without the secret, a site's with it
        components.build_policy(settings)  # refuse a bad profile before starting
        components.build_index(settings)  # migrate before forking
        components.check_write_once(settings)  # stored instances are never replaced
    except SettingsError as exc:
        raise _fail(exc) from exc
    celery_app = components.build_celery(settings, with_pipeline=True)
    recovery = components.build_recovery(settings, celery_app)
    # Held for this process's life: a task it takes from the broker is recorded under this
    # mark, and seen lost when the mark is free (the process died before running it).
    # STOW-RS also looks for a live worker mark before it accepts anything.
    mark = ProcessMark(settings.spool_dir, WORKER_MARK)

    def received(request: Any = None, **_: object) -> None:
        directory = task_directory(settings.spool_dir, request.name, request.args or ())
        if directory is not None:
            record_reserved(directory, mark.name)

    def ready(**_: object) -> None:
        components.mark_ready(settings, "worker")
        recovery.start()  # at once: what a previous run or an outage left is sent again

    def stopping(**_: object) -> None:
        components.clear_ready(settings, "worker")
        mark.close()

    # (The pool's processes close their copy of the mark at the fork: `spool.claims`.)
    task_received.connect(received, weak=False)
    worker_ready.connect(ready, weak=False)
    worker_shutdown.connect(stopping, weak=False)
    argv = [
        "worker",
        f"--loglevel={settings.log_level}",
        f"--pool={settings.worker.pool}",
        f"--queues={','.join(ingest_queue(site) for site in settings.sites)}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--hostname=ingest-{settings.site_id}-{os.getpid()}@%h",
    ]
    if settings.worker.concurrency:
        argv.append(f"--concurrency={settings.worker.concurrency}")
    components.freeze_loaded_objects(worker=True)  # before the pool forks
    celery_app.worker_main(argv)


@app.command()
def api(data_dir: DataDir = None, host: Host = None, http_port: HttpPort = None) -> None:
    """Run the HTTP API (DICOMweb, health, metrics) alone."""
    import uvicorn

    from gateway import components

    settings = _settings(data_dir=data_dir, host=host, http__port=http_port)
    components.configure_logging(settings, "api")
    components.close_site_files(settings)
    components.raise_open_file_limit()
    try:
        application = components.build_api(settings)  # checks the settings before serving
    except SettingsError as exc:
        raise _fail(exc) from exc
    # No access log: request paths will carry share tokens; our own logs never do.
    # No proxy headers: uvicorn would take X-Forwarded-For from loopback peers on its own;
    # the app believes it only from HTTP__TRUSTED_PROXIES (web_viewer_api.proxies).
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.http.port,
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "proxy_headers": False,
    }
    components.record_api_url(settings)  # the share links the CLI prints point here
    if settings.http.workers == 1:
        components.freeze_loaded_objects()
        uvicorn.run(application, **options)
        return
    # Several processes on one port: each builds the app from the same settings, the
    # command line's included (passed on in the environment).
    for name, value in (("DATA_DIR", data_dir), ("HOST", host), ("HTTP__PORT", http_port)):
        if value is not None:
            os.environ[f"DICOM_GATEWAY_{name}"] = str(value)
    # One /metrics for all: each process writes its counters to files in this folder
    # (emptied first: counters start from zero with the service, as with one process).
    metrics = components.api_metrics_dir(settings)
    shutil.rmtree(metrics, ignore_errors=True)
    metrics.mkdir(parents=True)
    os.environ[METRICS_MULTIPROCESS_VARIABLE] = str(metrics)
    uvicorn.run(
        "gateway.components:api_from_environment",
        factory=True,
        workers=settings.http.workers,
        **options,
    )


@app.command()
def config(data_dir: DataDir = None) -> None:
    """Print the effective settings, secrets masked."""
    settings = _settings(data_dir=data_dir)
    sys.stdout.write(json.dumps(settings.masked(), indent=2) + "\n")


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Argument(help="output folder")],
    ct_slices: Annotated[int, typer.Option(help="CT instances")] = 24,
    mr_slices: Annotated[int, typer.Option(help="MR instances")] = 12,
    size: Annotated[int, typer.Option(help="CT matrix size")] = 512,
    seed: Annotated[int, typer.Option(help="random seed")] = 1,
) -> None:
    """Write a synthetic CT + MR study with realistic pixels and planted identifying values."""
    from gateway.sample_study import SampleStudySpec, write_sample_study

    paths = write_sample_study(
        out, SampleStudySpec(ct_slices=ct_slices, mr_slices=mr_slices, ct_size=size, seed=seed)
    )
    console.print(f"wrote {len(paths)} instances to {out}")


@app.command()
def reindex(data_dir: DataDir = None) -> None:
    """Rebuild the whole index from the object store alone."""
    from rich.progress import Progress

    from gateway import components
    from worker.reindex import reindex as rebuild

    settings = _settings(data_dir=data_dir)
    components.configure_logging(settings, "reindex")
    store = components.build_object_store(settings)
    index = components.build_index(settings)
    with Progress(console=console) as progress:
        task = progress.add_task("reindexing objects", total=None)
        report = rebuild(store, index, lambda n: progress.advance(task, n))
    console.print(
        f"indexed {report.indexed} instances; {len(report.unreadable)} unreadable objects"
    )
    if report.unreadable:
        raise typer.Exit(1)


@app.command("import")
def import_files(
    paths: Annotated[list[Path], typer.Argument(help="files, folders or zip archives")],
    data_dir: DataDir = None,
) -> None:
    """Send every DICOM file under PATHS through the ingest pipeline, with progress."""
    from gateway import components
    from gateway.importer import run_import
    from spool import Spool

    settings = _settings(data_dir=data_dir)
    components.configure_logging(settings, "import")
    components.close_site_files(settings)
    components.raise_open_file_limit()
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise _fail(FileNotFoundError(f"no such path: {', '.join(map(str, missing))}"))
    try:
        components.build_index(settings)
        pipeline = components.build_pipeline(settings)
    except SettingsError as exc:
        raise _fail(exc) from exc
    summary = run_import(paths, pipeline, Spool(settings.spool_dir, settings.site_id), console)
    console.print(
        f"[bold]{summary.files}[/bold] files ({summary.bytes / 1e6:.1f} MB): "
        f"[green]{summary.stored} stored[/green], {summary.duplicates} duplicates, "
        f"{summary.not_dicom} not DICOM, {summary.too_large} too large, "
        f"[red]{sum(summary.quarantined.values())} quarantined[/red]"
    )
    for reason, count in summary.quarantined.most_common():
        console.print(f"  quarantined: {count} x {reason}")
    sys.stdout.write(
        json.dumps(
            {
                "files": summary.files,
                "stored": summary.stored,
                "duplicates": summary.duplicates,
                "not_dicom": summary.not_dicom,
                "too_large": summary.too_large,
                "quarantined": dict(summary.quarantined),
            }
        )
        + "\n"
    )


@app.command()
def reidentify(
    file: Annotated[
        Path, typer.Argument(help="a de-identified instance carrying encrypted attributes")
    ],
    key: Annotated[Path, typer.Option(help="recipient private key (PEM)")],
    cert: Annotated[Path, typer.Option(help="recipient certificate (PEM or DER)")],
    out: Annotated[
        Path | None, typer.Option(help="output file (default: FILE.reidentified.dcm)")
    ] = None,
) -> None:
    """Restore the original attributes of an instance de-identified reversibly."""
    import pydicom

    from anonymize import ReidentificationError, restore_identity

    try:
        dataset = pydicom.dcmread(file)
        restore_identity(dataset, cert.read_bytes(), key.read_bytes())
    except (OSError, ValueError, ReidentificationError) as exc:
        raise _fail(exc) from exc
    target = out or file.with_name(file.stem + ".reidentified.dcm")
    from spool import open_private

    try:
        with open_private(target, exclusive=False) as handle:  # original identifiers: 0600
            dataset.save_as(handle, enforce_file_format=True)
    except OSError as exc:
        raise _fail(exc) from exc
    console.print(f"restored original attributes into {target}")


@app.command()
def lookup(
    accession_number: Annotated[
        str | None, typer.Option("--accession-number", help="the RIS accession number (original)")
    ] = None,
    issuer: Annotated[
        str,
        typer.Option("--issuer", help="issuer of the accession number, as the studies carry it"),
    ] = "",
    patient_id: Annotated[
        str | None,
        typer.Option("--patient-id", help="the original patient ID (local ID, or the INS)"),
    ] = None,
    patient_id_issuer: Annotated[
        str,
        typer.Option(
            "--patient-id-issuer",
            help="its issuer (an INS authority's OID or namespace makes it the INS)",
        ),
    ] = "",
    site: Annotated[
        list[str] | None,
        typer.Option(
            help="producing site(s) the accession number belongs to (default: every site the "
            "index holds studies of)"
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """At a producing site: print the pseudonyms of original identifiers and the stored
    de-identified studies they match (JSON). Only pseudonyms reach the index; nothing
    identifying is printed to the log or recorded."""
    from gateway import components
    from storage import EVERY_SITE
    from web_viewer_api import OriginalIdentifiers, find_studies, lookup_sites

    settings = _settings(data_dir=data_dir)
    if settings.http.role == "region":
        raise _fail(
            ValueError(
                "lookups are computed at a producing site (HTTP__ROLE=site, "
                "with the pseudonymization secret), never at the region"
            )
        )
    if not (accession_number or patient_id):
        raise _fail(ValueError("give --accession-number and/or --patient-id"))
    bad = [s for s in site or () if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", s)]
    if bad:
        raise _fail(ValueError(f"not a site id: {bad[0]!r}"))
    try:
        pseudonyms = components.build_lookup(settings, required=True)
        index = components.build_index(settings)
    except SettingsError as exc:
        raise _fail(exc) from exc
    if pseudonyms is None:  # required=True raises instead; never answer without the secret
        raise _fail(SettingsError("the lookup needs the pseudonymization secret"))
    sites = sorted(set(site)) if site else lookup_sites(index, EVERY_SITE)
    answer = find_studies(
        pseudonyms,
        index,
        OriginalIdentifiers(accession_number, issuer, patient_id, patient_id_issuer),
        sites,
        EVERY_SITE,
    )
    _audit(
        settings,
        "study.lookup",
        detail=json.dumps({"matches": len(answer.studies), "sites": sites}),
    )
    sys.stdout.write(
        json.dumps(
            {
                "pseudonyms": [
                    {
                        "site": p.site_id,
                        "accession_number": p.accession_number,
                        "patient_id": p.patient_id,
                    }
                    for p in answer.pseudonyms
                ],
                "study_uids": [s.study_instance_uid for s in answer.studies],
            },
            indent=2,
        )
        + "\n"
    )


share_app = typer.Typer(help="Share links: create, list, inspect, revoke.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(share_app, name="share")
app.add_typer(apikey_app, name="apikey")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """`90s`, `30m`, `12h`, `7d`, `2w` (or plain seconds) -> timedelta."""
    text = text.strip().lower()
    unit = text[-1:] if text[-1:] in _DURATION_UNITS else "s"
    number = text[:-1] if text[-1:] in _DURATION_UNITS else text
    try:
        value = float(number)
    except ValueError:
        raise typer.BadParameter(f"not a duration: {text!r} (e.g. 7d, 12h, 30m)") from None
    if value <= 0:
        raise typer.BadParameter("the duration must be positive")
    try:
        return dt.timedelta(seconds=value * _DURATION_UNITS[unit])
    except OverflowError:
        raise typer.BadParameter(f"duration out of range: {text!r}") from None


def _actor() -> str:
    """Who ran the command, for the audit trail."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _audit(settings: Settings, action: str, **fields: Any) -> None:
    from access import audit_entry
    from gateway import components
    from storage import AccessRepository

    index = components.build_index(settings, run_migrations=False)
    AccessRepository(index.engine).append_audit([audit_entry(action, _actor(), **fields)])


@share_app.command("create")
def share_create(
    study_uids: Annotated[list[str], typer.Argument(help="de-identified Study Instance UID(s)")],
    expires: Annotated[str, typer.Option(help="lifetime: 30m, 12h, 7d, 2w")] = "7d",
    pin: Annotated[
        bool, typer.Option("--pin", help="protect with a random 6-digit PIN (printed once)")
    ] = False,
    max_uses: Annotated[int | None, typer.Option(min=1, help="viewer sessions allowed")] = None,
    permission: Annotated[
        list[str] | None,
        typer.Option(
            "--permission",
            help="what the share allows beyond viewing (repeat), e.g. download; an unknown "
            "name is refused with the list of known ones",
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="the same as --permission download")
    ] = False,
    recipient: Annotated[str, typer.Option(help="recipient's name or label")] = "",
    email: Annotated[str, typer.Option(help="recipient's e-mail (recorded; see --notify)")] = "",
    note: Annotated[str, typer.Option(help="free note kept with the share")] = "",
    notify: Annotated[
        bool, typer.Option("--notify", help="e-mail the link (never the PIN) to --email")
    ] = False,
    context: Annotated[
        Path | None,
        typer.Option(
            help="JSON object of texts (patient_name, patient_birth_date, exam_date, "
            "clinical_question, ...) sealed here for the recipient only: the key is "
            "printed in the link's fragment (#k=...), never stored or sent to a server"
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a share link and print its URL (shown once: only its hash is kept)."""
    from pydantic import ValidationError

    from access import AccessError, ShareCreate, new_pin, share_audit_detail
    from access.sealed_context import seal
    from gateway import components
    from web_viewer_api.notify import NotificationError, send, share_message

    settings = _settings(data_dir=data_dir)
    lifetime = parse_duration(expires)
    sealed, key = "", ""
    if context is not None:
        try:
            sealed, key = seal(json.loads(context.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError) as exc:
            raise _fail(ValueError(f"--context: {exc}")) from exc
    if notify and (not email or settings.smtp is None):
        raise _fail(ValueError("--notify needs --email and DICOM_GATEWAY_SMTP__HOST"))
    chosen_pin = new_pin() if pin else None
    try:
        asked = ShareCreate(
            study_uids=study_uids,
            expires_in=int(lifetime.total_seconds()),
            pin=chosen_pin,
            max_uses=max_uses,
            permissions=permission or [],
            allow_download=download,
            recipient=recipient or None,
            recipient_email=email or None,
            note=note or None,
            sealed_context=sealed or None,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise _fail(ValueError(f"{where}: {first['msg']}")) from None
    try:
        service = components.build_share_service(settings)
        created = service.create(
            asked.to_request(_actor(), None), components.share_base_url(settings)
        )
    except (AccessError, SettingsError) as exc:
        raise _fail(exc) from exc
    share = created.share
    _audit(
        settings,
        "share.create",
        share_id=share.share_id,
        study_instance_uid=share.items[0].study_instance_uid,
        detail=json.dumps(share_audit_detail(share)),
    )
    # The key is only in the link this command prints (and e-mails, from this site).
    link = f"{created.url}#k={key}" if key else created.url
    if notify:
        smtp = components.smtp_config(settings)
        if smtp is None:  # checked above; kept explicit for type checkers
            raise _fail(ValueError("DICOM_GATEWAY_SMTP__HOST is not set"))
        try:
            send(
                smtp,
                share_message(smtp, email, link, share.expires_at, has_pin=pin, sender_note=note),
            )
        except NotificationError as exc:
            console.print(f"[red]e-mail not sent: {exc}[/red]")
        else:
            console.print(f"link e-mailed to {email}")
    console.print(f"share {share.share_id}, expires {share.expires_at:%Y-%m-%d %H:%M} UTC")
    if chosen_pin:
        console.print(f"PIN (give it by another channel than the link): [bold]{chosen_pin}[/bold]")
    sys.stdout.write(link + "\n")


@share_app.command("list")
def share_list(
    active: Annotated[bool, typer.Option("--active", help="only usable shares")] = False,
    data_dir: DataDir = None,
) -> None:
    """List share links, newest first (JSON lines)."""
    from access import SharePublic
    from gateway import components

    settings = _settings(data_dir=data_dir)
    service = components.build_share_service(settings)
    now = service.clock()
    for share in service.access.list_shares(active_at=now if active else None, limit=10_000):
        sys.stdout.write(SharePublic.of(share, now).model_dump_json() + "\n")


@share_app.command("revoke")
def share_revoke(
    share_id: Annotated[str, typer.Argument(help="the share's id")], data_dir: DataDir = None
) -> None:
    """Revoke a share link at once (its open viewer sessions end too)."""
    from access import AccessError
    from gateway import components

    settings = _settings(data_dir=data_dir)
    try:
        components.build_share_service(settings).revoke(share_id)
    except AccessError as exc:
        raise _fail(exc) from exc
    _audit(settings, "share.revoke", share_id=share_id)
    console.print(f"share {share_id} revoked")


@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="what the key is for (e.g. 'CHU Nord PACS')")],
    scope: Annotated[list[str], typer.Option(help="read, write, share, admin (repeat)")],
    site: Annotated[
        list[str] | None,
        typer.Option(help="limit to this site's studies (repeat for several sites)"),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create an API key and print it (once: only its hash is kept). `--scope share` alone
    makes a key that creates share links (of its sites' studies) but reads no images."""
    from access import AccessError, ApiKeyService
    from gateway import components
    from storage import AccessRepository

    settings = _settings(data_dir=data_dir)
    service = ApiKeyService(AccessRepository(components.build_index(settings).engine))
    try:
        created = service.create(name, scope, site)
    except AccessError as exc:
        raise _fail(exc) from exc
    key_id, key = created.record.key_id, created.key
    sites = sorted(created.record.site_ids) if created.record.site_ids else None
    _audit(
        settings,
        "apikey.create",
        detail=json.dumps({"key_id": key_id, "scopes": sorted(scope), "sites": sites}),
    )
    console.print(
        f"API key {key_id} ({', '.join(sorted(scope))}"
        f"{', sites ' + ' '.join(sites) if sites else ''}): shown once, keep it safe"
    )
    sys.stdout.write(key + "\n")


@apikey_app.command("list")
def apikey_list(data_dir: DataDir = None) -> None:
    """List API keys (ids, names, scopes; never the keys)."""
    from access import ApiKeyService, api_key_public
    from gateway import components
    from storage import AccessRepository

    settings = _settings(data_dir=data_dir)
    service = ApiKeyService(AccessRepository(components.build_index(settings).engine))
    for key in service.list():
        sys.stdout.write(json.dumps(api_key_public(key)) + "\n")


@apikey_app.command("revoke")
def apikey_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id")], data_dir: DataDir = None
) -> None:
    """Revoke an API key at once."""
    from access import AccessError, ApiKeyService
    from gateway import components
    from storage import AccessRepository

    settings = _settings(data_dir=data_dir)
    service = ApiKeyService(AccessRepository(components.build_index(settings).engine))
    try:
        service.revoke(key_id)
    except AccessError as exc:
        raise _fail(exc) from exc
    _audit(settings, "apikey.revoke", detail=json.dumps({"key_id": key_id}))
    console.print(f"API key {key_id} revoked")


def main() -> None:
    # Every process started here keeps its metrics in memory. The variable comes back only
    # for the workers `api` starts itself (HTTP__WORKERS > 1); inherited from a shell or a
    # unit file, it would send every counter to files in a folder that may not exist.
    os.environ.pop(METRICS_MULTIPROCESS_VARIABLE, None)
    app()
