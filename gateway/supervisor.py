"""`serve`: run node, worker and API as supervised child processes; one Ctrl-C stops all.

The supervisor owns its children: each is started with the kernel's parent-death signal
(`PR_SET_PDEATHSIG`: SIGTERM when the supervisor dies, even by SIGKILL), and one `serve`
holds the data folder's lock (`run/serve.lock`, an exclusive `flock`) that its children
inherit, so a second `serve` on the same folder refuses to start while the first or any of
its components still runs, instead of failing to bind and removing their readiness files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import logging
import os
import signal
import subprocess  # nosec B404 - starts our own components only
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gateway import components
from gateway.settings import Settings
from spool import pid_alive

log = logging.getLogger(__name__)

COMPONENTS = ("node", "worker", "api")
STOP_ORDER = ("node", "api", "worker")  # stop intake first, let the worker finish its task
READY_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 30.0
MAX_RESTARTS_PER_MINUTE = 5
#: How long a new `serve` waits for the components of one that died to finish stopping.
PREVIOUS_STOP_WAIT_SECONDS = STOP_TIMEOUT_SECONDS + 10
_PR_SET_PDEATHSIG = 1


class AlreadyServing(Exception):
    """Another `serve` (or its components) runs on this data folder."""


def _die_with(parent: int) -> Callable[[], None]:
    """In the child, before it runs our program: SIGTERM it when `parent` dies (Linux);
    a parent already gone (it died between fork and here) ends the child at once."""
    libc_name = ctypes.util.find_library("c")

    def arrange() -> None:
        if libc_name is not None:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arrange


class ServeLock:
    """The data folder's `serve` lock: an exclusive flock on `run/serve.lock`, whose file
    names the holder's pid. The children inherit the descriptor, so the lock is free only
    once the supervisor and every component it started have exited."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "serve.lock"
        self.handle: IO[str] | None = None

    def acquire(self, wait_seconds: float = PREVIOUS_STOP_WAIT_SECONDS) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the supervisor's life
        deadline = time.monotonic() + wait_seconds
        waiting_said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder(handle)
                if holder is not None and pid_alive(holder):
                    handle.close()
                    raise AlreadyServing(
                        f"dicom-gateway serve (pid {holder}) is already running on this data "
                        f"folder ({self.path.parent.parent}); stop it first"
                    ) from None
                if time.monotonic() > deadline:
                    handle.close()
                    raise AlreadyServing(
                        "components of a dicom-gateway serve that ended still run on this data "
                        f"folder (they hold {self.path}); stop them first"
                    ) from None
                if not waiting_said:
                    log.warning("waiting for the components of the previous serve to stop")
                    waiting_said = True
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle

    @staticmethod
    def _holder(handle: IO[str]) -> int | None:
        handle.seek(0)
        text = handle.read().strip()
        return int(text) if text.isdigit() else None

    def fileno(self) -> int:
        if self.handle is None:
            raise RuntimeError("the serve lock is not held")
        return self.handle.fileno()

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # the children have exited: the lock goes with the last one
            self.handle = None


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    restarts: list[float] = field(default_factory=list)


class Supervisor:
    """Starts the three components, restarts one that crashes, stops all on a signal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: dict[str, _Child] = {}
        self._stop = threading.Event()
        self.lock = ServeLock(settings.run_dir)

    def _environment(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        settings = self.settings
        env.update(
            {
                "DICOM_GATEWAY_DATA_DIR": str(settings.data_dir.resolve()),
                "DICOM_GATEWAY_HOST": settings.host,
                "DICOM_GATEWAY_DICOM__PORT": str(settings.dicom.port),
                "DICOM_GATEWAY_DICOM__AE_TITLE": settings.dicom.ae_title,
                "DICOM_GATEWAY_HTTP__PORT": str(settings.http.port),
            }
        )
        if name == "api":
            env["DICOM_GATEWAY_SUPERVISED_COMPONENTS"] = json.dumps(["node", "worker"])
            env["DICOM_GATEWAY_HTTP__ROLE"] = "site"  # one machine is a site: it holds the secret
        return env

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        # our own interpreter and module with a fixed component name: no untrusted input
        return subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "gateway", name],
            env=self._environment(name),
            start_new_session=True,  # signals come from us, in order, not from the terminal
            preexec_fn=_die_with(os.getpid()),  # noqa: PLW1509 - one thread: fork is safe
            pass_fds=(self.lock.fileno(),),  # the lock stays held while a child lives
        )

    def _health_url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):  # nosec B104 - a comparison, not a bind
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.settings.http.port}/healthz"

    def _healthy(self) -> bool:
        try:
            # our own http:// health URL, built above
            with urllib.request.urlopen(self._health_url(), timeout=2) as response:  # nosec B310
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def run(self) -> int:
        components.configure_logging(self.settings, "serve")
        self.lock.acquire()  # before anything of a running gateway is touched
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> int:
        components.close_site_files(self.settings)
        components.build_policy(self.settings)  # a bad de-identification profile stops us here
        admin_token = self.settings.admin_token_value()
        components.build_index(self.settings)  # migrate once, before any child starts
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.settings.run_dir.glob("*.ready"):
            stale.unlink()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        for name in COMPONENTS:
            self.children[name] = _Child(name, self._spawn(name))
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not self._healthy():
            if self._stop.wait(0.2):
                return self.shutdown()
            dead = [c.name for c in self.children.values() if c.process.poll() is not None]
            if dead or time.monotonic() > deadline:
                log.error("components failed to start: %s", ", ".join(dead) or "timeout")
                self.shutdown()
                return 1
        self._banner(admin_token)
        while not self._stop.wait(0.5):
            if not self._restart_crashed():
                self.shutdown()
                return 1
        return self.shutdown()

    def _banner(self, admin_token: str) -> None:
        s = self.settings
        web_host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host  # nosec B104
        lines = [
            "dicom-gateway is ready",
            f"  DICOM address : {s.dicom.ae_title}@{s.host}:{s.dicom.port}",
            f"  Web address   : http://{web_host}:{s.http.port}/",
            f"  DICOMweb root : http://{web_host}:{s.http.port}/dicom-web",
            # A token the operator set is theirs: never echoed (it would reach logs).
            "  Admin token   : (DICOM_GATEWAY_ADMIN_TOKEN)"
            if s.admin_token is not None
            else f"  Admin token   : {admin_token}",
            f"  Data directory: {s.data_dir.resolve()}",
            "Press Ctrl-C to stop.",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def _restart_crashed(self) -> bool:
        now = time.monotonic()
        for child in self.children.values():
            code = child.process.poll()
            if code is None:
                continue
            child.restarts = [t for t in child.restarts if now - t < 60] + [now]
            if len(child.restarts) > MAX_RESTARTS_PER_MINUTE:
                log.error("%s keeps crashing (exit %s); stopping", child.name, code)
                return False
            log.warning("%s exited with %s; restarting", child.name, code)
            child.process = self._spawn(child.name)
        return True

    def shutdown(self) -> int:
        for name in STOP_ORDER:
            child = self.children.get(name)
            if child is None or child.process.poll() is not None:
                continue
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop in time; killing it", name)
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        for stale in self.settings.run_dir.glob("*.ready"):
            stale.unlink(missing_ok=True)
        return 0
