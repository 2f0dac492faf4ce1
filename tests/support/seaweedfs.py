"""Start a real, loopback-only SeaweedFS S3 server (``weed mini``) for tests.

Every port is picked at runtime, so several instances can run side by side.
Credentials are a random static identity from an ``-s3.config`` file; anonymous
requests and wrong secrets are rejected.  Usage::

    with SeaweedFS(tmp_path) as s3:
        s3.create_bucket("data")
        s3.client().put_object(Bucket="data", Key="k", Body=b"v")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# Every port flag of `weed mini` (webdav, debug, iceberg, lance, metrics stay disabled).
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
               "webdav.port", "debug.port", "s3.debug.port")


def _pick_ports() -> dict[str, int]:
    """Distinct free loopback ports, all sockets held open while choosing.  The admin
    pair is (p, p + 10000): weed's built-in worker dials admin.port + 10000 and
    ignores -admin.port.grpc."""
    with contextlib.ExitStack() as stack:
        def bind(port: int = 0) -> int:
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", port))
            return int(sock.getsockname()[1])

        ports = {flag: bind() for flag in _PORT_FLAGS}
        for _ in range(100):
            with contextlib.suppress(OSError):
                grpc = bind()
                if grpc > 11024:
                    ports["admin.port"], ports["admin.port.grpc"] = bind(grpc - 10000), grpc
                    return ports
    raise RuntimeError("no free admin port pair")


class SeaweedFS:
    """Runs ``weed mini``; data, S3 config and ``weed.log`` live in ``data_dir``."""

    region = "us-east-1"

    def __init__(self, data_dir: Path, weed_binary: str | None = None, timeout: float = 60.0):
        self.data_dir, self.timeout = Path(data_dir), timeout
        beside = Path(sys.executable).with_name("weed")
        found = weed_binary or (str(beside) if beside.is_file() else shutil.which("weed"))
        if not found:
            raise FileNotFoundError("weed binary not found next to sys.executable or on PATH")
        self.weed_binary: str = found
        self.access_key, self.secret_key = "test" + uuid.uuid4().hex[:16], uuid.uuid4().hex
        self.log_path = self.data_dir / "weed.log"
        self.endpoint_url, self.ready_seconds, self.command = "", 0.0, list[str]()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ports: dict[str, int] = {}

    @property
    def pid(self) -> int | None:
        """The running server's process id (for CPU accounting in benchmarks)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def client(self, **overrides: Any) -> Any:
        """A path-style boto3 S3 client; keyword overrides go to ``boto3.client``."""
        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url, "region_name": self.region,
            "aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key,
            "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1})}
        return boto3.client("s3", **{**kwargs, **overrides})

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "<no log>"

    def __enter__(self) -> Self:
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "test", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}]}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        self._env = env
        self._log = open(self.log_path, "ab")
        started = time.monotonic()
        try:
            for _ in range(5):  # retried only if another process grabbed a picked port
                self._ports = _pick_ports()
                self.endpoint_url = f"http://127.0.0.1:{self._ports['s3.port']}"
                self.command = [
                    self.weed_binary, "-logtostderr", "mini", f"-dir={self.data_dir / 'data'}",
                    "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                    *(f"-{flag}={port}" for flag, port in self._ports.items()),
                    "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                    "-volume.preStopSeconds=0", f"-s3.config={config}"]
                self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, env=env,
                                              stdout=self._log, stderr=subprocess.STDOUT,
                                              start_new_session=True)
                if self._wait_ready(started):
                    self.ready_seconds = time.monotonic() - started
                    return self
            raise RuntimeError(f"weed could not bind its ports\n{self.log_tail()}")
        except BaseException:
            self.__exit__()
            raise

    def stop(self) -> None:
        """Stop the server (an outage); `restart()` brings it back on the same ports and data."""
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def restart(self) -> None:
        """Start again with the same command line (ports, data, credentials)."""
        assert self._log is not None
        started = time.monotonic()
        self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, env=self._env,
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        if not self._wait_ready(started):
            raise RuntimeError(f"weed could not take its ports back\n{self.log_tail()}")

    def _wait_ready(self, started: float) -> bool:
        """True once an S3 round trip works; False if weed exited as a port was taken."""
        assert self._proc is not None
        client = self.client(config=Config(s3={"addressing_style": "path"}, connect_timeout=1,
                                           read_timeout=3, retries={"max_attempts": 1}))
        probe, last = "ready-probe-" + uuid.uuid4().hex[:12], "none"
        while time.monotonic() - started < self.timeout:
            if self._proc.poll() is not None:
                if "Port allocation failed" in self.log_tail(5):
                    return False
                raise RuntimeError(f"weed exited with code {self._proc.returncode}; command: "
                                   f"{' '.join(self.command)}\nlog tail:\n{self.log_tail()}")
            try:
                if probe not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                if client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok":
                    client.delete_object(Bucket=probe, Key="probe")
                    client.delete_bucket(Bucket=probe)
                    return True
                last = "probe round trip returned wrong content"
            except (BotoCoreError, ClientError) as exc:  # refused, timeout, 503 while starting
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS not ready after {self.timeout:g}s (last error: {last}); "
                           f"command: {' '.join(self.command)}\nlog tail:\n{self.log_tail()}")

    def __exit__(self, *exc_info: object, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` s; close the log."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None
        for port in self._ports.values():  # weed leaves /tmp/seaweedfs-<svc>-<port>.sock behind
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None
