"""`serve`: run node, worker and API as supervised child processes; one Ctrl-C stops all."""

from __future__ import annotations

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
from dataclasses import dataclass, field

from gateway import components
from gateway.settings import Settings

log = logging.getLogger(__name__)

COMPONENTS = ("node", "worker", "api")
STOP_ORDER = ("node", "api", "worker")  # stop intake first, let the worker finish its task
READY_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 30.0
MAX_RESTARTS_PER_MINUTE = 5


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
