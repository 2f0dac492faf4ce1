"""Helpers for tests that run real processes: free ports, waiting on conditions, gateways."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.05,
              what: str = "condition") -> T:
    """Poll `condition` until it returns a truthy value; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


def http_json(url: str, token: str | None = None, accept: str = "application/dicom+json",
              timeout: float = 10.0) -> tuple[int, Any, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None, dict(response.headers)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None, dict(exc.headers)


def child_pids(parent: int) -> set[int]:
    """The pids of `parent`'s direct children (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.add(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


class GatewayProcess:
    """One `dicom-gateway <command>` child process with its own log file."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise
        return int(self.process.returncode)

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:  # a failing test: its report shows how the process got there
            tail = self.log_text()[-6000:]
            sys.stdout.write(f"--- last lines of {self.log_path.name} ---\n{tail}\n")
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # anything it left behind
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def gateway_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """A clean environment for a gateway child: only our settings, no inherited ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_GATEWAY_")}
    env["DICOM_GATEWAY_DATA_DIR"] = str(data_dir)
    env["DICOM_GATEWAY_LOG_LEVEL"] = "INFO"
    for key, value in settings.items():
        env[f"DICOM_GATEWAY_{key.upper()}"] = value
    return env
