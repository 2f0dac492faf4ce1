"""`dicom-gateway`: the command line (typer)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from gateway.settings import Settings, SettingsError

app = typer.Typer(help="dicom-gateway: DICOM in, de-identified, stored, shared over DICOMweb.",
                  no_args_is_help=True, add_completion=False)
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
def serve(data_dir: DataDir = None, host: Host = None, dicom_port: DicomPort = None,
          http_port: HttpPort = None, ae_title: AeTitle = None) -> None:
    """Node + worker + API in one supervisor, on embedded defaults (SQLite, files, filesystem broker)."""
    from gateway.supervisor import Supervisor

    settings = _settings(data_dir=data_dir, host=host, dicom__port=dicom_port,
                         http__port=http_port, dicom__ae_title=ae_title)
    settings.ensure_generated_secrets()
    try:
        code = Supervisor(settings).run()
    except SettingsError as exc:
        raise _fail(exc) from exc
    raise typer.Exit(code)


@app.command()
def node(data_dir: DataDir = None, host: Host = None, dicom_port: DicomPort = None,
         ae_title: AeTitle = None) -> None:
    """Run the DICOM node (C-ECHO, C-STORE into the spool) alone."""
    from gateway import components

    settings = _settings(data_dir=data_dir, host=host, dicom__port=dicom_port,
                         dicom__ae_title=ae_title)
    components.configure_logging(settings, "node")
    celery_app = components.build_celery(settings, with_pipeline=False)
    dicom_node = components.build_node(settings, celery_app)
    try:
        dicom_node.start()
    except OSError as exc:
        raise _fail(exc) from exc
    components.mark_ready(settings, "node")
    try:
        _wait_for_signal()
    finally:
        components.clear_ready(settings, "node")
        dicom_node.stop()


@app.command()
def worker(data_dir: DataDir = None,
           concurrency: Annotated[int | None, typer.Option(help="worker processes")] = None) -> None:
    """Run a Celery worker for the ingest pipeline alone."""
    from celery.signals import worker_ready, worker_shutdown

    from gateway import components
    from worker import enqueue_completion, ingest_queue

    settings = _settings(data_dir=data_dir, worker__concurrency=concurrency)
    components.configure_logging(settings, "worker")
    try:
        components.build_policy(settings)  # refuse a bad profile before starting
        components.build_index(settings)  # migrate before forking
    except SettingsError as exc:
        raise _fail(exc) from exc
    celery_app = components.build_celery(settings, with_pipeline=True)
    def ready(**_: object) -> None:
        components.mark_ready(settings, "worker")
        enqueue_completion(celery_app, settings.site_id)  # studies left due by a restart

    worker_ready.connect(ready, weak=False)
    worker_shutdown.connect(lambda **_: components.clear_ready(settings, "worker"), weak=False)
    argv = ["worker", f"--loglevel={settings.log_level}", f"--pool={settings.worker.pool}",
            f"--queues={ingest_queue(settings.site_id)}",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            f"--hostname=ingest-{settings.site_id}-{os.getpid()}@%h"]
    if settings.worker.concurrency:
        argv.append(f"--concurrency={settings.worker.concurrency}")
    celery_app.worker_main(argv)


@app.command()
def api(data_dir: DataDir = None, host: Host = None, http_port: HttpPort = None) -> None:
    """Run the HTTP API (DICOMweb, health, metrics) alone."""
    import uvicorn

    from gateway import components

    settings = _settings(data_dir=data_dir, host=host, http__port=http_port)
    components.configure_logging(settings, "api")
    try:
        application = components.build_api(settings)
    except SettingsError as exc:
        raise _fail(exc) from exc
    # No access log: request paths will carry share tokens; our own logs never do.
    uvicorn.run(application, host=settings.host, port=settings.http.port,
                log_level=settings.log_level.lower(), access_log=False)


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

    paths = write_sample_study(out, SampleStudySpec(ct_slices=ct_slices, mr_slices=mr_slices,
                                                     ct_size=size, seed=seed))
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
    console.print(f"indexed {report.indexed} instances; {len(report.unreadable)} unreadable objects")
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
    from worker import Spool

    settings = _settings(data_dir=data_dir)
    components.configure_logging(settings, "import")
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
        f"{summary.not_dicom} not DICOM, "
        f"[red]{sum(summary.quarantined.values())} quarantined[/red]"
    )
    for reason, count in summary.quarantined.most_common():
        console.print(f"  quarantined: {count} x {reason}")
    sys.stdout.write(json.dumps({"files": summary.files, "stored": summary.stored,
                                 "duplicates": summary.duplicates,
                                 "not_dicom": summary.not_dicom,
                                 "quarantined": dict(summary.quarantined)}) + "\n")


@app.command()
def reidentify(
    file: Annotated[Path, typer.Argument(help="a de-identified instance carrying encrypted attributes")],
    key: Annotated[Path, typer.Option(help="recipient private key (PEM)")],
    cert: Annotated[Path, typer.Option(help="recipient certificate (PEM or DER)")],
    out: Annotated[Path | None, typer.Option(help="output file (default: FILE.reidentified.dcm)")] = None,
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
    dataset.save_as(target, enforce_file_format=True)
    console.print(f"restored original attributes into {target}")


def main() -> None:
    app()
