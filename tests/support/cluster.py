"""A production column on loopback, every component in its own process, for tests and
benchmarks.

SeaweedFS (S3), a fresh PostgreSQL database, Redis under a key prefix of its own, per site
a `dicom-gateway node` and a `dicom-gateway worker` (own data directory, spool and site
id) and N `dicom-gateway api` processes. Each process is started the way its unit in
`deploy/systemd/` starts it (the unit's `ExecStart`, with the settings of the
`EnvironmentFile` it names, read from `deploy/config/`); only what differs between the
example region and this machine is replaced — addresses, ports, credentials, paths — and
every variable of an example must be a setting and every replaced one must be in the
example, so the examples cannot drift from what the code reads. Usage::

    with Cluster(tmp_path, sites=("A", "B"), apis=2) as cluster:
        cluster.send("A", study_folder)
        cluster.wait_indexed(12, site="A")
        cluster.kill(cluster.sites["A"].worker)      # SIGKILL: a crash
        cluster.restart(cluster.sites["A"].worker)
        status, body, _ = http_json(f"{cluster.apis[1].url}/dicom-web/studies", cluster.admin_token)

Teardown stops every process (the unit's stop signal, SIGKILL after a bounded wait),
checks that none is left, drops the database and deletes the Redis keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import psycopg2
import redis
from pydantic import BaseModel
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from anonymize import PseudonymKeys, pseudonymize_patient_id
from gateway.settings import Settings
from tests.support.seaweedfs import SeaweedFS
from tests.support.services import free_port, http_json

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
POSTGRES_ADMIN_URL = os.environ.get(
    "DGW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = "DICOM_GATEWAY_"
#: The calling AE title `send` uses by default: one the example site.env allows.
DEFAULT_CALLING_AE = "CT_SALLE_1"


# deploy/ files ----------------------------------------------------------------------------
def read_env_file(path: Path) -> dict[str, str]:
    """A systemd `EnvironmentFile` (KEY=VALUE lines, `#` comments, optional quotes)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path.name}:{number}: not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def commented_settings(path: Path) -> list[str]:
    """Settings an environment file shows commented out (`# DICOM_GATEWAY_X=…`, optional)."""
    return re.findall(r"^#\s*(DICOM_GATEWAY_[A-Z0-9_]+)=", path.read_text(), re.MULTILINE)


@dataclass(frozen=True)
class Unit:
    """What a unit of deploy/systemd says about starting and stopping its process."""

    name: str
    exec_start: tuple[str, ...]
    environment_file: Path
    kill_signal: signal.Signals
    timeout_stop_seconds: float

    @classmethod
    def read(cls, path: Path) -> Unit:
        values: dict[str, str] = {}
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
        timeout = values.get("TimeoutStopSec", "90").removesuffix("s")
        return cls(path.name, tuple(shlex.split(values["ExecStart"])),
                   # /etc/dicom-gateway/site.env is deploy/config/site.env in the repository
                   DEPLOY / "config" / Path(values["EnvironmentFile"].lstrip("-")).name,
                   signal.Signals[values.get("KillSignal", "SIGTERM")], float(timeout))

    def program(self) -> list[str]:
        """`ExecStart`'s program, the unit's virtualenv replaced by the running one."""
        beside = Path(sys.executable).with_name(Path(self.exec_start[0]).name)
        return [str(beside)] if beside.is_file() else [sys.executable, "-m", "gateway"]

    def command(self) -> list[str]:
        return [*self.program(), *self.exec_start[1:]]


def _unit(role: str) -> Unit:
    return Unit.read(DEPLOY / "systemd" / f"dicom-gateway-{role}.service")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (`X` or `X | None`), None for a plain value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def unknown_settings(env: Mapping[str, str]) -> list[str]:
    """Variables of an environment file that no setting reads (Settings ignores them)."""
    unknown = []
    for name in env:
        model: type[BaseModel] | None = Settings
        for part in name.removeprefix(PREFIX).lower().split("__"):
            field = model.model_fields.get(part) if model is not None else None
            if not name.startswith(PREFIX) or field is None:
                unknown.append(name)
                break
            model = _model_of(field.annotation)
    return unknown


def _with_overrides(example: Mapping[str, str], source: str, overrides: Mapping[str, str],
                    additions: Mapping[str, str]) -> dict[str, str]:
    """The example's settings with this machine's values. Every variable of the example must
    be a setting, and an override must replace a setting the example has (else the example
    lacks it, or names it differently)."""
    unknown = unknown_settings(example) + unknown_settings(
        dict.fromkeys(commented_settings(DEPLOY / "config" / source), ""))
    if unknown:
        raise AssertionError(f"deploy/config/{source}: no such setting: {', '.join(unknown)}")
    missing = sorted(PREFIX + k for k in overrides if PREFIX + k not in example)
    if missing:
        raise AssertionError(f"deploy/config/{source} does not set {', '.join(missing)}")
    return {**example, **{PREFIX + k: v for k, v in {**overrides, **additions}.items()}}


def _normalized(settings: Mapping[str, str] | None) -> dict[str, str]:
    """`worker__study_quiet_seconds` or `DICOM_GATEWAY_WORKER__STUDY_QUIET_SECONDS` -> the latter."""
    return {(k.upper() if k.upper().startswith(PREFIX) else PREFIX + k.upper()): str(v)
            for k, v in (settings or {}).items()}


# processes --------------------------------------------------------------------------------
def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Component:
    """One service of the cluster: its unit's command and environment, its own log (appended
    to across restarts), a readiness check."""

    def __init__(self, name: str, unit: Unit, env: dict[str, str], log_path: Path,
                 ready: Callable[[Component], bool]) -> None:
        self.name, self.unit, self.env, self.log_path = name, unit, env, log_path
        self.command = unit.command()
        self._ready = ready
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0
        self.left_behind: list[int] = []

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def start(self) -> None:
        assert not self.alive(), f"{self.name} is already running"
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open across restarts
        self._log.write(f"--- start {self.starts + 1}: {shlex.join(self.command)}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(self.command, env=self.env, cwd=REPO,
                                        stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        return self.alive() and self._ready(self)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process and self.process.returncode}"
                                   f"\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:g}s\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the process and everything it started (a crash of the service)."""
        if self.process is None:
            return
        self._kill_group()

    def signal_stop(self) -> None:
        """Send the unit's stop signal (KillSignal) to the main process."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(self.unit.kill_signal)

    def wait_stopped(self, timeout: float | None = None) -> int | None:
        """Wait for the exit (at most the unit's TimeoutStopSec, or `timeout`), then SIGKILL
        whatever is left of its process group, as systemd does. Its exit code, or None when
        it had to be killed. `left_behind` lists what outlived the main process."""
        self.left_behind = []
        if self.process is None:
            return None
        code: int | None
        try:
            code = self.process.wait(timeout=self.unit.timeout_stop_seconds if timeout is None
                                     else timeout)
        except subprocess.TimeoutExpired:
            code = None
        else:  # a child still running a moment after its parent's clean exit was left behind
            deadline = time.monotonic() + 2.0
            while self.leftovers() and time.monotonic() < deadline:
                time.sleep(0.02)
            self.left_behind = self.leftovers()
        self._kill_group()
        return code

    def _kill_group(self, timeout: float = 10.0) -> None:
        """SIGKILL every process of the group and wait until none is left (children are
        reaped by init, asynchronously)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self, timeout: float | None = None) -> int | None:
        self.signal_stop()
        return self.wait_stopped(timeout)

    def leftovers(self) -> list[int]:
        """Live processes still in this service's process group."""
        return _group_members(self.process.pid) if self.process is not None else []

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the live processes of the service (main + children)."""
        return sum(process_cpu_seconds(pid) for pid in self.leftovers())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _ready_file(data_dir: Path, role: str) -> Callable[[Component], bool]:
    """Node and worker write `run/<role>.ready` with their pid once ready (a stale file left
    by a killed process names another pid)."""
    path = data_dir / "run" / f"{role}.ready"

    def ready(component: Component) -> bool:
        try:
            return int(path.read_text()) == component.pid
        except (OSError, ValueError):
            return False

    return ready


def _healthy(url: str) -> Callable[[Component], bool]:
    def ready(_: Component) -> bool:
        try:
            return http_json(f"{url}/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    return ready


@dataclass
class Site:
    """A producing site: its node and worker share `data_dir` (the spool)."""

    site_id: str
    data_dir: Path
    ae_title: str
    dicom_port: int
    metrics_port: int
    env: dict[str, str]
    node: Component
    worker: Component

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool" / self.site_id

    def spooled(self) -> int:
        """Instances received and not yet archived (waiting in the site's spool)."""
        return sum(1 for _ in self.spool_dir.rglob("*.dcm")) if self.spool_dir.exists() else 0

    def quarantined(self) -> int:
        quarantine = self.data_dir / "quarantine"
        return sum(1 for _ in quarantine.rglob("*.dcm")) if quarantine.exists() else 0


@dataclass
class Api:
    url: str
    data_dir: Path
    env: dict[str, str]
    process: Component


class Cluster:
    """The production column; see the module docstring.

    `sites`: site ids (each gets a node and a worker); `apis`: how many API processes.
    `settings` apply to every process, `site_settings[site]` to one site's node and worker,
    `api_settings` to the APIs (names with or without the `DICOM_GATEWAY_` prefix).
    `seaweedfs`: share a running server (the cluster creates and deletes a bucket of its
    own on it). `start_workers=False` leaves the workers stopped (`restart` starts one).
    """

    def __init__(self, root: Path, sites: Sequence[str] = ("A",), apis: int = 1, *,
                 worker_concurrency: int = 1, settings: Mapping[str, str] | None = None,
                 site_settings: Mapping[str, Mapping[str, str]] | None = None,
                 api_settings: Mapping[str, str] | None = None,
                 seaweedfs: SeaweedFS | None = None, start_workers: bool = True,
                 postgres_admin_url: str = POSTGRES_ADMIN_URL, redis_url: str = REDIS_URL,
                 timeout: float = 120.0) -> None:
        self.root = Path(root)
        self.site_ids = tuple(sites)
        self.api_count = apis
        self.worker_concurrency = worker_concurrency
        self.settings, self.site_settings = settings, site_settings or {}
        self.api_settings = api_settings
        self.seaweedfs, self._owns_seaweedfs = seaweedfs, seaweedfs is None
        self.start_workers = start_workers
        self.postgres_admin_url, self.redis_url, self.timeout = postgres_admin_url, redis_url, timeout
        self.secret = "cluster-" + secrets.token_urlsafe(24)
        self.admin_token = "cluster-" + secrets.token_urlsafe(24)
        self.keys = PseudonymKeys(self.secret.encode())
        self.tag = uuid.uuid4().hex[:10]
        self.bucket = f"dgw-cluster-{self.tag}"
        self.database = f"dgw_cluster_{os.getpid()}_{self.tag}"
        self.key_prefix = f"dgw-cluster-{self.tag}:"
        self.database_url = ""
        self.engine: Engine | None = None
        self.sites: dict[str, Site] = {}
        self.apis: list[Api] = []
        self._exit = contextlib.ExitStack()

    # lifecycle -----------------------------------------------------------------------------
    @property
    def components(self) -> list[Component]:
        """Every service: workers, nodes, then APIs."""
        return ([s.worker for s in self.sites.values()] + [s.node for s in self.sites.values()]
                + [a.process for a in self.apis])

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start(self) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        if self.seaweedfs is None:
            self.seaweedfs = self._exit.enter_context(SeaweedFS(self.root / "seaweedfs"))
        self.seaweedfs.create_bucket(self.bucket)
        self._exit.callback(self._delete_bucket)
        self._create_database()
        self._exit.callback(self._delete_redis_keys)
        api_units = _unit("api")
        api_example = read_env_file(api_units.environment_file)
        api_ports = [free_port() for _ in range(self.api_count)]
        api_urls = [f"http://127.0.0.1:{port}" for port in api_ports]
        for number, (port, url) in enumerate(zip(api_ports, api_urls, strict=True), start=1):
            data_dir = self.root / f"api{number}"
            shared = self._shared_services()
            # The regional API runs without the pseudonymization secret; an API the test
            # makes a site's (HTTP__ROLE=site, e.g. for identified STOW-RS) holds it.
            secret = {"PSEUDONYM_SECRET": shared.pop("PSEUDONYM_SECRET")}
            site_api = _normalized(self.api_settings).get(PREFIX + "HTTP__ROLE") == "site"
            env = self._env(_with_overrides(api_example, api_units.environment_file.name, {
                "DATA_DIR": str(data_dir), "HOST": "127.0.0.1", "HTTP__PORT": str(port),
                # no load balancer here: each API is reached, and links it, at its own address
                "HTTP__PUBLIC_URL": url, "ADMIN_TOKEN": self.admin_token,
                **shared}, {**self._test_only(), **(secret if site_api else {})}),
                self.api_settings)
            self.apis.append(Api(url, data_dir, env, Component(
                f"api{number}", api_units, env, self.root / "logs" / f"api{number}.log",
                _healthy(url))))
        node_unit, worker_unit = _unit("node"), _unit("worker")
        if node_unit.environment_file != worker_unit.environment_file:
            raise AssertionError("a site's node and worker units must read the same settings")
        site_example = read_env_file(node_unit.environment_file)
        for site_id in self.site_ids:
            data_dir = self.root / f"site-{site_id}"
            dicom_port, metrics_port = free_port(), free_port()
            overrides = {
                "SITE_ID": site_id, "DATA_DIR": str(data_dir), "HOST": "127.0.0.1",
                "DICOM__AE_TITLE": f"GW_{site_id.upper()}"[:16], "DICOM__PORT": str(dicom_port),
                "DICOM__ALLOWED_NETWORKS": '["127.0.0.0/8"]',
                "DICOM__METRICS_PORT": str(metrics_port),
                "WORKER__CONCURRENCY": str(self.worker_concurrency), **self._shared_services()}
            if api_urls:  # what the site's KOS manifests name as the Retrieve URL
                overrides["HTTP__PUBLIC_URL"] = api_urls[0]
            env = _with_overrides(site_example, node_unit.environment_file.name, overrides,
                                  self._test_only())
            env = self._env(env, self.site_settings.get(site_id))
            logs = self.root / "logs"
            self.sites[site_id] = Site(
                site_id, data_dir, env[PREFIX + "DICOM__AE_TITLE"], int(env[PREFIX + "DICOM__PORT"]),
                int(env[PREFIX + "DICOM__METRICS_PORT"]), env,
                Component(f"node-{site_id}", node_unit, env, logs / f"node-{site_id}.log",
                          _ready_file(data_dir, "node")),
                Component(f"worker-{site_id}", worker_unit, env, logs / f"worker-{site_id}.log",
                          _ready_file(data_dir, "worker")))
        starting = [c for c in self.components
                    if self.start_workers or c not in [s.worker for s in self.sites.values()]]
        for component in starting:
            component.start()
        for component in starting:
            component.wait_ready(self.timeout)

    def _shared_services(self) -> dict[str, str]:
        assert self.seaweedfs is not None
        return {
            "PSEUDONYM_SECRET": self.secret, "BROKER_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            "OBJECT_STORE__S3__ENDPOINT_URL": self.seaweedfs.endpoint_url,
            "OBJECT_STORE__S3__BUCKET": self.bucket,
            "OBJECT_STORE__S3__ACCESS_KEY_ID": self.seaweedfs.access_key,
            "OBJECT_STORE__S3__SECRET_ACCESS_KEY": self.seaweedfs.secret_key,
        }

    def _test_only(self) -> dict[str, str]:
        """Settings the examples do not have: this cluster's private corner of the shared Redis."""
        return {"BROKER_TRANSPORT_OPTIONS": json.dumps({"global_keyprefix": self.key_prefix})}

    def _env(self, settings: dict[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
        """A child's environment: ours without any DICOM_GATEWAY_/AWS_ variable, then the
        service's settings, then the caller's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith((PREFIX, "AWS_"))}
        env.update(settings)
        env.update(_normalized(self.settings))
        env.update(_normalized(extra))
        return env

    def _admin_sql(self, statement: str) -> None:
        admin = psycopg2.connect(self.postgres_admin_url)
        admin.autocommit = True
        try:
            with admin.cursor() as cursor:
                cursor.execute(statement)
        finally:
            admin.close()

    def _create_database(self) -> None:
        self._admin_sql(f'CREATE DATABASE "{self.database}"')
        self._exit.callback(self._drop_database)
        base = self.postgres_admin_url.rsplit("/", 1)[0].split("://", 1)[1]
        self.database_url = f"postgresql+psycopg2://{base}/{self.database}"
        # one connection reused by polls (a new one per poll costs PostgreSQL a fork)
        self.engine = create_engine(self.database_url, pool_size=1, max_overflow=4)
        self._exit.callback(self.engine.dispose)

    def _drop_database(self) -> None:
        self._admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def _delete_redis_keys(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.key_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    def _delete_bucket(self) -> None:
        if self._owns_seaweedfs or self.seaweedfs is None:
            return  # the server goes with its data
        client = self.seaweedfs.client()
        for key in self.s3_keys():
            client.delete_object(Bucket=self.bucket, Key=key)
        client.delete_bucket(Bucket=self.bucket)

    def __exit__(self, *exc_info: object) -> None:
        """Stop every service (stop signal to all, then wait, SIGKILL after 30 s), check that
        none left a process behind, drop the database, delete the Redis keys, stop SeaweedFS."""
        leaked: list[str] = []
        try:
            components = [c for c in self.components if c.process is not None]
            for component in components:
                component.signal_stop()
            for component in components:
                component.wait_stopped(min(component.unit.timeout_stop_seconds, 30.0))
                if component.left_behind or component.leftovers():
                    leaked.append(f"{component.name}: {component.left_behind or component.leftovers()}")
                component.close()
        finally:
            self._exit.close()
        if leaked and exc_info[0] is None:
            raise AssertionError(f"processes left after teardown: {'; '.join(leaked)}")

    # operations ----------------------------------------------------------------------------
    def kill(self, component: Component) -> None:
        """SIGKILL a service (and its children): a crash, nothing cleaned up."""
        component.kill()

    def stop(self, component: Component) -> int | None:
        return component.stop()

    def restart(self, component: Component) -> None:
        """Start a service again (after kill or stop) and wait until it is ready."""
        if component.alive():
            component.stop()
        component.start()
        component.wait_ready(self.timeout)

    def send(self, site_id: str, *paths: Path, calling_ae: str = DEFAULT_CALLING_AE,
             timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
        """C-STORE files (or folders, recursively) to a site's node with dcmtk's storescu;
        fails unless every instance was acknowledged."""
        storescu = shutil.which("storescu")
        if storescu is None:
            raise FileNotFoundError("dcmtk's storescu is not installed: run `make test`")
        site = self.sites[site_id]
        result = subprocess.run(
            [storescu, "-aet", calling_ae, "-aec", site.ae_title, "+sd", "+r", "127.0.0.1",
             str(site.dicom_port), *map(str, paths)], check=False, capture_output=True,
            timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"storescu to site {site_id} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')[-2000:]}")
        return result

    def sql(self, statement: str, **params: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the cluster's index database."""
        assert self.engine is not None
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(statement), params)]

    def count_instances(self, *, site: str | None = None, study: str | None = None) -> int:
        """Indexed instances, of one site's studies and/or one (de-identified) study."""
        rows = self.sql(
            "SELECT count(*) FROM instances i JOIN studies s USING (study_instance_uid) "
            "WHERE (CAST(:site AS text) IS NULL OR s.site_id = :site) "
            "AND (CAST(:study AS text) IS NULL OR i.study_instance_uid = :study)",
            site=site, study=study)
        return int(rows[0][0])

    def wait_indexed(self, count: int, *, site: str | None = None, study: str | None = None,
                     timeout: float | None = None) -> int:
        """Wait until at least `count` instances are indexed (of `site` / `study`); the
        number indexed. Fails early when a site's worker died."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            found = self.count_instances(site=site, study=study)
            if found >= count:
                return found
            for each in self.sites.values():
                if each.worker.process is not None and each.worker.starts and not each.worker.alive() \
                        and each.worker.process.returncode != -signal.SIGKILL:
                    raise RuntimeError(f"{each.worker.name} died\n{each.worker.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{found} of {count} instances indexed (site={site}, "
                                   f"study={study}) after {timeout or self.timeout:g}s")
            time.sleep(0.1)

    def queue_length(self, site_id: str, task: str | None = None) -> int:
        """Tasks waiting in the site's queue (`ingest.<site>`) in Redis; only those of one
        task name when given (e.g. `INGEST_TASK`: not the completion steps batches schedule)."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            base = f"{self.key_prefix}ingest.{site_id}".encode()
            keys = [key for key in client.scan_iter(match=base + b"*")  # kombu's priority lists
                    if key == base or key.startswith(base + b"\x06\x16")]
            if task is None:
                return sum(int(client.llen(key)) for key in keys)
            needle = json.dumps(task).encode()
            return sum(1 for key in keys for message in client.lrange(key, 0, -1)
                       if needle in message)
        finally:
            client.close()

    def s3_keys(self, prefix: str = "") -> list[str]:
        assert self.seaweedfs is not None
        pages = self.seaweedfs.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def study_uid(self, original_study_uid: str) -> str:
        """The de-identified Study Instance UID an original one becomes."""
        return self.keys.uid(original_study_uid)

    def patient_pseudonym(self, ins: str) -> str:
        """The pseudonymous PatientID of a patient known by their INS (at any site)."""
        return pseudonymize_patient_id(self.keys, ins, site_id="", is_ins=True)

    def cli(self, *args: str, api: int = 0, timeout: float = 60.0) -> str:
        """Run `dicom-gateway ARGS…` with an API's settings (e.g. `apikey create`); stdout."""
        api_process = self.apis[api].process
        result = subprocess.run([*api_process.unit.program(), *args], env=api_process.env,
                                cwd=REPO, check=False, capture_output=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"dicom-gateway {args[0]} failed: "
                                 f"{result.stderr.decode(errors='replace')[-2000:]}")
        return result.stdout.decode()

    def logs(self) -> dict[str, str]:
        """Every service's log, by name."""
        return {c.name: c.log_text() for c in self.components}



__all__ = ["DEFAULT_CALLING_AE", "Api", "Cluster", "Component", "Site", "Unit",
           "process_cpu_seconds", "read_env_file", "unknown_settings"]
